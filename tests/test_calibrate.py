"""The calibrate command: packing, the plain parametrization, both modes, exact resume, bad input."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM

from mlakit.calibrate import distill as distill_module
from mlakit.calibrate.data import Documents, hold_out, load_documents, pack, per_document
from mlakit.calibrate.distill import step_rows, to_plain
from mlakit.calibrate.export import as_stored
from mlakit.calibrate.layers import Teacher
from mlakit.calibrate.metrics import IGNORE, next_token_labels, rest_log_prob, token_kl, top_k_kl
from mlakit.calibrate.teacher import CACHE
from mlakit.cli import main
from mlakit.convert.checkpoint import CheckpointReader
from mlakit.convert.deepseek import plain_attention
from mlakit.convert.text import DEFAULT_TEXT

from conftest import DEMO_AVAILABLE, byte_tokenizer, make_llama

CONVERT = ["--calib-tokens", "2048", "--calib-seq-len", "64", "--dtype", "fp32"]
SMALL = ["--tokens", "2048", "--seq-len", "64", "--eval-tokens", "512", "--batch-size", "4"]


def small(src: Path) -> list:
    """A short run's options, on the calibration text that the `pair` fixture writes."""
    return ["--teacher", src, "--data", src / "calib.txt", *SMALL]


def invoke(*args: str) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args: str) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A pico GQA source and its lossy MLA conversion (rope 8 of 16 dims, latent 16 of 64, exact format;
    test_native.py calibrates the native one)."""
    root = tmp_path_factory.mktemp("pair")
    src = make_llama(root / "src", tied=False)
    (src / "calib.txt").write_text(DEFAULT_TEXT.read_text()[:60000])
    ok("convert", src, root / "mla", *CONVERT, "--rope-dim", "8", "--kv-lora-rank", "16", "--latent", "exact")
    return src, root / "mla"


def read_record(out: Path) -> dict:
    return json.loads((out / "mlakit.json").read_text())


def assert_loads_in_stock_transformers(out: Path) -> None:
    model, info = DeepseekV3ForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 256, (1, 16))).logits).all()


# ---- data ----------------------------------------------------------------------------------------

def test_packing_restarts_positions_at_documents_and_rows() -> None:
    docs = Documents(["abcde", "fg", "hijklmnopq"], "t", "0")
    packed = pack(byte_tokenizer(), docs, 4)
    assert packed.input_ids.shape == (4, 4)  # 17 tokens, the partial last row dropped
    assert packed.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 1, 0], [0, 1, 2, 3], [0, 1, 2, 3]]
    labels = next_token_labels(packed.input_ids, packed.position_ids)
    assert labels[1].tolist() == [IGNORE, packed.input_ids[1, 2].item(), IGNORE, IGNORE]
    fit, held = hold_out(packed, 4)
    assert (len(fit), len(held)) == (3, 1)


def test_documents_from_text_jsonl_and_datasets(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "a.txt").write_text("one document\n\nstill the same one")
    (tmp_path / "b.jsonl").write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    fake = types.ModuleType("datasets")

    class Rows(dict):
        column_names = ["body"]

    fake.load_dataset = lambda name, config, split: Rows(body=[f"{name}|{config}|{split}"])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    docs = load_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
    assert docs.texts == ["one document\n\nstill the same one", "first", "second"]
    assert load_documents(["owner/set:cfg@train[:5%]"], "body").texts == ["owner/set|cfg|train[:5%]"]
    assert load_documents([]).texts[0] == DEFAULT_TEXT.read_text()


def test_attention_never_crosses_documents_in_either_forward(pair) -> None:
    """Functional layers (per_document) and transformers (restarting position ids) both see each
    packed document exactly as if it were alone."""
    src, _ = pair
    tok = byte_tokenizer()
    packed = pack(tok, Documents(["first document text", "the second one, longer than that"], "t", "0"), 48)
    ids, pos = packed.input_ids, packed.position_ids
    cut = len(tok("first document text", add_special_tokens=False)["input_ids"])
    teacher = Teacher(src, 48, "cpu")
    layer = teacher.layer(0)
    with torch.no_grad():
        h = teacher.embed(ids)
        packed_out = teacher.forward_layer(h, layer, pos)
        alone = torch.cat([per_document(lambda y: teacher.forward_layer(y, layer, torch.arange(y.shape[1])[None]),
                                        h[:, s], pos[:, s]) for s in (slice(0, cut), slice(cut, 48))], 1)
        torch.testing.assert_close(packed_out, alone)
        model = AutoModelForCausalLM.from_pretrained(src).eval()
        both = model(ids, position_ids=pos, use_cache=False).logits
        separate = torch.cat([model(ids[:, :cut]).logits, model(ids[:, cut:]).logits], 1)
        torch.testing.assert_close(both, separate, rtol=1e-5, atol=1e-5)


# ---- the plain parametrization -------------------------------------------------------------------

def test_plain_parametrization_round_trips_and_matches_transformers(pair) -> None:
    _, mla = pair
    reader = CheckpointReader(mla)
    model = DeepseekV3ForCausalLM.from_pretrained(mla).eval()
    rank = model.config.kv_lora_rank
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
        w = plain_attention(reader.get, 0, rank)
        again = as_stored(0, w, reader.get("model.layers.0.input_layernorm.weight"), model.config.hidden_size,
                          torch.float32)
        for a, b in zip(vars(w).values(), vars(again).values()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        to_plain(model)
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_step_rows_cover_every_row_once_per_epoch() -> None:
    seen = torch.cat([step_rows(s, 3, 7, seed=1) for s in range(7)])  # 21 rows = 3 epochs
    for epoch in range(3):
        assert sorted(seen[7 * epoch : 7 * epoch + 7].tolist()) == list(range(7))
    assert torch.equal(step_rows(5, 3, 7, seed=1), step_rows(5, 3, 7, seed=1))


# ---- layer-wise ----------------------------------------------------------------------------------

def test_layerwise_lowers_every_layer_error_and_the_kl(pair, tmp_path: Path) -> None:
    src, mla = pair
    out = tmp_path / "cal"
    text = ok("calibrate", mla, out, *small(src), "--layer-steps", "10", "--inputs", "student")
    assert "layer-wise" in text and "KL to teacher" in text
    run = read_record(out)["calibrate"][-1]
    assert run["mode"] == "layerwise" and run["options"]["inputs"] == "student"
    assert run["after"]["kl"] < run["before"]["kl"]
    for layer in run["layers"]:
        errors = layer["errors"]
        assert errors[layer["kept"]] < errors["converted"]
    assert read_record(out)["source"] == read_record(mla)["source"]
    assert_loads_in_stock_transformers(out)
    assert not list(tmp_path.glob(".cal.*"))


@pytest.mark.skipif(not DEMO_AVAILABLE, reason="the demo model is not bundled in this checkout")
def test_layerwise_on_the_demo_model(tmp_path: Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_text(DEFAULT_TEXT.read_text()[:100000])
    mla = tmp_path / "demo-mla"
    ok("convert", "demo", mla, "--calib-text", text, "--calib-tokens", "4096", "--calib-seq-len", "128",
       "--kv-lora-rank", "32")
    out = tmp_path / "cal"
    ok("calibrate", mla, out, "--data", text, "--tokens", "4096", "--seq-len", "128", "--eval-tokens", "1024",
       "--layer-steps", "10")
    run = read_record(out)["calibrate"][-1]
    assert run["teacher"] == "demo" and run["after"]["kl"] < run["before"]["kl"]
    assert all(layer["errors"][layer["kept"]] < layer["errors"]["converted"] for layer in run["layers"])
    assert_loads_in_stock_transformers(out)


# ---- distillation --------------------------------------------------------------------------------

DISTILL = ["--mode", "distill", "--lr", "3e-3"]


def test_distillation_lowers_the_kl(pair, tmp_path: Path) -> None:
    src, mla = pair
    out = tmp_path / "cal"
    ok("calibrate", mla, out, *small(src), *DISTILL, "--train", "all", "--lm-weight", "0.01", "--tokens", "8192")
    run = read_record(out)["calibrate"][-1]
    assert run["mode"] == "distill" and run["after"]["kl"] < 0.9 * run["before"]["kl"]
    assert_loads_in_stock_transformers(out)
    assert not (tmp_path / "cal.ckpt").exists()


def test_both_modes_chain_and_record_each_run(pair, tmp_path: Path) -> None:
    src, mla = pair
    out = tmp_path / "cal"
    text = ok("calibrate", mla, out, *small(src), *DISTILL[2:], "--mode", "both", "--layer-steps", "5")
    assert "layer-wise" in text and "distilled" in text
    runs = read_record(out)["calibrate"]
    assert [r["mode"] for r in runs] == ["layerwise", "distill"]
    assert runs[1]["before"]["kl"] == pytest.approx(runs[0]["after"]["kl"], rel=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal"]


@pytest.mark.parametrize("teacher", [[], ["--teacher-topk", "16"]], ids=["live", "cached"])
def test_resume_reproduces_an_uninterrupted_run(pair, tmp_path: Path, monkeypatch, teacher: list[str]) -> None:
    """8 steps with a checkpoint at 4: interrupted after it and resumed, the weights equal one run's.
    A cached teacher is computed once: the resumed run reads it back."""
    src, mla = pair
    args = [mla, None, *small(src), *DISTILL, "--save-every", "4", *teacher]
    ok("calibrate", *[tmp_path / "straight" if a is None else a for a in args])

    save = distill_module.Checkpoints.save

    def save_then_stop(self, accelerator, step: int) -> None:
        save(self, accelerator, step)
        raise KeyboardInterrupt

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(distill_module.Checkpoints, "save", save_then_stop)
    result = invoke("calibrate", *[resumed if a is None else a for a in args])
    assert result.exit_code == 130 and not resumed.exists()
    assert (tmp_path / "resumed.ckpt" / "step-0000004").is_dir()
    monkeypatch.setattr(distill_module.Checkpoints, "save", save)
    if teacher:
        assert (tmp_path / "resumed.ckpt" / CACHE).is_file()
        monkeypatch.setattr(distill_module, "build_cache", lambda *a: pytest.fail("teacher cache computed twice"))
    ok("calibrate", *[resumed if a is None else a for a in args], "--resume")
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)


def test_cached_teacher_over_the_whole_vocabulary_is_the_live_teacher(pair, tmp_path: Path) -> None:
    """With k = vocabulary the cached teacher's truncated KL is the full KL: same metrics, same weights."""
    src, mla = pair
    ok("calibrate", mla, tmp_path / "live", *small(src), *DISTILL)
    text = ok("calibrate", mla, tmp_path / "cached", *small(src), *DISTILL, "--teacher-topk", "256")
    assert "top 256 tokens hold 100.00%" in text
    live, cached = (read_record(tmp_path / n)["calibrate"][-1] for n in ("live", "cached"))
    for when in ("before", "after"):
        for key in ("teacher_ppl", "student_ppl", "kl"):
            assert cached[when][key] == pytest.approx(live[when][key], rel=1e-4, abs=1e-7), (when, key)
    a, b = load_file(tmp_path / "live" / "model.safetensors"), load_file(tmp_path / "cached" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_top_k_kl_is_exact_at_full_k_and_a_lower_bound_below() -> None:
    """The cached teacher's KL: at k = vocabulary the full KL with the same gradient; below, between
    0 and the full KL (coarsening never increases a KL)."""
    gen = torch.Generator().manual_seed(0)
    t, s = torch.randn(3, 5, 50, generator=gen) * 3, (torch.randn(3, 5, 50, generator=gen) * 3).requires_grad_()
    full = token_kl(t, s)
    (grad_full,) = torch.autograd.grad(full.sum(), s)
    lp = torch.log_softmax(t, -1)
    for k in (50, 10, 1):
        top = lp.topk(k, dim=-1)
        part = top_k_kl(top.values, top.indices, rest_log_prob(lp, top.indices), torch.log_softmax(s, -1))
        (grad,) = torch.autograd.grad(part.sum(), s)
        assert torch.isfinite(grad).all()
        if k == 50:
            torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grad, grad_full, rtol=1e-5, atol=1e-6)
        else:
            assert (part >= -1e-6).all() and (part <= full + 1e-5).all() and not torch.allclose(part, full)


