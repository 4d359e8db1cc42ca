"""The one rule, checked: cores are pure (no IO, clocks, threads or global randomness), and
the device SDK never imports the coordinator or the emulator."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORES = [
    *sorted((ROOT / "edge_sdk" / "core").glob("*.py")),
    ROOT / "coordinator" / "core.py",
    *sorted((ROOT / "coordinator" / "strategies").glob("*.py")),
    *sorted((ROOT / "coordinator" / "peering").glob("*.py")),
    *sorted((ROOT / "edge_sdk" / "wire").glob("*.py")),
]
BANNED_IN_CORES = {"paho", "asyncio", "time", "threading", "socket", "subprocess", "sqlite3", "torch", "pickle"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("path", CORES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cores_are_pure(path: Path) -> None:
    top = {name.split(".")[0] for name in imports(path)}
    assert not top & BANNED_IN_CORES, f"{path.name} imports {top & BANNED_IN_CORES}"
    source = path.read_text()
    for call in ("random.random(", "random.choice(", "random.sample(", "random.shuffle(", "np.random.seed("):
        assert call not in source, f"{path.name} uses the global random ({call})"


def test_edge_sdk_is_installable_alone() -> None:
    for path in sorted((ROOT / "edge_sdk").rglob("*.py")):
        top = {name.split(".")[0] for name in imports(path)}
        assert not top & {"coordinator", "devices", "demos"}, f"{path} imports {top & {'coordinator', 'devices', 'demos'}}"
