"""The package's folders form layers: code imports only from its own folder or from a lower
layer, so there is no import circle between folders, the driver side and the worker side
meet only in the shared vocabulary (`messages.py`), and pure planning and scheduling load
neither torch nor model code.

Checked twice: statically (every import in every module, also the ones inside functions,
except type-only imports under `if TYPE_CHECKING:`), and for real in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import distinfer

PACKAGE = Path(distinfer.__file__).parent

#: lowest first; a unit may import its own modules and those of lower layers only
LAYERS: list[set[str]] = [
    {"errors", "logs"},
    {"messages"},
    {"data"},  # the block plan is pure arithmetic the planner shares with `run`
    {"config", "planning"},
    {"models", "scheduling", "report"},
    {"worker"},
    {"backends"},
    {"driver"},
    {"serving"},
    {"simulation"},
    {"api"},
    {"cli", "__init__"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str:
    """'distinfer.models.family' -> 'models'; 'distinfer' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, name: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every distinfer import that runs in module `name` at `path`
    (type-only ones skipped)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names if a.name.startswith("distinfer"))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    target = child.module or ""
                if target.startswith("distinfer"):
                    if target == "distinfer" or (child.level and not child.module):
                        found.extend((child.lineno, f"{target}.{a.name}") for a in child.names)
                    else:
                        found.append((child.lineno, target))
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def test_every_folder_imports_only_itself_and_lower_layers() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 40
    wrong = []
    for path in modules:
        unit = _unit(_module_name(path))
        assert unit in LAYER, f"{path}: folder '{unit}' has no layer in this test; add it to LAYERS"
        for line, target in _imports(path, _module_name(path)):
            other = _unit(target)
            if other == unit:
                continue
            if LAYER[other] >= LAYER[unit]:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({unit}, layer {LAYER[unit]}) imports "
                             f"{target} ({other}, layer {LAYER[other]})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_check_sees_lazy_and_relative_imports_but_not_type_only_ones(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "from .cuts import LayerCost\n"
        "if TYPE_CHECKING:\n    from ..models.family import ModelSpec\n"
        "def f():\n    from ..worker import replica\n    import distinfer.driver.job\n"
    )
    found = _imports(probe, "distinfer.planning.probe")
    assert found == [(2, "distinfer.planning.cuts"), (6, "distinfer.worker"), (7, "distinfer.driver.job")]


_PROBE = """
import json, sys
before = set(sys.modules)
import importlib
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(set(sys.modules) - before)))
"""


@pytest.mark.parametrize(("package", "forbidden"), [
    ("distinfer.planning", ("torch", "distinfer.models", "distinfer.worker", "numpy")),
    ("distinfer.scheduling", ("torch", "distinfer.models", "distinfer.worker", "distinfer.backends", "numpy")),
    ("distinfer.messages", ("torch", "distinfer.models", "distinfer.data", "numpy")),
    ("distinfer.models", ("torch", "distinfer.worker", "distinfer.driver", "distinfer.serving")),
    ("distinfer.driver.layout", ("torch", "distinfer.worker", "distinfer.serving")),
    ("distinfer.worker", ("distinfer.driver", "distinfer.backends", "distinfer.serving", "distinfer.scheduling")),
    ("distinfer", ("torch", "distinfer.driver", "distinfer.worker", "distinfer.serving.server")),
])
def test_importing_a_package_loads_nothing_above_it(package: str, forbidden: tuple[str, ...]) -> None:
    result = subprocess.run([sys.executable, "-c", _PROBE, package], capture_output=True, text=True, timeout=120,
                            check=True)
    loaded = json.loads(result.stdout)
    assert package in loaded or package == "distinfer"
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not bad, f"importing {package} loaded {bad}"
