"""The layout the code keeps: the app apart from its tooling, the PPO maths apart from the package."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = [ROOT / "app.py", *sorted((ROOT / "ppo_feedback").glob("*.py"))]


def imported_modules(path: Path) -> set[str]:
    """Return the modules a file imports (`from . import x` as `.`, `from .config import y` as `.config`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_the_app_never_imports_the_simulator():
    for path in APP:
        assert not any(m == "simulator" or m.startswith("simulator.") for m in imported_modules(path)), path


def test_the_store_package_never_imports_pytest():
    for path in sorted((ROOT / "db").rglob("*.py")):
        assert not any(m.split(".")[0] == "pytest" for m in imported_modules(path)), path


def test_the_ppo_maths_imports_nothing_from_the_package():
    modules = imported_modules(ROOT / "ppo_feedback" / "ppo.py")
    assert not any(m.startswith(".") or m.split(".")[0] == "ppo_feedback" for m in modules), modules


def test_no_command_line_drops_unknown_options():
    for path in [*APP, *sorted((ROOT / "db").rglob("*.py")), *sorted((ROOT / "simulator").glob("*.py")),
                 *sorted((ROOT / "bench").glob("*.py"))]:
        assert "parse_known_args" not in path.read_text(), path
