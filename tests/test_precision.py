"""fp16 that cannot overflow silently (glm4/precision.py), on a tiny glm4 model built to overflow fp16."""

from __future__ import annotations

import logging

import pytest
import torch

from glm4.loading import load_model, plan_for
from glm4.placement import parse_simulated_gpus
from glm4.precision import guard_activation_bytes, guard_wanted, install_fp16_guard
from glm4.settings import Settings
from glm4.tiny import build_glm4_config, build_overflowing_glm4, save_checkpoint, tiny_glm4_tokenizer

PROMPT = "[gMASK]<sop><|user|>\n你好，介绍一下你自己。What is this server?<|assistant|>"


@pytest.fixture(scope="module")
def overflowing():
    model, tokenizer = build_overflowing_glm4()
    ids = torch.tensor([tokenizer.encode(PROMPT, add_special_tokens=False)])
    with torch.no_grad():
        reference = model(ids).logits.float()
    return model, tokenizer, ids, reference


@pytest.fixture(scope="module")
def overflowing_dir(tmp_path_factory, overflowing):
    model, tokenizer, _, _ = overflowing
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("tiny-glm4-overflow"), variant="0414")


def _fp16_logits(model, ids, guard: bool):
    half = build_overflowing_glm4()[0].half().eval() if model is None else model
    handle = install_fp16_guard(half) if guard else None
    with torch.no_grad():
        logits = half(ids).logits.float()
    if handle:
        handle.remove()
    return logits


def test_fp16_forward_overflows_without_the_guard(overflowing):
    _, _, ids, reference = overflowing
    assert torch.isfinite(reference).all()
    assert not torch.isfinite(_fp16_logits(None, ids, guard=False)).all()


def test_guarded_fp16_forward_is_finite_and_matches_fp32(overflowing):
    _, _, ids, reference = overflowing
    logits = _fp16_logits(None, ids, guard=True)
    assert torch.isfinite(logits).all()
    assert (logits - reference).abs().max() < 0.02 * reference.abs().max()
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))


def test_guard_costs_no_accuracy_where_nothing_overflows():
    from transformers import Glm4ForCausalLM

    tokenizer = tiny_glm4_tokenizer("0414")
    torch.manual_seed(1)
    model = Glm4ForCausalLM(build_glm4_config(tokenizer)).eval()
    ids = torch.tensor([tokenizer.encode(PROMPT, add_special_tokens=False)])
    with torch.no_grad():
        reference = model(ids).logits.float()
        plain = model.half()(ids).logits.float()
    guarded = _fp16_logits(model, ids, guard=True)
    assert (guarded - reference).abs().max() <= 2 * (plain - reference).abs().max() + 1e-3


def test_guard_can_be_removed(overflowing):
    _, _, ids, _ = overflowing
    half = build_overflowing_glm4()[0].half().eval()
    install_fp16_guard(half).remove()
    with torch.no_grad():
        assert not torch.isfinite(half(ids).logits).all()


@pytest.mark.parametrize("quantization", ["none", "4bit", "8bit"])
def test_loader_guards_glm4_in_float16(overflowing_dir, quantization, caplog):
    with caplog.at_level(logging.INFO, logger="glm4.loading"):
        loaded = load_model(Settings(model=str(overflowing_dir), dtype="float16", quantization=quantization))
    assert loaded.fp16_guard and "fp16 guard (--fp16-guard auto)" in caplog.text
    ids = torch.tensor([loaded.renderer.render([{"role": "user", "content": "你好"}]).token_ids])
    with torch.no_grad():
        assert torch.isfinite(loaded.models[0](ids).logits).all()
        out = loaded.models[0].generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4  # decoding with the KV cache goes through the guard too


def test_guard_off_leaves_glm4_overflowing_and_says_so(overflowing_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="glm4.loading"):
        loaded = load_model(Settings(model=str(overflowing_dir), dtype="float16", fp16_guard="off"))
    assert not loaded.fp16_guard
    assert "--fp16-guard off" in caplog.text and "--dtype float32" in caplog.text
    ids = torch.tensor([loaded.renderer.render([{"role": "user", "content": "你好"}]).token_ids])
    with torch.no_grad():
        assert not torch.isfinite(loaded.models[0](ids).logits).all()


def test_hf_checkpoint_is_not_guarded_under_auto():
    assert not load_model(Settings(model="tiny", dtype="float16")).fp16_guard
    assert load_model(Settings(model="tiny", dtype="float16", fp16_guard="on")).fp16_guard


@pytest.mark.parametrize("setting, model_type, dtype, expected", [
    ("auto", "glm4", "float16", True), ("auto", "glm", "float16", False), ("auto", "glm4", "bfloat16", False),
    ("auto", "glm4", "float32", False), ("on", "glm", "float16", True), ("off", "glm4", "float16", False)])
def test_guard_wanted(setting, model_type, dtype, expected):
    assert guard_wanted(setting, model_type, dtype) == expected


def test_plan_reserves_and_reports_what_the_guard_costs(tiny_glm4_dir):
    from glm4.loading import load_config

    gpus = parse_simulated_gpus("RTX 2080 Ti:11GiB:7.5")
    config = load_config(str(tiny_glm4_dir), Settings(model=str(tiny_glm4_dir)))
    guarded, *_ = plan_for(Settings(model=str(tiny_glm4_dir)), config, gpus)
    unguarded, *_ = plan_for(Settings(model=str(tiny_glm4_dir), fp16_guard="off"), config, gpus)
    assert guarded.dtype == "float16"
    extra = guard_activation_bytes(config, min(8192, 2048))
    assert guarded.devices[0].headroom_bytes - unguarded.devices[0].headroom_bytes == extra
    note = next(n for n in guarded.notes if n.startswith("fp16 guard"))
    assert "weights unchanged" in note and f"+{extra / 2**20:.0f} MiB" in note
    assert any(n.startswith("WARNING: --fp16-guard off") for n in unguarded.notes)
    ampere, *_ = plan_for(Settings(model=str(tiny_glm4_dir)), config, parse_simulated_gpus("RTX 3090:24GiB:8.6"))
    assert ampere.dtype == "bfloat16" and not [n for n in ampere.notes if "fp16" in n]
