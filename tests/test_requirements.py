"""Every import of the project is pinned in a requirement file, so a fresh `pip install -r ...` provides it.

The server (app.py, glm4/) may import only what requirements.txt names: `pip install -r requirements.txt &&
python app.py` is all a user runs. Tests and benchmarks may also use requirements-dev.txt. An import that
works only because some other package happens to pull it in (schemathesis 4 stopped installing jsonschema,
and a fresh machine failed) is named here, on the machine where it still works.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

from tests.conftest import ROOT

RUNTIME = ROOT / "requirements.txt"
DEV = ROOT / "requirements-dev.txt"
BENCH = ROOT / "requirements-bench.txt"  # libraries only the comparison benches import (not in CI's venv)
REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*==\s*([^\s;#]+)")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_lines(path: Path) -> list[tuple[Path, str]]:
    """(file, line) of every requirement in the file and the files it includes with -r."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            lines += requirement_lines(path.parent / line.split(maxsplit=1)[1])
        else:
            lines.append((path, line))
    return lines


def pinned(path: Path) -> set[str]:
    return {normalize(REQUIREMENT.match(line).group(1)) for _, line in requirement_lines(path)
            if REQUIREMENT.match(line)}


def is_optional(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """An import inside `try: ... except ImportError` is optional by design (e.g. triton on CUDA only)."""
    while node in parents:
        child, node = node, parents[node]
        if isinstance(node, ast.Try) and child in node.body:
            for handler in node.handlers:
                caught = handler.type
                names = [caught] if not isinstance(caught, ast.Tuple) else list(caught.elts)
                if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
                    return True
    return False


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of the absolute, non-optional imports of one file that are neither stdlib nor ours."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    ours = {p.stem for p in ROOT.iterdir() if p.suffix == ".py" or (p.is_dir() and not p.name.startswith("."))}
    ours |= {p.stem for folder in ("tests", "bench") for p in (ROOT / folder).glob("*.py")}  # bench/x.py imports
    # its neighbours by name (`from common import ...`), and tests import bench scripts the same way
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules = [node.module]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            if top not in sys.stdlib_module_names and top != "__future__" and top not in ours \
                    and not is_optional(node, parents):
                names.add(top)
    return names


def unlisted(files: list[Path], allowed: set[str]) -> list[str]:
    """'module (file): why' for every import whose distribution no allowed requirement names."""
    owners = metadata.packages_distributions()
    problems = []
    for path in files:
        for module in sorted(third_party_imports(path)):
            distributions = {normalize(d) for d in owners.get(module, [])}
            # a bench-only library is not installed in CI's venv: then its import name is its pinned name
            if not distributions & allowed and (distributions or normalize(module) not in allowed):
                why = (f"installed here by {', '.join(sorted(distributions))}, named in no requirement file"
                       if distributions else "not installed here and named in no requirement file")
                problems.append(f"{module} ({path.relative_to(ROOT)}): {why}")
    return problems


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_every_requirement_is_pinned_to_one_version():
    loose = [f"{path.name}: {line}" for path, line in [*requirement_lines(DEV), *requirement_lines(BENCH)]
             if not REQUIREMENT.match(line)]
    assert not loose, "pin exact versions (name==X.Y.Z):\n" + "\n".join(loose)


def test_server_imports_are_in_requirements_txt():
    problems = unlisted([ROOT / "app.py", *python_files("glm4")], pinned(RUNTIME))
    assert not problems, "add these to requirements.txt, pinned:\n" + "\n".join(problems)


def test_test_and_bench_imports_are_in_a_requirement_file():
    problems = unlisted(python_files("tests", "bench"), pinned(RUNTIME) | pinned(DEV) | pinned(BENCH))
    assert not problems, "add these to requirements-dev.txt (or requirements-bench.txt), pinned:\n" + \
        "\n".join(problems)
