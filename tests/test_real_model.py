"""Approximate where it must be, on a real pretrained model: SmolLM2-135M-Instruct (30 layers, 9 query
and 3 kv heads of 64), opt-in: it runs when `python scripts/fetch_smollm2.py` has put the model in
its cache folder (or MLAKIT_SMOLLM2 names one), and skips otherwise.

Calibration on the bundled docstrings' first 90%, evaluation on their last 10%. The bound is
loose against what benchmarks/bench_quality.py measures at the defaults (docs/real-models.md),
because this test calibrates on few tokens to stay short.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlakit.convert.pipeline import ConvertOptions, convert
from mlakit.core.text import DEFAULT_TEXT, token_windows

SMOLLM2 = Path(os.environ.get("MLAKIT_SMOLLM2", Path.home() / ".cache" / "mlakit" / "SmolLM2-135M-Instruct"))
pytestmark = pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(),
                                reason="SmolLM2 not fetched (python scripts/fetch_smollm2.py)")


@torch.no_grad()
def perplexity(folder: Path, windows: torch.Tensor) -> float:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return math.exp(sum(model(w[None], labels=w[None]).loss.item() for w in windows) / len(windows))


def test_half_cache_one_shot_on_a_real_model(tmp_path: Path) -> None:
    text = DEFAULT_TEXT.read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    calib = tmp_path / "calib.txt"
    calib.write_text(text[:cut], encoding="utf-8")
    windows = token_windows(AutoTokenizer.from_pretrained(SMOLLM2), text[cut:], 4096, 256, what="evaluation")
    opts = ConvertOptions(kv_lora_rank=128, calib_text=[calib], calib_tokens=4096, calib_seq_len=512, dtype="fp32")
    record = convert(str(SMOLLM2), tmp_path / "out", opts, log=lambda m: None)
    source, converted = perplexity(SMOLLM2, windows), perplexity(tmp_path / "out", windows)
    assert record["kv_cache"]["reduction_percent"] == 50.0
    assert converted < 1.25 * source, (source, converted)
