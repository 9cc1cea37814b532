"""The calibration set: held-out rows, mixed sources, and text sampled from the source model."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from conftest import make_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlakit.convert.calibration import CalibrationSet, calibration_set, held_out_split
from mlakit.core.sampling import (
    BATCH_ROWS,
    PROMPTS,
    SampleSettings,
    _generate,
    cache_path,
    cached_rows,
    prompt_ids,
    sample_windows,
)
from mlakit.core.text import interleave


def test_every_kth_row_is_held_out_at_the_end() -> None:
    rows = torch.arange(16)[:, None].expand(16, 4)
    windows, held = held_out_split(rows, 0.25)
    assert held == 4
    assert windows[-4:, 0].tolist() == [3, 7, 11, 15]
    assert sorted(windows[:, 0].tolist()) == list(range(16))
    assert held_out_split(rows, 0.0)[1] == 0 and held_out_split(rows[:1], 0.25)[1] == 0


def test_a_prefix_keeps_the_held_out_share() -> None:
    windows, held = held_out_split(torch.arange(64)[:, None], 0.125)
    part = CalibrationSet(windows, held, {}).first(16)
    assert part.windows.shape[0] == 16 and part.held_out == 2
    assert set(part.windows[-2:, 0].tolist()) <= set(windows[-held:, 0].tolist())


def test_mixed_sources_alternate_in_proportion() -> None:
    a, b = torch.zeros(6, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long)
    mixed = interleave([a, b])[:, 0].tolist()
    assert sorted(mixed) == [0] * 6 + [1] * 2
    assert mixed[:4].count(1) == 1 and mixed[4:].count(1) == 1


@pytest.fixture(scope="module")
def pico_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("sampling") / "pico")


def test_batched_decoding_follows_each_prompt_alone(pico_source: Path) -> None:
    """Left padding, positions and the KV cache: near-greedy batched sampling of prompts of several
    lengths gives, for every row, the tokens a plain forward pass of that row alone predicts."""
    model = AutoModelForCausalLM.from_pretrained(pico_source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(pico_source)
    starts = prompt_ids(tokenizer, chat=True)[:4]
    assert len({len(s) for s in starts}) > 1
    rows = _generate(model, starts, 48, 1e-6, torch.Generator().manual_seed(0))
    assert rows.shape == (4, 48)
    with torch.no_grad():
        for row, start in zip(rows, starts):
            assert row[:len(start)].tolist() == start
            predicted = model(row[None]).logits[0].argmax(-1)
            assert torch.equal(predicted[len(start) - 1:-1], row[len(start):])


def test_returning_freed_memory_during_decoding_changes_no_sample(pico_source: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding hands freed heap pages back every TRIM_EVERY steps (core/sampling.py): at every step or
    never, the same seed gives the same rows."""
    import mlakit.core.sampling as sampling

    model = AutoModelForCausalLM.from_pretrained(pico_source, dtype=torch.float32).eval()
    starts = prompt_ids(AutoTokenizer.from_pretrained(pico_source), chat=True)[:4]
    rows = []
    for every in (1, sampling.TRIM_EVERY, 10**9):
        monkeypatch.setattr(sampling, "TRIM_EVERY", every)
        rows.append(_generate(model, starts, 40, 1.0, torch.Generator().manual_seed(5)))
    assert all(torch.equal(rows[0], r) for r in rows[1:])


def test_samples_are_cached_per_model_and_settings(pico_source: Path) -> None:
    """A second request is read from the cache; a larger one samples only the missing batches, and
    its first rows are those of the smaller request; another seed samples other text."""
    tokenizer = AutoTokenizer.from_pretrained(pico_source)
    settings = SampleSettings(seq_len=32, seed=3)
    ids, record = sample_windows(pico_source, tokenizer, settings, 4)
    assert ids.shape == (4, 32) and not record["cached"] and record["prompts"] == list(PROMPTS)
    again, record = sample_windows(pico_source, tokenizer, settings, 4)
    assert record["cached"] and torch.equal(ids, again)
    more, record = sample_windows(pico_source, tokenizer, settings, BATCH_ROWS + 2)
    assert not record["cached"] and more.shape[0] == BATCH_ROWS + 2 and torch.equal(more[:4], ids)
    assert cached_rows(cache_path(pico_source, settings)) == 2 * BATCH_ROWS
    other, record = sample_windows(pico_source, tokenizer, SampleSettings(seq_len=32, seed=4), 4)
    assert not record["cached"] and not torch.equal(ids, other)


