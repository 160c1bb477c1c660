"""Figures in README.md and docs/ come from results files that bench scripts wrote, never from a hand edit.

README's Performance section and docs/BATCHING.md's measurements are what bench/readme_figures.py renders
from bench/results; docs/RELIABILITY.md is what bench/reliability_report.py renders from its results file;
every results file those quote records how it was made.
"""

from __future__ import annotations

import copy
import json
import re
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))  # the bench scripts import their neighbour `common` by that name

from bench import readme_figures, reliability_report  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def generated_block(text: str) -> str:
    return readme_figures.BEGIN + text.split(readme_figures.BEGIN, 1)[1].split(readme_figures.END, 1)[0] + \
        readme_figures.END


def test_readme_performance_figures_are_generated_from_the_results():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert generated_block(readme) == readme_figures.readme_block(readme_figures.load_all()), \
        "README.md's figures differ from bench/results: run python bench/readme_figures.py"
    performance = readme.split("## Performance", 1)[1].split("\n## ", 1)[0]
    outside = performance.replace(generated_block(readme), "")
    assert not re.search(r"\d", outside), "a figure in README's Performance section outside the generated block"


def test_batching_measurements_are_generated_from_the_results():
    doc = (ROOT / "docs" / "BATCHING.md").read_text(encoding="utf-8")
    assert generated_block(doc) == readme_figures.batching_block(readme_figures.load_all()), \
        "docs/BATCHING.md's measurements differ from bench/results: run python bench/readme_figures.py"


def test_reliability_doc_is_the_report_scripts_rendering_of_its_results():
    figures = reliability_report.load_results("reliability")
    assert figures is not None, "bench/results/reliability.json is missing: run python bench/reliability_report.py"
    expected = reliability_report.render(figures, reliability_report.load_results("soak"))
    assert (ROOT / "docs" / "RELIABILITY.md").read_text() == expected, \
        "docs/RELIABILITY.md differs from its results: run python bench/reliability_report.py --render"


QUOTABLE = [path for path in sorted(RESULTS.glob("*.json")) if "provenance" in json.loads(path.read_text())]


@pytest.mark.parametrize("path", QUOTABLE, ids=lambda path: path.name)
def test_results_with_provenance_say_how_they_were_made(path):
    record = json.loads(path.read_text())["provenance"]
    assert record["command"].startswith("python bench/") and re.fullmatch(r"[0-9a-f]{40}", record["git_commit"])
    assert record["machine"]["cpus"] >= 1 and record["versions"]["torch"] and record["versions"]["python"]
    assert len(record["load_average_start"]) == 3 and len(record["load_average_end"]) == 3


def fake_provenance(**machine) -> dict:
    return {"date": "2026-12-01 10:00 UTC", "command": "python bench/gpu_check.py --compile", "git_commit": "a" * 40,
            "git_dirty": False, "machine": {"platform": "Linux", "processor": "x86_64", "cpus": 16, "gpus": [],
                                            **machine},
            "versions": {"python": "3.11.7", "torch": "2.13.0", "transformers": "5.24.0"}, "torch_threads": 16,
            "load_average_start": [0.5, 0.4, 0.3], "load_average_end": [0.6, 0.5, 0.4]}


def test_only_results_with_provenance_are_quoted(tmp_path):
    """A GPU run with provenance becomes the GPU table; the same file without provenance is never quoted."""
    run = json.loads((RESULTS / "gpu_check-nvidia-h200-run1-compile.json").read_text())
    (tmp_path / "gpu_check-old.json").write_text(json.dumps(run))
    assert "await a re-run" in readme_figures.readme_block(readme_figures.load_all(tmp_path))
    quoted = copy.deepcopy(run)
    quoted["provenance"] = fake_provenance(gpus=["NVIDIA H200"])
    (tmp_path / "gpu_check-new.json").write_text(json.dumps(quoted))
    block = readme_figures.readme_block(readme_figures.load_all(tmp_path))
    assert "| 4bit bfloat16 | 5.7 s | 6.24 GiB | 14.2 | 19.3 | 1.36 | 82.0 |  |" in block
    assert "| none bfloat16 | 2.6 s | 17.57 GiB | 24.1 | 20.6 | 0.86 | 111.8 | 118.9 |" in block
    assert "measured 2026-12-01 at commit `aaaaaaa` on NVIDIA H200, load average 0.5" in block
    assert "await a re-run" not in block and "produced the same greedy tokens" in block
