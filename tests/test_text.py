"""Calibration windows sample the whole calibration text, not its beginning."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mlakit.core import text as text_module
from mlakit.core.guard import DEMO_DIR
from mlakit.core.text import text_windows, token_windows


def test_spread_windows_sample_every_file_of_a_concatenation():
    tok = AutoTokenizer.from_pretrained(DEMO_DIR)
    first, second = "alpha beta " * 3000, "omega delta " * 3000
    ids = lambda s: set(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    spread = set(token_windows(tok, first + "\n\n" + second, 1024, 64, spread=True).flatten().tolist())
    head = set(token_windows(tok, first + "\n\n" + second, 1024, 64).flatten().tolist())
    assert ids(" omega delta") <= spread and ids(" alpha beta") <= spread
    assert not ids(" omega delta") & head  # the plain windows are the text's beginning


def test_spread_windows_are_whole_windows_of_the_text():
    tok = AutoTokenizer.from_pretrained(DEMO_DIR)
    text = DEMO_DIR.joinpath("docstrings.txt").read_text(encoding="utf-8")[:200_000]
    all_ids = token_windows(tok, text, 10**9, 1)[:, 0]
    w = token_windows(tok, text, 2048, 128, spread=True)
    stride = len(all_ids) // w.shape[0]
    assert w.shape == (16, 128)
    for i, row in enumerate(w):
        assert row.equal(all_ids[i * stride: i * stride + 128])


def test_a_leading_token_starts_every_window_then_the_text_follows():
    tok = AutoTokenizer.from_pretrained(DEMO_DIR)
    text = DEMO_DIR.joinpath("docstrings.txt").read_text(encoding="utf-8")[:200_000]
    all_ids = token_windows(tok, text, 10**9, 1)[:, 0]
    w = token_windows(tok, text, 1024, 128, lead=7)
    assert w.shape == (8, 128)
    for i, row in enumerate(w):
        assert row[0] == 7 and row[1:].equal(all_ids[i * 127: (i + 1) * 127])
    spread = token_windows(tok, text, 1024, 128, spread=True, lead=7)
    stride = len(all_ids) // 8
    for i, row in enumerate(spread):
        assert row[0] == 7 and row[1:].equal(all_ids[i * stride: i * stride + 127])


def test_large_text_is_read_a_window_at_a_time(tmp_path, monkeypatch):
    """Beyond WHOLE_TEXT_BYTES no file is read whole: every window is whole tokens of the text it was
    read from, the windows sample every file, and the hash is the one the whole text gets."""
    tok = AutoTokenizer.from_pretrained(DEMO_DIR)
    docs = DEMO_DIR.joinpath("docstrings.txt").read_text(encoding="utf-8")
    texts = [docs[:150_000], "omega delta " * 20_000]
    paths = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for path, text in zip(paths, texts):
        path.write_text(text, encoding="utf-8")
    whole = text_windows(tok, paths, 2048, 128)
    monkeypatch.setattr(text_module, "WHOLE_TEXT_BYTES", 0)
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail("a file was read whole"))
    windows, name, sha256 = text_windows(tok, paths, 2048, 128, lead=7)
    assert windows.shape == (16, 128) and bool((windows[:, 0] == 7).all())
    assert (name, sha256) == whole[1:]
    sizes = [path.stat().st_size for path in paths]
    for j, row in enumerate(windows):
        at = j * sum(sizes) // 16  # the window's byte offset in the files joined
        assert tok.decode(row[1:]) in texts[int(at >= sizes[0])]
