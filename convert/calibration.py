"""The calibration windows of a conversion: by default half text sampled from the source model and
half the bundled mix of prose, code and fifteen languages (data/README.md); or the user's text, or
the user's text and the default set half and half; and the share of them held out to choose and
to report on.

Every choice a conversion makes from data (the o_proj refit and its ridge, the rope strategy) is
judged on held-out windows that were not fitted on, so that a choice that only fits the
calibration text loses; the held-out rows are every k-th window, so each source is represented in
both parts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mlakit.core.sampling import SampleSettings, sample_windows
from mlakit.core.text import MIX_TEXT, bos_token, interleave, text_windows


@dataclass
class CalibrationSet:
    """Windows (rows, seq_len) whose last `held_out` rows are held out, and what mlakit.json records."""

    windows: torch.Tensor
    held_out: int
    record: dict

    @property
    def fit_rows(self) -> int:
        return self.windows.shape[0] - self.held_out

    def first(self, rows: int) -> CalibrationSet:
        """A smaller set with the same held-out share (the rope-strategy probe)."""
        rows = min(rows, self.windows.shape[0])
        held = min(self.held_out, max(1, round(rows * self.held_out / self.windows.shape[0]))) if self.held_out else 0
        fit = rows - held
        return CalibrationSet(torch.cat([self.windows[:fit], self.windows[self.fit_rows:self.fit_rows + held]]), held,
                              self.record)


def held_out_split(windows: torch.Tensor, share: float) -> tuple[torch.Tensor, int]:
    """Every k-th row (k = 1 / share) moved to the end; returns the windows and the held-out count."""
    n = windows.shape[0]
    if share <= 0 or n < 2:
        return windows, 0
    step = min(n, max(2, round(1 / share)))
    held = torch.arange(step - 1, n, step)
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    return torch.cat([windows[keep], windows[held]]), len(held)


def token_shares(tokens: int, text: list[Path] | None, mix: bool) -> tuple[int, int, int]:
    """(the user's text, the bundled mix, sampled) calibration tokens. The default set is half the
    bundled mix and half text sampled from the model; `text` replaces it, or with `mix` takes half
    of the tokens and leaves the default set the other half."""
    if text and not mix:
        return tokens, 0, 0
    default = tokens // 2 if text else tokens
    bundled = default // 2
    return tokens - default, bundled, default - bundled


def calibration_set(folder: Path, tokenizer, *, text: list[Path] | None, mix: bool, tokens: int, seq_len: int,
                    bos: bool, sampling: SampleSettings, held_out: float, device: str,
                    log: Callable[[str], None] | None = None) -> CalibrationSet:
    """The windows a conversion calibrates on (`token_shares` says how many of each source), rows of
    the sources interleaved, with the held-out share moved to the end."""
    parts, sources = [], []
    n_text, n_bundled, n_sampled = token_shares(tokens, text, mix)
    for paths, n, lead in ((text, n_text, bos), ([MIX_TEXT], n_bundled, False)):
        if n:
            ids, name, sha256 = text_windows(tokenizer, paths, n, seq_len, lead=bos_token(tokenizer) if lead else None)
            parts.append(ids)
            sources.append({"kind": "text", "text": name, "sha256": sha256, "tokens": int(ids.numel()), "bos": lead})
    if n_sampled:
        ids, record = sample_windows(folder, tokenizer, sampling, max(1, n_sampled // seq_len), device, log)
        parts.append(ids)
        sources.append({**record, "tokens": int(ids.numel())})
    windows = interleave(parts)
    windows, held = held_out_split(windows, held_out)
    record = {"sources": sources, "tokens": int(windows.numel()), "seq_len": seq_len,
              "held_out_tokens": held * seq_len}
    return CalibrationSet(windows, held, record)


def describe(record: dict) -> str:
    """One line naming the calibration sources, for the summary."""
    parts = []
    for s in record["sources"]:
        if s["kind"] == "text":
            parts.append(f"{s['tokens']} tokens of {s['text']} (sha256 {s['sha256'][:12]})"
                         + (", each window led by the BOS token" if s.get("bos") else ""))
        else:
            parts.append(f"{s['tokens']} tokens sampled from the source model (temperature {s['temperature']:g}, "
                         f"seed {s['seed']}, {'chat template' if s['chat_template'] else 'plain prompts'}"
                         + (", cached" if s.get("cached") else "") + ")")
    return " + ".join(parts) + f"; {record['held_out_tokens']} of {record['tokens']} held out"
