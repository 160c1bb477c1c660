"""bench/gpu_check.py --tiny: the GPU check's code path on CPU, so it never rots (CI runs it here)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_check_tiny_runs_and_reports(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--repeats", "2",
                             "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [m["quantization"] for m in report["modes"]] == ["4bit", "none"]
    for mode in report["modes"]:
        assert mode["raw_generate_tok_s"] > 0 and mode["engine_tok_s"] > 0 and mode["ttft_s"] > 0
        assert mode["engine_8_streams_aggregate_tok_s"] > 0
    assert report["split_check"]["identical"] is True
    header = next(line for line in result.stdout.splitlines() if line.startswith("mode"))
    assert "engine/raw" in header and "8-stream agg tok/s" in header  # the same table shape as on a GPU
