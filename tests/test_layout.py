"""The house plan holds: packages import only their own floor or the floors below, and the wheel lists every package."""

import ast
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mimswin"
# Lowest floor first; a module may import its own floor and those below it, never one above.
FLOORS = [("errors", "signals", "presets"), ("config",), ("data", "models"), ("runs",), ("train",), ("eval", "bench"),
          ("programs",), ("cli", "export")]
FLOOR_OF = {name: level for level, names in enumerate(FLOORS) for name in names}


def room(module: str) -> str:
    """`mimswin.data.build` -> `data`: the top-level package or module a dotted name lives in."""
    return module.split(".")[1]


def imports_of(path: Path) -> set:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mimswin."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("mimswin.")}
    return found


def test_every_module_of_the_library_sits_on_a_floor():
    rooms = {p.stem if p.parent == PACKAGE else p.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("*.py")}
    assert rooms - {"__init__"} <= set(FLOOR_OF), sorted(rooms - set(FLOOR_OF))


def test_no_module_imports_a_floor_above_its_own():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        own = path.stem if path.parent == PACKAGE else path.relative_to(PACKAGE).parts[0]
        if own == "__init__":
            continue
        for module in imports_of(path):
            if FLOOR_OF[room(module)] > FLOOR_OF[own]:
                upward.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not upward, upward


def test_the_wheel_lists_every_package_and_maps_the_presets():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {".".join(p.relative_to(ROOT).parent.parts) for p in PACKAGE.rglob("__init__.py")}
    assert set(tool["packages"]) == packages | {"mimswin.presets"}
    assert tool["package-dir"]["mimswin.presets"] == "configs"
    assert all(re.fullmatch(r"[a-z0-9_/]+\.yaml", p.relative_to(ROOT / "configs").as_posix())
               for p in (ROOT / "configs").rglob("*.yaml"))
