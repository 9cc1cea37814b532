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


def test_every_torch_load_is_weights_only() -> None:
    """No pickle of ours or a checkpoint's runs code: every torch.load passes weights_only=True."""
    calls = []
    for path in sorted(ROOT.rglob("*.py")):
        if ".venv" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                calls.append((str(path.relative_to(ROOT)), node.lineno, safe))
    assert calls and all(safe for *_, safe in calls), [c for c in calls if not c[2]]