# ---- bad input -----------------------------------------------------------------------------------

def one_line_error(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_input_gives_one_line_and_writes_nothing(pair, tmp_path: Path) -> None:
    src, mla = pair
    out = tmp_path / "out"
    one_line_error(invoke("calibrate", src, out, *small(src)), "not an MLA model")
    other_vocab = make_llama(tmp_path / "other", vocab=300)
    one_line_error(invoke("calibrate", mla, out, "--teacher", other_vocab, *SMALL), "vocab_size")
    other_tok = tmp_path / "other-tok"
    shutil.copytree(src, other_tok)
    vocab = json.loads((other_tok / "tokenizer.json").read_text())
    vocab["model"]["vocab"] = {k: 255 - v for k, v in vocab["model"]["vocab"].items()}
    (other_tok / "tokenizer.json").write_text(json.dumps(vocab))
    one_line_error(invoke("calibrate", mla, out, "--teacher", other_tok, *SMALL), "tokenizers differ")
    (tmp_path / "empty.txt").write_text("  \n")
    one_line_error(invoke("calibrate", mla, out, "--teacher", src, "--data", tmp_path / "empty.txt"), "empty")
    (tmp_path / "short.txt").write_text("too short for two rows")
    one_line_error(invoke("calibrate", mla, out, "--teacher", src, "--data", tmp_path / "short.txt",
                          "--seq-len", "16", "--tokens", "16"), "at least 2")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    one_line_error(invoke("calibrate", mla, out, "--teacher", src, "--data", tmp_path / "bad.jsonl"), "bad.jsonl:2")
    one_line_error(invoke("calibrate", mla, out, *small(src), *DISTILL, "--resume"), "no complete checkpoint")
    one_line_error(invoke("calibrate", mla, out, *small(src), *DISTILL, "--teacher-topk", "257"), "vocabulary")
    out.mkdir()
    one_line_error(invoke("calibrate", mla, out, *small(src)), "--force")
    assert not any(out.iterdir())


def test_resume_refuses_checkpoints_of_another_run(pair, tmp_path: Path, monkeypatch) -> None:
    src, mla = pair
    out = tmp_path / "out"

    def stop(self, accelerator, step: int) -> None:
        raise KeyboardInterrupt

    save = distill_module.Checkpoints.save
    monkeypatch.setattr(distill_module.Checkpoints, "save",
                        lambda self, acc, step: (save(self, acc, step), stop(self, acc, step)))
    assert invoke("calibrate", mla, out, *small(src), *DISTILL, "--save-every", "2").exit_code == 130
    one_line_error(invoke("calibrate", mla, out, *small(src), *DISTILL), "--resume")
    one_line_error(invoke("calibrate", mla, out, *small(src), *DISTILL, "--lr", "1e-2", "--resume"),
                   "lr 0.003")
    broken = tmp_path / "out.ckpt" / "step-0000002"
    for f in broken.glob("*.safetensors"):
        f.write_bytes(b"broken")
    one_line_error(invoke("calibrate", mla, out, *small(src), *DISTILL, "--resume"), "cannot load")
    assert not out.exists()
