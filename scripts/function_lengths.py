"""List the longest functions of a package (lines from `def` to the last line of the body), longest first.

    python scripts/function_lengths.py [PACKAGE_DIR] [--top N]

Used by tests/test_structure.py: the longest functions of lmrc stay under a limit, or say in their docstring why
they are long.
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FunctionLength:
    path: Path
    line: int
    name: str  # Class.method for methods
    lines: int
    docstring: str


def function_lengths(package: Path) -> list[FunctionLength]:
    """Every function and method under `package`, longest first."""
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node, owner in _functions(tree):
            name = f"{owner}.{node.name}" if owner else node.name
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            found.append(FunctionLength(path, node.lineno, name, lines, ast.get_docstring(node) or ""))
    return sorted(found, key=lambda f: (-f.lines, str(f.path), f.line))


def _functions(tree: ast.AST, owner: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, owner
            yield from _functions(node, owner)
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, node.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default=str(Path(__file__).resolve().parents[1] / "lmrc"))
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    root = Path(args.package)
    for f in function_lengths(root)[: args.top]:
        print(f"{f.lines:5d}  {f.path.relative_to(root.parent)}:{f.line}  {f.name}")


if __name__ == "__main__":
    main()
