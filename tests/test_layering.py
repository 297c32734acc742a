"""Layering: every vmferry module imports alone (no cycle hides behind an import order),
and the lower layers import nothing above them, not even lazily inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vmferry"
# Each layer may import only from the layers before it in this list (and itself).
LAYERS = [
    ("vmferry.errors", "vmferry.sizes", "vmferry.state_dir"),
    ("vmferry.memory", "vmferry.kvm"),
    ("vmferry.devices",),
    ("vmferry.machine",),
]
# The QMP layer, the engine, the controller and the CLI sit on top of these: a device
# raises its own errors, and the QMP boundary translates them.
ABOVE_ALL_LAYERS = (
    "vmferry.qmp",
    "vmferry.migration",
    "vmferry.controller",
    "vmferry.arrival",
    "vmferry.host_commands",
    "vmferry.cli",
    "vmferry.bench",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> list[str]:
    return sorted(module_name(p) for p in SRC.rglob("*.py") if p.name != "__main__.py")


def layer_of(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def vmferry_imports(tree: ast.AST) -> list[tuple[int, str, bool]]:
    """(line, module, inside a function) for every import of a vmferry module."""
    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("vmferry"):
                found.append((child.lineno, str(child.module), in_function))
            elif isinstance(child, ast.Import):
                found.extend(
                    (child.lineno, a.name, in_function)
                    for a in child.names
                    if a.name.startswith("vmferry")
                )
            visit(child, nested)

    visit(tree, False)
    return found


def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    """One interpreter, each module imported with no vmferry module loaded before it: a
    cycle shows as a partially initialised module whichever module comes first."""
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {all_modules()!r}:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] == 'vmferry']:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        failed.append(f'{name}: {e!r}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: module_name(p))
def test_lower_layers_import_nothing_above_them(path: Path) -> None:
    here = module_name(path)
    mine = layer_of(here)
    if mine is None:
        return  # above the layers: free to import them
    for line, target, lazy in vmferry_imports(ast.parse(path.read_text())):
        where = f"{path.relative_to(SRC.parent)}:{line} imports {target}"
        theirs = layer_of(target)
        assert not target.startswith(ABOVE_ALL_LAYERS), f"{where}, a layer above it"
        assert theirs is None or theirs <= mine, f"{where}, a layer above it"
        # A function-level import of vmferry is how a cycle hides: none in these layers.
        assert not lazy, f"{where} inside a function"


def test_the_layer_check_sees_a_lazy_upward_import() -> None:
    tree = ast.parse("def f():\n    from vmferry.machine.config import parse_size\n")
    assert vmferry_imports(tree) == [(2, "vmferry.machine.config", True)]
    assert layer_of("vmferry.machine.config") == 3
    assert layer_of("vmferry.devices.base") == 2
    assert layer_of("vmferry.migration.source") is None
