"""Write evaluation text of Python code that no default calibration reads: standard-library modules
with their docstrings removed (the bundled calibration text is the standard library's docstrings).

    python scripts/stdlib_code.py --out code.txt

The modules are a fixed list, concatenated in order; what a file holds depends on the Python
version that runs this, so tables say which one.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from pathlib import Path

MODULES = ["inspect", "typing", "argparse", "dataclasses", "pathlib", "subprocess", "tarfile", "zipfile",
           "logging", "configparser", "difflib", "enum", "functools", "textwrap", "shutil", "tempfile"]


def without_docstrings(source: str) -> str:
    """The source with every module, class and function docstring's lines removed."""
    drop: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                drop.update(range(first.lineno, first.end_lineno + 1))
    return "".join(line for i, line in enumerate(source.splitlines(keepends=True), 1) if i not in drop)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    parts = []
    for name in MODULES:
        origin = importlib.util.find_spec(name).origin
        parts.append(without_docstrings(Path(origin).read_text(encoding="utf-8")))
    args.out.write_text("\n\n".join(parts), encoding="utf-8")
    print(f"{args.out}: {sum(map(len, parts))} characters of {len(MODULES)} modules (Python "
          f"{sys.version.split()[0]})")


if __name__ == "__main__":
    main()
