"""The layering, checked on every package: imports only run downwards.

    demos/  (CLI, apps)          may import anything below
    devices/ (emulation, fleets) may import coordinator, edge_sdk — never demos
    coordinator/                 may import edge_sdk — never devices, demos
    edge_sdk/                    imports none of the above (installable alone)
    benchmarks/                  never demos

and the cores (device and coordinator cores, strategies, peering, methods, wire) are pure:
no IO, clocks, threads or global randomness. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORES = [
    *sorted((ROOT / "edge_sdk" / "core").glob("*.py")),
    ROOT / "coordinator" / "core.py",
    ROOT / "coordinator" / "gate.py",
    ROOT / "coordinator" / "canary.py",
    ROOT / "coordinator" / "methods.py",
    *sorted((ROOT / "coordinator" / "strategies").glob("*.py")),
    *sorted((ROOT / "coordinator" / "peering").glob("*.py")),
    *sorted((ROOT / "edge_sdk" / "wire").glob("*.py")),
]
BANNED_IN_CORES = {"paho", "asyncio", "time", "threading", "socket", "subprocess", "sqlite3", "torch", "pickle"}
FORBIDDEN: dict[str, set[str]] = {
    "edge_sdk": {"coordinator", "devices", "demos"},
    "coordinator": {"devices", "demos"},
    "devices": {"demos"},
    "benchmarks": {"demos"},
    "examples": {"coordinator", "devices", "demos", "benchmarks"},  # an app's own package: the SDK only
}
"""Package → the top-level packages it must not import."""
UNLAYERED = {"demos", "tests", "docs", "deploy", "build"}
"""The top of the stack (and non-code folders): they may import anything. ``build``: the copy
of the packages ``pip install .`` leaves in a checkout (helper-97: it failed this test)."""
SEEDED_RANDOM = {"Random"}
SEEDED_NP_RANDOM = {"default_rng", "Generator", "SeedSequence", "PCG64"}


def imports(source: str) -> set[str]:
    """Every absolute module imported anywhere in ``source`` (function bodies included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def layer_violations(package: str, source: str) -> set[str]:
    return {name for name in imports(source) if name.split(".")[0] in FORBIDDEN.get(package, set())}


def impurities(source: str) -> set[str]:
    """IO modules and uses of the global random (``random.random()``, ``from random import
    choice``, ``np.random.seed``) in a core's source; ``random.Random(seed)`` is fine."""
    tree = ast.parse(source)
    found = {name for name in imports(source) if name.split(".")[0] in BANNED_IN_CORES}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "random":
            found |= {f"from random import {a.name}" for a in node.names if a.name not in SEEDED_RANDOM}
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "random" \
                and node.attr not in SEEDED_RANDOM:
            found.add(f"random.{node.attr}")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            inner = node.value
            if isinstance(inner.value, ast.Name) and inner.value.id in ("np", "numpy") and inner.attr == "random" \
                    and node.attr not in SEEDED_NP_RANDOM:
                found.add(f"np.random.{node.attr}")
    return found


def python_files(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if ".venv" not in p.parts)


@pytest.mark.parametrize("path", CORES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cores_are_pure(path: Path) -> None:
    found = impurities(path.read_text())
    assert not found, f"{path.relative_to(ROOT)} is not pure: {sorted(found)}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_only_run_downwards(package: str) -> None:
    bad = {str(p.relative_to(ROOT)): sorted(v) for p in python_files(package) if (v := layer_violations(package, p.read_text()))}
    assert not bad, f"{package} imports upwards: {bad}"


def test_every_package_has_a_layer() -> None:
    """A new top-level package must be placed in FORBIDDEN (or UNLAYERED) to be checked."""
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and any(p.rglob("*.py"))}
    assert packages - set(FORBIDDEN) - UNLAYERED == set()


@pytest.mark.parametrize(
    ("package", "source", "caught"),
    [
        ("devices", "def f():\n    from demos.emulate import parse_seeds\n", True),
        ("edge_sdk", "import coordinator.core\n", True),
        ("coordinator", "from devices.simulator import Simulation\n", True),
        ("coordinator", "from edge_sdk.spec import Vector\n", False),
        ("devices", "from coordinator.methods import make_method\n", False),
    ],
)
def test_the_layer_check_catches_upward_imports(package: str, source: str, caught: bool) -> None:
    assert bool(layer_violations(package, source)) is caught


@pytest.mark.parametrize(
    ("source", "caught"),
    [
        ("import random\nx = random.random()\n", True),
        ("from random import choice\n", True),
        ("import numpy as np\nnp.random.seed(0)\n", True),
        ("import time\n", True),
        ("def f():\n    import threading\n", True),
        ("import random\nrng = random.Random(7)\n", False),
        ("import numpy as np\ng = np.random.default_rng(7)\n", False),
    ],
)
def test_the_purity_check_catches_io_and_global_random(source: str, caught: bool) -> None:
    assert bool(impurities(source)) is caught
