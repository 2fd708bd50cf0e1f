"""The package reads in layers: entry points -> loop -> startup -> parts -> config. No import runs back up.

Each module of ``train/`` is given a layer here; a module may import from its own layer or a
lower one. The dataset tools are commands (the top layer), so the loaders never depend on them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO

PACKAGE = REPO / "train"
# Lower layers first. A module not listed is an error: a new module must be placed.
LAYERS = {
    "base": ["errors", "files", "config"],
    "parts": ["data", "optim", "models", "checkpoint", "export", "validation", "tracking", "progress",
              "preemption", "peers", "rundir", "micro_batch", "initial_weights", "profiling", "wandb_tracking",
              "cost", "mixing"],
    "startup": ["startup"],
    "loop": ["loop"],
    "entry points": ["cli", "__main__", "config_reference", "evaluate", "hub", "report", "sweep", "benchmark",
                     "dataset_tools", "preflight"],
}
RANK = {name: rank for rank, names in enumerate(LAYERS.values()) for name in names}


def top_name(module: str) -> str:
    """``train.data.hf`` -> ``data``: the layer is decided by the first component under train/."""
    return module.split(".")[1]


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return [(name, path) for name, path in found if name != "train"]


def imported_train_modules(name: str, path: Path) -> set[str]:
    """The ``train.*`` modules that ``name`` imports, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] if node.module else [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t.startswith("train.")}
    return found


@pytest.mark.parametrize("name, path", modules(), ids=[name for name, _ in modules()])
def test_imports_run_down_the_layers_only(name, path):
    assert top_name(name) in RANK, f"{name}: place it in a layer of tests/test_layout.py"
    upward = [target for target in imported_train_modules(name, path)
              if top_name(target) != top_name(name) and RANK[top_name(target)] > RANK[top_name(name)]]
    assert not upward, f"{name} imports from a higher layer: {upward}"


def test_the_loaders_do_not_depend_on_the_dataset_tools():
    for name, path in modules():
        if top_name(name) == "data":
            assert not [t for t in imported_train_modules(name, path) if top_name(t) == "dataset_tools"], name


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule is real: a loader module importing the dataset tools is caught."""
    module = tmp_path / "train" / "data" / "bad.py"
    module.parent.mkdir(parents=True)
    module.write_text("from ..dataset_tools import prepare\nfrom ..loop import fit\n")
    assert imported_train_modules("train.data.bad", module) == {"train.dataset_tools", "train.loop"}
