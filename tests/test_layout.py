"""The package layout: convert, calibrate and validate share only core."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("convert", "calibrate", "validate")


def imported_packages(path: Path) -> set[str]:
    """The mlakit subpackages a module imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found |= {n.split(".")[1] for n in names if n.startswith("mlakit.") and n.count(".") >= 1}
    return found


@pytest.mark.parametrize("package", ("core",) + STAGES)
def test_packages_import_only_core(package: str) -> None:
    allowed = {"core", package}
    for path in sorted((ROOT / package).glob("*.py")):
        assert imported_packages(path) <= allowed, f"{path.relative_to(ROOT)} imports {imported_packages(path) - allowed}"
