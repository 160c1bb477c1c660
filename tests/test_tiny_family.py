"""The tiny GLM-4-0414 / GLM-Z1 checkpoints (glm4.tiny.build_tiny_glm4): native glm4, loadable, served right."""

from __future__ import annotations

import json

import pytest
import torch

from glm4.loading import load_model
from glm4.settings import Settings
from glm4.tiny import SPECIAL_TOKENS, STOP_TOKENS, TINY_MODEL_DIR


@pytest.fixture(params=["0414", "z1"])
def variant_dir(request, tiny_glm4_dir, tiny_z1_dir):
    return request.param, tiny_glm4_dir if request.param == "0414" else tiny_z1_dir


def test_checkpoint_is_native_glm4_with_its_template_in_a_jinja_file(variant_dir):
    variant, path = variant_dir
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "glm4" and config["architectures"] == ["Glm4ForCausalLM"]
    assert "auto_map" not in config
    template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    assert "metadata" in template and "observation" in template
    assert ("<think>" in template) == (variant == "z1")
    assert json.loads((path / "tokenizer.json").read_text()) == json.loads((TINY_MODEL_DIR / "tokenizer.json").read_text())


def test_generation_defaults_follow_the_model_cards(variant_dir):
    variant, path = variant_dir
    generation = json.loads((path / "generation_config.json").read_text())
    expected = {"0414": (0.8, 0.8, None), "z1": (0.6, 0.95, 40)}[variant]
    assert (generation["temperature"], generation["top_p"], generation.get("top_k")) == expected


def test_loads_through_the_project_loader_and_generates(variant_dir):
    variant, path = variant_dir
    loaded = load_model(Settings(model=str(path)))
    model = loaded.models[0]
    assert type(model).__name__ == "Glm4ForCausalLM" and hasattr(model.model.layers[0], "post_mlp_layernorm")
    assert loaded.info.dtype == "float32" and not loaded.fp16_guard
    assert loaded.reasoning.enabled == (variant == "z1")
    stops = loaded.tokenizer.convert_tokens_to_ids(STOP_TOKENS)
    assert model.config.eos_token_id == stops
    assert loaded.tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(loaded.tokenizer) - 10,
                                                                               len(loaded.tokenizer)))
    if variant == "z1":
        assert loaded.generation_defaults["top_k"] == 40
    ids = torch.tensor([loaded.renderer.render([{"role": "user", "content": "你好"}]).token_ids])
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4


def test_cli_writes_the_z1_variant(tmp_path):
    from glm4.tiny import main

    main(["--out", str(tmp_path / "z1"), "--variant", "z1"])
    assert json.loads((tmp_path / "z1" / "config.json").read_text())["model_type"] == "glm4"
