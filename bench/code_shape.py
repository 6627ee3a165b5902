"""Print the code's shape: lines per module and the longest functions, then one JSON line.

    python bench/code_shape.py [--top 15] [--limit 80]

Counts the product (`app.py`, `ppo_feedback/`, `db/` without its migrations). A function's length
is its line span, decorators and docstring included; a nested function counts inside its parent
too. The JSON line has the module count, total lines, the longest function and the functions over
`--limit` lines.
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def product_files(root: Path = ROOT) -> list[Path]:
    """Return the product's Python files: app.py, ppo_feedback/ and db/ (migrations aside)."""
    files = [root / "app.py", *sorted((root / "ppo_feedback").rglob("*.py")), *sorted((root / "db").rglob("*.py"))]
    return [f for f in files if "migrations" not in f.relative_to(root).parts]


def function_lengths(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """Return (lines, "file:qualified.name") for every function and method in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel = path.relative_to(root).as_posix()
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([d.lineno for d in child.decorator_list] + [child.lineno])
                found.append((child.end_lineno - start + 1, f"{rel}:{prefix}{child.name}"))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def main() -> dict:
    """Print the module table and the longest functions; return the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=15, help="longest functions to list")
    parser.add_argument("--limit", type=int, default=80, help="report functions longer than this")
    args = parser.parse_args()
    files = product_files()
    sizes = sorted(((len(f.read_text(encoding="utf-8").splitlines()), f.relative_to(ROOT).as_posix()) for f in files),
                   reverse=True)
    functions = sorted((fn for f in files for fn in function_lengths(f)), reverse=True)
    print("| module | lines |\n|---|---|")
    for lines, name in sizes:
        print(f"| {name} | {lines} |")
    print(f"\n| longest functions | lines |\n|---|---|")
    for lines, name in functions[:args.top]:
        print(f"| {name} | {lines} |")
    summary = {"modules": len(files), "lines": sum(n for n, _ in sizes),
               "longest_function": {"name": functions[0][1], "lines": functions[0][0]},
               f"over_{args.limit}": [name for lines, name in functions if lines > args.limit]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
