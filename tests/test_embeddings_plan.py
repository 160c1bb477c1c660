"""Where the embedding and rerank models go: only into memory the chat model's plan leaves (placement is pure)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from glm4.embeddings import load_auxiliary_config, size_auxiliary_model
from glm4.loading import BUNDLED_CONFIGS, REAL_MODEL_ID
from glm4.placement import (GIB, AuxiliaryModel, parse_simulated_gpus, plan_auxiliary_models, plan_placement)
from glm4.tiny_retrieval import TINY_EMBEDDER_DIR, TINY_RERANKER_DIR
from tests.conftest import ROOT

TWO_CARDS = "RTX 2080 Ti:11GiB:7.5,GTX 1070:8GiB:6.1"


@pytest.fixture(scope="module")
def glm4_config():
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(BUNDLED_CONFIGS[REAL_MODEL_ID])


@pytest.fixture(scope="module")
def bge_m3():
    return size_auxiliary_model("embedding", "BAAI/bge-m3", load_auxiliary_config("BAAI/bge-m3"))


def chat_plan(config, gpus, **kwargs):
    return plan_placement(config, quantization="4bit", dtype="auto", gpus=gpus, **kwargs)


def test_auto_placement_puts_the_embedder_on_the_card_the_chat_model_leaves_free(glm4_config, bge_m3):
    gpus = parse_simulated_gpus(TWO_CARDS)
    plan = chat_plan(glm4_config, gpus)
    assert plan.gpu_indices == [0]  # GLM-4 sits on the 2080 Ti alone
    reranker = AuxiliaryModel("rerank", "reranker", bge_m3.parameters, bge_m3.activation_values)
    placed = plan_auxiliary_models(plan, gpus, [bge_m3, reranker])
    assert [p.device for p in placed] == [1, 1]  # both share the GTX 1070
    assert placed[0].dtype == "float16"  # Pascal: no bf16
    assert "GTX 1070" in placed[0].reason and "free" in placed[0].reason


def test_a_card_the_chat_model_uses_offers_only_what_its_plan_leaves(glm4_config, bge_m3):
    gpus = parse_simulated_gpus(TWO_CARDS)
    plan = chat_plan(glm4_config, gpus, mode="replicate")  # both cards hold a replica
    placed = plan_auxiliary_models(plan, gpus, [bge_m3])
    device = placed[0].device
    if device == "cpu":
        assert all((d.free_after_bytes or 0) < bge_m3.weight_bytes("float16") for d in plan.devices)
    else:
        left = next(d.free_after_bytes for d in plan.devices if d.device == device)
        assert placed[0].weight_bytes + placed[0].activation_bytes <= left


def test_no_room_anywhere_means_cpu_with_the_numbers(glm4_config, bge_m3):
    gpus = parse_simulated_gpus("RTX 2080 Ti:11GiB:7.5")
    # a chat plan that leaves too little: KV cache planned for 80k tokens
    plan = chat_plan(glm4_config, gpus, max_model_len=80000)
    assert 0 < plan.devices[0].free_after_bytes < bge_m3.weight_bytes("float16") + bge_m3.activation_bytes("float16")
    placed = plan_auxiliary_models(plan, gpus, [bge_m3])
    assert placed[0].device == "cpu" and placed[0].dtype == "float32"
    assert "RTX 2080 Ti" in placed[0].reason and "offers" in placed[0].reason


def test_without_gpus_or_without_a_local_chat_model(bge_m3):
    assert plan_auxiliary_models(None, [], [bge_m3])[0].device == "cpu"
    gpus = parse_simulated_gpus(TWO_CARDS)
    # --backend upstream: no local chat model, every card is free: the fastest one
    assert plan_auxiliary_models(None, gpus, [bge_m3])[0].device == 0


def test_gpu_memory_caps_bound_an_unused_card(glm4_config, bge_m3):
    gpus = parse_simulated_gpus(TWO_CARDS)
    plan = chat_plan(glm4_config, gpus, gpu_memory_caps=[11 * GIB, 1 * GIB])
    placed = plan_auxiliary_models(plan, gpus, [bge_m3], gpu_memory_caps=[11 * GIB, 1 * GIB])
    assert placed[0].device != 1


def test_sizes_come_from_the_config_and_match_the_loaded_models():
    from sentence_transformers import CrossEncoder, SentenceTransformer

    for role, directory, cls in (("embedding", TINY_EMBEDDER_DIR, SentenceTransformer),
                                 ("rerank", TINY_RERANKER_DIR, CrossEncoder)):
        sized = size_auxiliary_model(role, directory.name, load_auxiliary_config(str(directory)))
        loaded = cls(str(directory), device="cpu")
        assert sized.parameters == sum(p.numel() for p in loaded.parameters())


def test_bge_m3_is_sized_offline_from_the_bundled_config(bge_m3):
    assert 560e6 < bge_m3.parameters < 575e6  # BAAI/bge-m3: 568M parameters
    assert 1.0 * GIB < bge_m3.weight_bytes("float16") < 1.1 * GIB


def test_plan_only_prints_where_the_embedding_model_goes():
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--plan-only", "--simulate-gpus", TWO_CARDS,
         "--embedding-model", "BAAI/bge-m3", "--rerank-model", "tiny"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    embedding = next(line for line in lines if line.startswith("embedding model BAAI/bge-m3"))
    assert "GPU 1" in embedding and "GTX 1070" in embedding
    assert any(line.startswith("rerank model tiny-reranker: GPU 1") for line in lines)


def test_a_model_that_cannot_be_found_stops_the_server_with_a_clear_message(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--model", "tiny", "--no-ui",
                             "--embedding-model", str(tmp_path / "missing")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert result.returncode == 2
    assert "Cannot load the embedding/rerank model" in result.stderr and "offline mode is on" in result.stderr
