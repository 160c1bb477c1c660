"""bench/gpu_check.py --tiny: the GPU check's code path on CPU, so it never rots (CI runs it here)."""

from __future__ import annotations

import json
import subprocess
import sys

from transformers import AutoConfig

from glm4.placement import estimate_sizes
from glm4.tiny import TINY_MODEL_DIR
from tests.conftest import ROOT


def test_gpu_check_tiny_runs_and_reports(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--repeats", "2",
                             "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [m["quantization"] for m in report["modes"]] == ["4bit", "none"]
    for mode in report["modes"]:
        assert mode["raw_generate_tok_s"] > 0 and mode["engine_1_tok_s"] > 0 and mode["ttft_s"] > 0
        assert mode["engine_8_tok_s"] > 0 and mode["engine_32_tok_s"] > 0
        prefix = mode["prefix_cache"]
        assert prefix["host_cache_hits"] == 1 and prefix["warm_slot_ttft_s"] < prefix["cold_ttft_s"]
    assert report["split_check"]["identical"] is True
    header = next(line for line in result.stdout.splitlines() if line.startswith("mode"))
    assert "engine/raw" in header and "32 streams tok/s" in header  # the same table shape as on a GPU
    summary = json.loads(next(tmp_path.glob("gpu_summary-*.json")).read_text())
    assert {"device", "measured_at", "torch", "transformers", "bitsandbytes", "nf4", "bf16"} <= set(summary)
    for mode in ("nf4", "bf16"):
        assert {"raw_generate_tok_s", "engine_1_tok_s", "engine_8_tok_s", "engine_32_tok_s", "ttft_s",
                "gpu_memory_gib", "capture_s"} <= set(summary[mode])
    # The sizes the placement plan assumes, measured on the tiny model (on a GPU: GLM-4-9B-shaped, 4 layers).
    sizes = report["sizes"]
    assert (sizes["model"], sizes["device"], sizes["dtype"]) == ("tiny", "cpu", "float32")
    config = AutoConfig.from_pretrained(TINY_MODEL_DIR)
    for quantization in ("none", "4bit", "8bit"):
        measured, planned = sizes["modes"][quantization], estimate_sizes(config, quantization, "float32")
        assert abs(measured["weight_bytes"] / planned.weight_bytes - 1) < 0.001, quantization
        assert measured["kv_bytes_per_token"] == planned.kv_bytes_per_token
        assert measured["prefill_peak_mib"] is None  # no allocator statistics on CPU
