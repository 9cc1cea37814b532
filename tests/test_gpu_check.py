"""scripts/gpu_check.sh in its reduced CPU form, so that the device check itself keeps working."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_AVAILABLE

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not DEMO_AVAILABLE, reason="the bundled demo model is missing")
def test_device_check_runs_on_the_cpu_in_its_tiny_form(tmp_path: Path) -> None:
    results = tmp_path / "results.md"
    env = {**os.environ, "PYTHON": sys.executable, "MLAKIT_DEVICE": "cpu", "MLAKIT_TINY": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--results", str(results)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = results.read_text()
    assert "PASS demo equals the CPU conversion" in text and "0 failure(s)" in text
    for step in ("convert demo on cpu", "calibrate layerwise on cpu, multi-document rows",
                 "calibrate distill on cpu, multi-document rows",
                 "calibrate distill on cpu, multi-document rows (cached top-64 teacher)",
                 "validate demo on cpu, loaded whole"):
        assert f"- time {step}" in text, text
    assert "tokens/s" in text
