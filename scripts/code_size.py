"""How big lmrc's code is, as issue reviews measure it: files, lines, code lines (not blank, comment or
docstring), files over 500 lines, functions over 60 lines, and imports inside functions.

    python scripts/code_size.py [PACKAGE_DIR] [--file-limit 500] [--function-limit 60]

A function is measured from its `def` line to the last line of its body (nested functions counted in their
parent too).
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class CodeSize:
    files: int = 0
    lines: int = 0
    code_lines: int = 0
    long_files: list[tuple[int, str]] = field(default_factory=list)
    long_functions: list[tuple[int, str]] = field(default_factory=list)
    inner_imports: list[str] = field(default_factory=list)


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return lines


def _qualified_functions(tree: ast.AST, owner: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{owner}.{node.name}" if owner else node.name
            yield node, name
            yield from _qualified_functions(node, name)
        elif isinstance(node, ast.ClassDef):
            yield from _qualified_functions(node, f"{owner}.{node.name}" if owner else node.name)


def measure(package: Path, file_limit: int = 500, function_limit: int = 60) -> CodeSize:
    size = CodeSize()
    for path in sorted(package.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        rel = str(path.relative_to(package.parent))
        tree = ast.parse(text)
        lines = text.splitlines()
        docs = _docstring_lines(tree)
        size.files += 1
        size.lines += len(lines)
        size.code_lines += sum(
            1
            for i, line in enumerate(lines, 1)
            if line.strip() and not line.strip().startswith("#") and i not in docs
        )
        if len(lines) > file_limit:
            size.long_files.append((len(lines), rel))
        for node, name in _qualified_functions(tree):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > function_limit:
                size.long_functions.append((length, f"{rel}:{node.lineno} {name}"))
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)) and inner is not node:
                    size.inner_imports.append(f"{rel}:{inner.lineno}")
    size.long_files.sort(reverse=True)
    size.long_functions.sort(reverse=True)
    size.inner_imports = sorted(set(size.inner_imports))
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default=str(Path(__file__).resolve().parents[1] / "lmrc"))
    parser.add_argument("--file-limit", type=int, default=500)
    parser.add_argument("--function-limit", type=int, default=60)
    args = parser.parse_args()
    size = measure(Path(args.package), args.file_limit, args.function_limit)
    print(f"{size.files} files, {size.lines} lines, {size.code_lines} code lines")
    print(f"{len(size.long_files)} files over {args.file_limit} lines")
    for n, where in size.long_files:
        print(f"  {n:5d}  {where}")
    print(f"{len(size.long_functions)} functions over {args.function_limit} lines")
    for n, where in size.long_functions:
        print(f"  {n:5d}  {where}")
    print(f"{len(size.inner_imports)} imports inside functions")


if __name__ == "__main__":
    main()
