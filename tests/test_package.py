"""Architecture guard: packages import downward only, and the library works without Lightning or the
third-party model libraries.

The layers, lowest first (a package may import its own layer's modules and anything below):

0. ``core``: the model protocol, ``LayerNorms``, the ``Metric`` contract, checks, distributed helpers
1. ``engine``: per-sample gradients and their norms
2. ``metrics`` (fitted FIM approximations), ``detectors`` (scores → novelty)
3. ``evaluation`` (scoring loaders, OOD measures), ``attribution`` (saliency, influence)
4. ``run``: the run folder and its files
5. ``viz``: figures and reports read from run folders
6. ``lightning``: the callback, thin glue over everything below
7. ``models``, ``data``: the zoo and its datamodules, Lightning modules that use the callback's logging
8. ``cli``: the command line, models × data × callback
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fimcb

SOURCE = Path(fimcb.__file__).parent
LAYERS = {
    "core": 0,
    "engine": 1,
    "metrics": 2,
    "detectors": 2,
    "evaluation": 3,
    "attribution": 3,
    "run": 4,
    "viz": 5,
    "lightning": 6,
    "models": 7,
    "data": 7,
    "cli": 8,
}


def _package(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return parts[0]


def _fimcb_imports(tree: ast.AST) -> list[tuple[ast.stmt, str]]:
    found: list[tuple[ast.stmt, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fimcb":
            found.append((node, node.module))
        elif isinstance(node, ast.Import):
            found += [(node, a.name) for a in node.names if a.name.split(".")[0] == "fimcb"]
    return found


MODULES = sorted(p for p in SOURCE.rglob("*.py") if p.name != "__init__.py" or p.parent != SOURCE)


def test_every_package_has_a_layer() -> None:
    packages = {_package(p) for p in MODULES}
    assert packages == set(LAYERS), "give a new package its place in LAYERS (and in this file's docstring)"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_imports_go_downward(path: Path) -> None:
    own = _package(path)
    for node, module in _fimcb_imports(ast.parse(path.read_text())):
        target = module.split(".")[1] if "." in module else "fimcb"
        assert target in LAYERS, f"{path.name}:{node.lineno} imports {module}: not a layered package"
        assert LAYERS[target] <= LAYERS[own], (
            f"{path.relative_to(SOURCE)}:{node.lineno} imports {module}: {own} (layer {LAYERS[own]}) may "
            f"not import {target} (layer {LAYERS[target]})"
        )


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_no_imports_inside_functions_to_dodge_cycles(path: Path) -> None:
    """fimcb modules are imported at the top: an import inside a function hides a cycle."""
    for node, module in _fimcb_imports(ast.parse(path.read_text())):
        assert node.col_offset == 0, f"{path.relative_to(SOURCE)}:{node.lineno} imports {module} late"


def _imported_top_level(code: str) -> set[str]:
    probe = f"import sys; {code}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_library_works_without_lightning() -> None:
    loaded = _imported_top_level(
        "import fimcb, fimcb.engine, fimcb.metrics, fimcb.detectors, fimcb.evaluation, fimcb.attribution, "
        "fimcb.run.folder, fimcb.run.history"
    )
    assert not loaded & {"lightning", "pytorch_lightning"}


def test_docs_the_code_cites_are_in_the_repository() -> None:
    """Docstrings cite ``docs/*.md`` of this repository, never files outside it."""
    cited = set()
    for path in MODULES:
        text = path.read_text()
        assert "METHOD.md" not in text and "../shared" not in text, (
            f"{path.name} cites a file outside the repo"
        )
        cited |= set(re.findall(r"docs/[\w-]+\.md", text))
    assert "docs/method.md" in cited
    missing = [doc for doc in cited if not (SOURCE.parents[1] / doc).is_file()]
    assert not missing, f"cited but missing: {missing}"


OPTIONAL = {"transformers", "diffusers", "zuko", "normflows", "wandb", "pandas"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_optional_libraries_are_imported_only_where_used(path: Path) -> None:
    """Rules for transformers and zuko layers are registered by class name and W&B is imported inside the
    functions that log to it: ``import fimcb`` never needs an optional library."""
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        optional = {n.split(".")[0] for n in names} & OPTIONAL
        assert not optional, f"{path.relative_to(SOURCE)}:{node.lineno} imports {optional} at module level"
