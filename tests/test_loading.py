"""The real loader on the embedded tiny GLM-4: unquantized, 4-bit and 8-bit (bitsandbytes runs on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from glm4.loading import ModelLoadError, load_config, load_model, resolve_model_source
from glm4.prompt import build_prompt
from glm4.settings import Settings
from glm4.tiny import TINY_MODEL_DIR
from tests.conftest import ROOT


def greedy(loaded, text: str, tokens: int = 8) -> list[int]:
    prompt = build_prompt(loaded.tokenizer, [{"role": "user", "content": text}])
    model = loaded.models[0]
    ids = torch.tensor([prompt.token_ids])
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("quantization", ["none", "4bit", "8bit"])
def test_loader_quantization_modes_generate(quantization):
    loaded = load_model(Settings(model="tiny", quantization=quantization))
    assert loaded.info.quantization == quantization
    assert loaded.info.placement.startswith("all 4 layers on CPU")
    linear = loaded.models[0].model.layers[0].mlp.down_proj
    expected = {"none": "Linear", "4bit": "Linear4bit", "8bit": "Linear8bitLt"}[quantization]
    assert type(linear).__name__ == expected
    assert len(greedy(loaded, "你好")) == 8


def test_auto_means_tiny_without_a_gpu():
    assert not torch.cuda.is_available()
    assert resolve_model_source("auto") == str(TINY_MODEL_DIR)
    assert resolve_model_source("auto", has_gpu=True) == "THUDM/glm-4-9b-chat-hf"
    loaded = load_model(Settings())
    assert loaded.info.quantization == "none" and loaded.info.dtype == "float32"


def test_local_directory_loads_like_a_hub_id(tmp_path):
    loaded = load_model(Settings(model=str(TINY_MODEL_DIR), served_model_name="my-glm"))
    assert loaded.info.name == "my-glm" and "glm4" in loaded.info.aliases


def test_missing_model_fails_in_one_clear_paragraph(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as caught:
        load_model(Settings(model="nobody/not-a-model"))
    message = str(caught.value)
    assert "\n" not in message and "--model" in message and "nobody/not-a-model" in message


def test_remote_code_checkpoint_is_refused_with_the_hf_name(tmp_path):
    config = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    config.update(model_type="chatglm", auto_map={"AutoConfig": "configuration_chatglm.ChatGLMConfig"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as caught:
        load_config(str(tmp_path), Settings(model=str(tmp_path)))
    assert "THUDM/glm-4-9b-chat-hf" in str(caught.value) and "--trust-remote-code" in str(caught.value)


def test_app_reports_a_missing_model_without_a_traceback():
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--model", "/no/such/dir", "--no-ui"],
                            capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1",
                                                                              "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "Could not load the model" in result.stderr


def test_plan_only_prints_the_plan_without_loading_weights():
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--plan-only", "--simulate-gpus",
                             "GTX 1070:8GiB:6.1,RTX 2080 Ti:11GiB:7.5"], capture_output=True, text=True,
                            timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "all 40 layers on RTX 2080 Ti" in result.stdout and "KV budget" in result.stdout
    assert "4-bit" in result.stdout


def test_startup_says_it_serves_the_tiny_model(start_server):
    live = start_server("--no-ui")
    first_lines = live.log().splitlines()[:3]
    assert any("embedded tiny GLM-4" in line for line in first_lines), first_lines