def test_samples_are_drawn_in_the_fastest_stored_dtype(pico_source: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 source is sampled in bf16 where the device multiplies bf16 at least as fast as float32
    (AMX, GPUs) and in float32 elsewhere: the tokens are those of the model in that dtype, the
    record names it, and the two are cached apart (they are other tokens)."""
    import mlakit.core.sampling as sampling

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(pico_source, dtype=torch.bfloat16).save_pretrained(bf16)
    tokenizer = AutoTokenizer.from_pretrained(pico_source)
    tokenizer.save_pretrained(bf16)
    settings = SampleSettings(seq_len=16, seed=5)
    paths = set()
    for fast in (torch.bfloat16, torch.float32):
        monkeypatch.setattr(sampling, "run_dtype", lambda device, stored, fast=fast: fast)
        ids, record = sample_windows(bf16, tokenizer, settings, BATCH_ROWS)
        assert record["dtype"] == str(fast).removeprefix("torch.") and not record["cached"]
        model = AutoModelForCausalLM.from_pretrained(bf16, dtype=fast).eval()
        starts = [prompt_ids(tokenizer, settings.chat)[i % len(PROMPTS)] for i in range(BATCH_ROWS)]
        expected = _generate(model, starts, 16, 1.0, torch.Generator().manual_seed(settings.seed * 1_000_003))
        assert torch.equal(ids, expected)
        paths.add(cache_path(bf16, settings))
    assert len(paths) == 2


def test_an_interrupted_sampling_run_keeps_its_finished_batches(pico_source: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling a large model takes minutes a batch: a run stopped in its second batch leaves the first
    in the cache, and the next run samples only what is missing, the same rows as an unbroken run."""
    import mlakit.core.sampling as sampling

    tokenizer = AutoTokenizer.from_pretrained(pico_source)
    settings = SampleSettings(seq_len=16, seed=7)
    calls = []

    def stop_at_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _generate(*args, **kwargs)

    monkeypatch.setattr(sampling, "_generate", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        sample_windows(pico_source, tokenizer, settings, 2 * BATCH_ROWS)
    assert cached_rows(cache_path(pico_source, settings)) == BATCH_ROWS
    monkeypatch.setattr(sampling, "_generate", _generate)
    resumed, record = sample_windows(pico_source, tokenizer, settings, 2 * BATCH_ROWS)
    cache_path(pico_source, settings).unlink()
    unbroken, _ = sample_windows(pico_source, tokenizer, settings, 2 * BATCH_ROWS)
    assert not record["cached"] and torch.equal(resumed, unbroken)


def test_sampling_reports_progress_within_a_batch(pico_source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One batch of a large model takes many minutes: a log (stderr not a terminal) hears of it every
    LOG_EVERY decode steps, not only once the batch is saved."""
    import mlakit.core.sampling as sampling

    monkeypatch.setattr(sampling, "LOG_EVERY", 8)
    tokenizer = AutoTokenizer.from_pretrained(pico_source)
    lines: list[str] = []
    sample_windows(pico_source, tokenizer, SampleSettings(seq_len=40, seed=11), BATCH_ROWS, log=lines.append)
    steps = 40 - min(map(len, prompt_ids(tokenizer, chat=True)))
    assert steps >= 16
    assert [line.split(", ")[1] for line in lines[:-1]] == [f"{n} tokens each so far" for n in range(8, steps + 1, 8)]
    assert all(line.startswith(f"sampling calibration text from the model: rows 1-{BATCH_ROWS}") for line in lines[:-1])
    assert lines[-1].startswith(f"sampling calibration text from the model: {BATCH_ROWS}/{BATCH_ROWS} rows")


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads the resident size from /proc")
def test_sampling_hands_the_models_memory_back(pico_source: Path, tmp_path: Path) -> None:
    """The conversion that follows sampling must not carry the sampled model's memory: without handing
    freed memory back, the process kept 84 MiB more after sampling this bf16 model than before (its
    float32 weights are 68 MiB)."""
    tokenizer = AutoTokenizer.from_pretrained(pico_source)
    sample_windows(pico_source, tokenizer, SampleSettings(seq_len=16, seed=3), BATCH_ROWS)  # imports, warm-up
    src = make_llama(tmp_path / "larger", hidden=512, heads=8, kv_heads=4, head_dim=64, layers=4, vocab=16384)
    AutoModelForCausalLM.from_pretrained(src).to(torch.bfloat16).save_pretrained(src)
    before = _rss_mib()
    sample_windows(src, tokenizer, SampleSettings(seq_len=64, seed=3), BATCH_ROWS)
    assert _rss_mib() - before < 36, (before, _rss_mib())


@pytest.mark.parametrize("text, mix, expected", [
    (False, False, [("bundled calibration mix", 256), ("sampled from the source model", 256)]),
    (True, True, [("user", 256), ("bundled calibration mix", 128), ("sampled from the source model", 128)]),
    (True, False, [("user", 512)]),
])
def test_the_default_set_and_what_replaces_it(pico_source: Path, tmp_path: Path, text: bool, mix: bool,
                                              expected: list[tuple[str, int]]) -> None:
    """Without text: half the bundled mix, half sampled; a user's text replaces them, or with `mix`
    takes half and leaves the default set the other half; each source recorded with its tokens."""
    user = tmp_path / "user.txt"
    user.write_text("A text of the user's own, long enough for several windows. " * 200, encoding="utf-8")
    calib = calibration_set(pico_source, AutoTokenizer.from_pretrained(pico_source), text=[user] if text else None,
                            mix=mix, tokens=512, seq_len=64, bos=False, sampling=SampleSettings(seq_len=64),
                            held_out=0.125, device="cpu")
    got = [("user" if s.get("text") == str(user) else s.get("text", s["kind"]), s["tokens"])
           for s in calib.record["sources"]]
    assert got == expected and calib.windows.shape == (8, 64) and calib.held_out == 1


def _kl_on(src: Path, out: Path, windows: torch.Tensor) -> float:
    """Mean next-token KL of the converted model from the source on `windows`."""
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src).eval()(windows).logits.log_softmax(-1)
        got = AutoModelForCausalLM.from_pretrained(out).eval()(windows).logits.log_softmax(-1)
    return (ref.exp() * (ref - got)).sum(-1).mean().item()


class _Curve:
    """A stand-in for the refit's normal equations: the refit with ridge r is the tensor [r] and its
    held-out error a parabola in log10(r) with its minimum at `best`; the prior's error is `prior`."""

    def __init__(self, best: float, prior: float = 10.0, count: int = 1):
        self.best, self.prior, self.count, self.solved = best, prior, count, []

    def solve(self, prior: torch.Tensor, ridge: float) -> torch.Tensor:
        self.solved.append(ridge)
        return torch.tensor([ridge])

    def error(self, o: torch.Tensor) -> float:
        return self.prior if o.isnan().all() else 1.0 + (math.log10(o.item()) - math.log10(self.best)) ** 2

    relative_error = error


@pytest.mark.parametrize("best, solves", [(1e-2, 3), (1e-3, 4), (1e-4, 4), (1e-1, 3), (1.0, 4), (10.0, 4), (3e-3, 4)])
def test_the_refit_ridge_walk_finds_the_ladders_best(best: float, solves: int) -> None:
    """The walk from the ladder's middle ends at the ladder ridge of least held-out error, whichever side
    of the start it lies: three solves where the best is the start or the step above it (upwards first)."""
    from mlakit.convert.pipeline import ConvertOptions, _choose_output

    opts = ConvertOptions()
    curve = _Curve(best)
    _, report = _choose_output(curve, curve, torch.tensor([math.nan]), opts)
    assert report["refit_ridge"] == min(opts.ridge_ladder, key=lambda r: abs(math.log10(r) - math.log10(best)))
    assert len(curve.solved) == solves, curve.solved


def test_the_refit_is_kept_only_where_it_beats_the_converted_o_proj() -> None:
    """Every refit worse than the converted o_proj on the held-out rows: the converted one is kept;
    nothing held out: only the start ridge is solved, judged in sample."""
    from mlakit.convert.pipeline import ConvertOptions, _choose_output

    curve = _Curve(1e-2, prior=0.5)
    _, report = _choose_output(curve, curve, torch.tensor([math.nan]), ConvertOptions())
    assert report["refit_ridge"] is None and not report["output_refit"]
    fit, none_held = _Curve(1e-4), _Curve(1e-4, count=0)
    _, report = _choose_output(fit, none_held, torch.tensor([math.nan]), ConvertOptions())
    assert fit.solved == [ConvertOptions().refit_ridge] and report["refit_ridge"] == ConvertOptions().refit_ridge


def test_the_output_refit_is_chosen_on_held_out_windows(pico_source: Path, tmp_path: Path) -> None:
    """On two calibration windows the o_proj refit has as many unknowns per output as fitting tokens,
    so with a small ridge it fits their noise. The default conversion chooses the ridge (or no refit)
    on the held-out window, and on windows it never saw does no worse than without a refit; chosen
    in sample, the small ridge does worse there (the overfitting this guards against)."""
    from mlakit.convert.pipeline import ConvertOptions, convert

    tokenizer = AutoTokenizer.from_pretrained(pico_source)
    unseen, _ = sample_windows(pico_source, tokenizer, SampleSettings(seq_len=64, seed=99), 8)
    base = dict(kv_lora_rank=24, rope_dim=8, calib_tokens=128, calib_seq_len=64, dtype="fp32")
    kl = {}
    for name, kw in {"default": {}, "no refit": {"refit_output": False},
                     "in sample": {"held_out": 0.0, "refit_ridge": 1e-6}}.items():
        record = convert(str(pico_source), tmp_path / name, ConvertOptions(**base, **kw), log=lambda m: None)
        kl[name] = _kl_on(pico_source, tmp_path / name, unseen)
        if name == "default":
            assert all(row["attn_rel_error_held_out"] is not None for row in record["layers"])
    assert kl["default"] <= 1.02 * kl["no refit"], kl
    assert kl["in sample"] > 1.1 * kl["no refit"], kl
