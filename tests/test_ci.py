"""CI runs what README tells a new user to run, in a virtual environment made for the run."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("```", 2)[1]
    command = next(line.strip() for line in quick_start.splitlines() if "python -m pytest" in line)
    assert command == "pip install -r requirements-dev.txt && python -m pytest"
    assert "pip install -r requirements.txt && python app.py" in quick_start
    script = (ROOT / ".ci" / "run").read_text()
    last = [line for line in script.splitlines() if line.strip() and not line.startswith("#")][-1]
    assert last.replace(" -q", "") == command  # exactly the README's command (quietly), as the last step
    code = [line.split("#")[0] for line in script.splitlines()]
    assert any(re.fullmatch(r'\s*python3 -m venv "\$venv"\s*', line) for line in code)  # isolated from the system
    assert 'PATH="$venv/bin:$PATH"' in script and "export CI=true" in script
    assert "trap 'rm -rf \"$venv\"' EXIT" in script  # a new one every run, never reused
