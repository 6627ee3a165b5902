"""The layout the code keeps: the app apart from its tooling, the PPO maths apart from the package,
a torch-free store, functions of a screen, a trainer that scores through its protocol."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = [ROOT / "app.py", *sorted((ROOT / "ppo_feedback").rglob("*.py"))]
LONGEST_FUNCTION = 80
"""Lines a function of the product may span (`bench/code_shape.py` counts them)."""


def _code_shape():
    spec = importlib.util.spec_from_file_location("code_shape", ROOT / "bench" / "code_shape.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_the_store_package_imports_neither_pytest_nor_torch():
    for path in sorted((ROOT / "db").rglob("*.py")):
        assert not any(m.split(".")[0] in ("pytest", "torch") for m in imported_modules(path)), path


def test_the_ppo_maths_imports_nothing_from_the_package():
    for name in ("ppo.py", "objectives.py"):
        modules = imported_modules(ROOT / "ppo_feedback" / name)
        assert not any(m.startswith(".") or m.split(".")[0] == "ppo_feedback" for m in modules), (name, modules)


def test_no_command_line_drops_unknown_options():
    for path in [*APP, *sorted((ROOT / "db").rglob("*.py")), *sorted((ROOT / "simulator").glob("*.py")),
                 *sorted((ROOT / "bench").glob("*.py"))]:
        assert "parse_known_args" not in path.read_text(), path


def test_no_function_of_the_product_is_longer_than_a_screen():
    shape = _code_shape()
    too_long = [(name, lines) for path in shape.product_files()
                for lines, name in shape.function_lengths(path) if lines > LONGEST_FUNCTION]
    assert too_long == []


def test_the_trainer_scores_through_its_protocol():
    assert "hasattr(reward_fn" not in (ROOT / "ppo_feedback" / "trainer.py").read_text()
