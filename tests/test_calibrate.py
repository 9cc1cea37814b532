"""The calibrate command: packing, the plain parametrization, both modes, exact resume, bad input."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import DEMO_AVAILABLE, byte_tokenizer, make_llama
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV3ForCausalLM

from mlakit.calibrate import data as data_module
from mlakit.calibrate import distill as distill_module
from mlakit.calibrate import layerwise as layerwise_module
from mlakit.calibrate import run as run_module
from mlakit.calibrate import teacher as teacher_module
from mlakit.calibrate.checkpoint import CACHE, LAYERS, STAGE
from mlakit.calibrate.data import (
    DEFAULT_SET,
    Documents,
    Packed,
    default_set,
    hold_out,
    load_documents,
    pack,
    sample_settings,
)
from mlakit.calibrate.distill import step_rows, to_plain, used_rows
from mlakit.calibrate.export import as_stored
from mlakit.calibrate.teacher import load_teacher
from mlakit.cli import main
from mlakit.core.checkpoint import CheckpointReader
from mlakit.core.latent import plain_attention
from mlakit.core.forward import MLAWeights
from mlakit.core.errors import MlakitError, Terminated
from mlakit.core.sampling import SampleSettings, sample_windows
from mlakit.core.stream import LayerStream, Rows, SourceModel, per_document
from mlakit.core.metrics import IGNORE, next_token_labels, rest_log_prob, token_kl, top_k_kl
from mlakit.core.text import DEFAULT_TEXT

ROOT = Path(__file__).resolve().parents[1]
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

def test_packing_restarts_positions_at_documents_and_rows(tmp_path: Path) -> None:
    docs = Documents(["abcde", "fg", "hijklmnopq"], "t", "0")
    packed = pack(byte_tokenizer(), docs, 4, tmp_path)
    assert packed.input_ids.shape == (4, 4)  # 17 tokens, the partial last row dropped
    assert packed.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 1, 0], [0, 1, 2, 3], [0, 1, 2, 3]]
    labels = next_token_labels(packed.input_ids, packed.position_ids)
    assert labels[1].tolist() == [IGNORE, packed.input_ids[1, 2].item(), IGNORE, IGNORE]
    fit, held = hold_out(packed, 4)
    assert (len(fit), len(held)) == (3, 1)


def test_documents_from_text_jsonl_and_datasets(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "a.txt").write_text("one document\n\nstill the same one")
    (tmp_path / "b.jsonl").write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets())
    docs = load_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
    assert list(docs.texts) == ["one document\n\nstill the same one", "first", "second"]
    assert docs.sha256 == hashlib.sha256("\0".join(docs.texts).encode()).hexdigest()  # as when read whole
    assert list(load_documents(["owner/set:cfg@train[:5%]"], "body").texts) == ["owner/set|cfg|train[:5%]"]
    assert list(load_documents([]).texts) == [DEFAULT_TEXT.read_text()]


def fake_datasets() -> types.ModuleType:
    """A `datasets` module whose one dataset names what it was asked for, in its column `body`."""
    fake = types.ModuleType("datasets")

    class Rows:
        column_names = ["body"]

        def __init__(self, text: str) -> None:
            self.text = text

        def iter(self, batch_size: int):
            yield {"body": [self.text]}

    fake.load_dataset = lambda name, config, split: Rows(f"{name}|{config}|{split}")
    return fake


def test_hub_prefix_names_a_dataset_even_where_a_folder_has_its_name(tmp_path: Path, monkeypatch) -> None:
    """`hub:owner/set` is a dataset although ./owner/set exists; without the datasets extra, one line."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "set").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets())
    assert list(load_documents(["hub:owner/set:cfg@test"], "body").texts) == ["owner/set|cfg|test"]
    with pytest.raises(MlakitError, match="hub:owner/set"):
        load_documents(["owner/set"], "body")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MlakitError, match=re.escape("pip install 'mlakit[datasets]'")):
        load_documents(["hub:owner/set"], "body")


def test_documents_are_streamed_and_packed_a_batch_at_a_time(tmp_path: Path, monkeypatch) -> None:
    """The tokenizer never sees more than TOKENIZE_DOCUMENTS documents at once, rows are int32,
    memory-mapped from files in the folder given rather than held in memory, and the rows and
    position ids are those of packing everything in one go (documents cross batches and rows)."""
    texts = [("document %d " % i) * (1 + i % 7) for i in range(23)]
    texts[9] = "x" * 70  # longer than a row
    tok = byte_tokenizer()
    seen = []

    def counting(batch, **kw):
        seen.append(len(batch))
        return tok(batch, **kw)

    monkeypatch.setattr(data_module, "TOKENIZE_DOCUMENTS", 5)
    packed = pack(counting, Documents(texts, "t", "0"), 16, tmp_path)
    assert max(seen) == 5 and sum(seen) == len(texts)
    assert packed.ids.dtype == packed.pos.dtype == torch.int32
    for rows in (packed, packed[2:5]):  # slices are views of the same mapping
        for tensor in (rows.ids, rows.pos):
            assert Path(tensor.untyped_storage().filename).parent == tmp_path
    docs = tok(texts, add_special_tokens=False)["input_ids"]
    flat = [t for doc in docs for t in doc]
    starts = {sum(len(d) for d in docs[:k]) for k in range(len(docs))}
    pos = []
    for i in range(len(flat) // 16 * 16):  # restart at each document and each row
        pos.append(0 if i in starts or i % 16 == 0 else pos[-1] + 1)
    assert packed.input_ids.reshape(-1).tolist() == flat[: len(pos)]
    assert packed.position_ids.reshape(-1).tolist() == pos


def test_attention_never_crosses_documents_in_either_forward(pair, tmp_path: Path) -> None:
    """Functional layers (per_document) and transformers (restarting position ids) both see each
    packed document exactly as if it were alone."""
    src, _ = pair
    tok = byte_tokenizer()
    packed = pack(tok, Documents(["first document text", "the second one, longer than that"], "t", "0"), 48,
                  tmp_path)
    ids, pos = packed.input_ids, packed.position_ids
    cut = len(tok("first document text", add_special_tokens=False)["input_ids"])
    teacher = SourceModel.load(src, 48, "cpu")

    def first_layer(ids: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        stream = LayerStream(teacher, {"rows": Rows(ids, pos)}, width=1024)
        next(iter(stream)).advance()
        return stream.hidden("rows")

    with torch.no_grad():
        packed_out = first_layer(ids, pos)
        alone = torch.cat([first_layer(ids[:, s], None) for s in (slice(0, cut), slice(cut, 48))], 1)
        torch.testing.assert_close(packed_out, alone)
        model = AutoModelForCausalLM.from_pretrained(src).eval()
        both = model(ids, position_ids=pos, use_cache=False).logits
        separate = torch.cat([model(ids[:, :cut]).logits, model(ids[:, cut:]).logits], 1)
        torch.testing.assert_close(both, separate, rtol=1e-5, atol=1e-5)


def test_document_pieces_are_made_on_the_device_of_the_rows() -> None:
    """On CUDA the rows live on the GPU, and a tensor made without naming a device lands on the CPU:
    joining the two failed for multi-document rows. With meta as the default device, every tensor
    made without naming its device is a meta tensor, and mixing it with the (CPU) rows fails the same
    way, so this catches the mistake without a GPU."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    x = torch.arange(12.0).view(2, 6, 1)
    pieces = [(0, slice(0, 3)), (0, slice(3, 5)), (0, slice(5, 6)), (1, slice(0, 4)), (1, slice(4, 6))]
    expected = torch.zeros_like(x)
    for row, piece in pieces:
        expected[row, piece] = x[row, piece].cumsum(0)
    with torch.device("meta"):
        got = per_document(lambda y: y.cumsum(1), x, pos)
    assert torch.equal(got, expected)


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

def test_layerwise_attention_error_is_the_relative_error(pair) -> None:
    """One definition everywhere: ||a - target|| / ||target||, as convert and validate report it, not its
    square (an output 10% too large reads 0.1 / 1.1)."""
    from mlakit.calibrate.layers import Student

    _, mla = pair
    student = Student(mla, 32, "cpu")
    w = student.layer(0).attn
    x = torch.randn(2, 32, student.config.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(32).expand(2, 32)
    target = 1.1 * student.attention(x, w, pos)
    assert layerwise_module._Fit(student, x, pos, target, None).error(w) == pytest.approx(0.1 / 1.1, rel=1e-4)


def test_student_shares_the_tensors_that_convert_copied(pair) -> None:
    """The student's norms, MLP and output head are the source model's float32 tensors where the stored
    values are the same (one copy in memory, not two), and read from its own checkpoint where they differ."""
    from mlakit.calibrate.layers import Student

    src, mla = pair
    teacher, student = SourceModel.load(src, 32, "cpu"), Student(mla, 32, "cpu")
    source = teacher.layer(0)
    layer = student.layer(0, source)
    for key in ("post_norm", "gate", "up", "down"):
        assert getattr(layer, key) is getattr(source, key)
    source.up = source.up + 1
    up = student.layer(0, source).up
    assert up is not source.up and torch.equal(up, student.layer(0).up)
    assert student.share_head(teacher) and student._head is teacher._head
    other = Student(mla, 32, "cpu")
    norm, head = teacher._head
    teacher.__dict__["_head"] = (norm, head + 1)
    assert not other.share_head(teacher) and torch.equal(other._head[1], head)


def test_blockwise_least_squares_reaches_the_joint_solution() -> None:
    """Conjugate gradients over one-head groups, on features whose heads are alike (correlation 0.8),
    end within 1e-4 of the joint solve's relative error, and the objective, measured at every
    iterate, never increases and is the one the solver tracks."""
    heads, width, hidden = 4, 8, 12
    gen = torch.Generator().manual_seed(0)
    feats = (torch.randn(6, 16, 1, width, generator=gen)
             + 0.5 * torch.randn(6, 16, heads, width, generator=gen)).flatten(-2)
    target = feats @ torch.randn(heads * width, hidden, generator=gen) + 0.3 * torch.randn(6, 16, hidden, generator=gen)
    ridge = layerwise_module.RIDGE * feats.pow(2).sum().item() / (heads * width)

    def features(rows: slice, group: slice) -> torch.Tensor:
        return feats[rows][..., group.start * width : group.stop * width]

    def objective(m: torch.Tensor) -> float:
        return ((feats @ m - target).pow(2).sum() + ridge * m.pow(2).sum()).item()

    def error(m: torch.Tensor) -> float:
        return ((feats @ m - target).norm() / target.norm()).item()

    def fit(joint_columns: int) -> object:
        student = types.SimpleNamespace(dims=(heads, width, width, width))  # all that the chunks read
        return layerwise_module._Fit(student, feats, torch.arange(16).expand(6, 16), target, None, joint_columns)

    joint = fit(heads * width).least_squares(features, heads, width)[0]
    blockwise = fit(width)
    m, tracked = blockwise.blockwise(features, heads, width)
    assert torch.equal(blockwise.least_squares(features, heads, width)[0], m)
    measured = [objective(blockwise.blockwise(features, heads, width, k)[0]) for k in range(len(tracked))]
    assert all(b <= a for a, b in zip(measured, measured[1:])), measured
    assert tracked == pytest.approx(measured, rel=1e-4)
    assert error(blockwise.blockwise(features, heads, width, 1)[0]) > 1.01 * error(joint)  # one step is not enough
    assert error(m) == pytest.approx(error(joint), rel=1e-4)


def _first_layer_rows(pair) -> tuple:
    """The pair's student, its first layer's attention weights, 4 random rows of 32 positions and the
    generator that drew them (to draw the test's perturbation next)."""
    from mlakit.calibrate.layers import Student

    student = Student(pair[1], 32, "cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, student.config.hidden_size, generator=gen)
    return student, student.layer(0).attn, x, torch.arange(32).expand(4, 32), gen


def test_blockwise_values_probe_each_head_group_as_the_joint_solve_does(pair) -> None:
    """The features of a group of heads are those heads' columns of all heads' features, and
    solve_values through one-head groups ends within 1e-4 of the joint solve's error."""
    student, w, x, pos, gen = _first_layer_rows(pair)
    noisy = MLAWeights(w.q + 0.3 * torch.randn(w.q.shape, generator=gen), w.kv_a, w.kv_norm, w.kv_b, w.o)
    target = student.attention(x, noisy, pos)
    heads, rank = student.dims[0], student.config.kv_lora_rank
    joint = layerwise_module._Fit(student, x, pos, target, None)
    features = joint.value_features(w)
    rows = joint.chunks[0]
    torch.testing.assert_close(features(rows, slice(1, 3)), features(rows, slice(0, heads))[..., rank : 3 * rank])
    blockwise = layerwise_module._Fit(student, x, pos, target, None, joint_columns=rank)
    assert blockwise.error(blockwise.solve_values(w)[0]) == pytest.approx(joint.error(joint.solve_values(w)[0]), rel=1e-4)


def test_layerwise_least_squares_shrinks_towards_the_converted_weights(pair) -> None:
    """Each ridge's stage lies between the converted weights and the plain least-squares fit: the
    smallest ridge fits the rows best, the error grows with the ridge, and a huge ridge leaves the
    converted weights' attention output as it was."""
    student, w, x, pos, gen = _first_layer_rows(pair)
    noisy = MLAWeights(w.q, w.kv_a, w.kv_norm, w.kv_b + 0.3 * torch.randn(w.kv_b.shape, generator=gen), w.o)
    fit = layerwise_module._Fit(student, x, pos, student.attention(x, noisy, pos), None)
    stages = fit.solve_values(w, (1e-6, 1e-1, 1.0, 1e6))
    errors = [fit.error(s) for s in stages]
    assert errors == sorted(errors) and errors[0] < 0.7 * errors[-1]  # the noisy keys are not fitted
    rows = fit.chunks[0]
    kept, converted = fit.attention(rows, stages[-1]), fit.attention(rows, w)
    assert (kept - converted).norm() < 1e-2 * converted.norm()  # towards w, not towards zero


def test_layerwise_keeps_the_stage_best_on_held_out_rows(pair) -> None:
    """Fitted on rows whose target is another layer's output, every fitted stage beats the converted
    weights in sample; on held-out rows whose target is the converted layer's own output, only the
    converted weights are exact, and they are kept."""
    from mlakit.calibrate.layers import Student

    _, mla = pair
    student = Student(mla, 32, "cpu")
    w = student.layer(0).attn
    gen = torch.Generator().manual_seed(0)
    x, x_held = (torch.randn(4, 32, student.config.hidden_size, generator=gen) for _ in range(2))
    pos = torch.arange(32).expand(4, 32)
    noisy = MLAWeights(w.q + 0.3 * torch.randn(w.q.shape, generator=gen), w.kv_a, w.kv_norm, w.kv_b, w.o)
    opts = layerwise_module.LayerwiseOptions(steps=5)
    target = student.attention(x, noisy, pos)

    def fit(held_out=None):
        return layerwise_module.fit_layer(student, x, pos, target, w, opts, torch.Generator().manual_seed(0),
                                          lambda loss: None, held_out=held_out)

    _, in_sample = fit()
    kept, report = fit((x_held, pos, student.attention(x_held, w, pos)))
    assert in_sample["kept"] != "converted" and in_sample["attn_rel_error_held_out"] is None
    assert report["kept"] == "converted" and kept is w and report["attn_rel_error_held_out"] == 0
    # the same fit, judged differently: without held-out rows only the smallest ridge is tried, and Adam
    # starts from the least-squares stage that did best on the rows that judge
    both, mine = in_sample["attn_rel_error_by_stage"], report["attn_rel_error_by_stage"]
    assert set(both) == {"converted", "least_squares 1e-06", "adam"} and len(mine) == 2 + len(layerwise_module.RIDGES)
    assert all(mine[name] == both[name] for name in ("converted", "least_squares 1e-06"))


def test_layerwise_lowers_every_layer_error_and_the_kl(pair, tmp_path: Path) -> None:
    src, mla = pair
    out = tmp_path / "cal"
    text = ok("calibrate", mla, out, *small(src), "--layer-steps", "30", "--inputs", "student")
    assert "layer-wise" in text and "KL to teacher" in text
    lines = [line for line in text.splitlines() if line.startswith("layer-wise: layer ")]  # stderr is no terminal
    assert [line.split(" in ")[0] for line in lines] == ["layer-wise: layer 1/2", "layer-wise: layer 2/2"]
    assert all(re.search(r"attention error \d\.\d{4} -> \d\.\d{4} \(\w+; held out \d\.\d{4} -> \d\.\d{4}\)$", line)
               for line in lines), lines
    run = read_record(out)["calibrate"][-1]
    assert run["mode"] == "layerwise" and run["options"]["inputs"] == "student"
    assert run["after"]["kl"] < run["before"]["kl"]
    for layer in run["layers"]:
        held = layer["attn_rel_error_held_out_by_stage"]
        assert layer["attn_rel_error_held_out"] == held[layer["kept"]] == min(held.values())
        assert layer["attn_rel_error"] == layer["attn_rel_error_by_stage"][layer["kept"]]
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
    assert all(layer["attn_rel_error"] < layer["attn_rel_error_by_stage"]["converted"] for layer in run["layers"])
    assert_loads_in_stock_transformers(out)


def stop_after_saving(monkeypatch, cls: type, method: str, times: int = 1) -> None:
    """Make `cls.method` (a save) raise KeyboardInterrupt after it has saved `times` times."""
    save, calls = getattr(cls, method), []

    def save_then_stop(*args, **kwargs) -> None:
        save(*args, **kwargs)
        calls.append(1)
        if len(calls) == times:
            raise KeyboardInterrupt

    monkeypatch.setattr(cls, method, save_then_stop)


def same_weights(a: Path, b: Path) -> None:
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=1e-6, atol=1e-7)


def test_layerwise_resumes_after_the_last_saved_layer(pair, tmp_path: Path, monkeypatch) -> None:
    """Interrupted after layer 1 of 2, a resume fits only layer 2 and writes the uninterrupted run's
    weights; a fresh run refuses to discard the saved layer, a resume with other options is refused."""
    src, mla = pair
    args = [mla, None, *small(src), "--layer-steps", "5", "--inputs", "student"]
    ok("calibrate", *[tmp_path / "straight" if a is None else a for a in args])
    resumed = tmp_path / "resumed"
    argv = [resumed if a is None else a for a in args]
    stop_after_saving(monkeypatch, layerwise_module.LayerProgress, "save")
    stopped = invoke("calibrate", *argv)
    assert stopped.exit_code == 130 and not resumed.exists()
    assert f"{tmp_path / 'resumed.ckpt' / LAYERS} (1 of 2 layers) kept: rerun with --resume" in stopped.output
    assert (tmp_path / "resumed.ckpt" / LAYERS / "layer-00000.safetensors").is_file()
    monkeypatch.undo()
    one_line_error(invoke("calibrate", *argv), "--resume")
    one_line_error(invoke("calibrate", *argv, "--layer-steps", "6", "--resume"), "layer_steps 5")
    fitted = []
    fit = layerwise_module.fit_layer
    monkeypatch.setattr(layerwise_module, "fit_layer", lambda *a, **k: fitted.append(1) or fit(*a, **k))
    text = ok("calibrate", *argv, "--resume")
    assert len(fitted) == 1 and "layer-wise: layer 1/2 saved by the interrupted run" in text
    assert read_record(resumed)["calibrate"][-1]["resumed_layers"] == 1
    same_weights(tmp_path / "straight", resumed)
    assert not (tmp_path / "resumed.ckpt").exists()


def test_layerwise_removes_only_its_own_files_from_a_checkpoint_dir(pair, tmp_path: Path) -> None:
    src, mla = pair
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    ok("calibrate", mla, tmp_path / "out", *small(src), "--layer-steps", "2", "--checkpoint-dir", mine)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_both_resume_skips_a_finished_layerwise_stage(pair, tmp_path: Path, monkeypatch) -> None:
    """`--mode both` interrupted during distillation: the resume distills on from the layer-wise stage
    it kept, without redoing it, and ends with the uninterrupted run's weights."""
    src, mla = pair
    args = [mla, None, *small(src), *DISTILL[2:], "--mode", "both", "--layer-steps", "5", "--save-every", "4"]
    ok("calibrate", *[tmp_path / "straight" if a is None else a for a in args])
    resumed = tmp_path / "resumed"
    argv = [resumed if a is None else a for a in args]
    stop_after_saving(monkeypatch, distill_module.Checkpoints, "save")
    assert invoke("calibrate", *argv).exit_code == 130
    assert (tmp_path / "resumed.ckpt" / STAGE / "mlakit.json").is_file()
    assert not list((tmp_path / "resumed.ckpt" / LAYERS).glob("layer-*"))  # the stage's output holds them
    monkeypatch.undo()
    monkeypatch.setattr(run_module, "calibrate_layerwise", lambda *a, **k: pytest.fail("layer-wise stage redone"))
    text = ok("calibrate", *argv, "--resume")
    assert "done by the interrupted run" in text and "distilled" in text
    assert [r["mode"] for r in read_record(resumed)["calibrate"]] == ["layerwise", "distill"]
    same_weights(tmp_path / "straight", resumed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed", "straight"]


def test_default_text_warns_unless_the_teacher_is_the_demo(pair, tmp_path: Path, monkeypatch) -> None:
    src, mla = pair
    fast = ["--teacher", src, *SMALL, "--layer-steps", "0"]
    warnings = [line for line in ok("calibrate", mla, tmp_path / "a", *fast).splitlines() if "no --data" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "sampled from the teacher" in warnings[0]
    data = read_record(tmp_path / "a")["calibrate"][-1]["data"]
    assert data["name"] == DEFAULT_SET and data["held_out_tokens"] == 512
    sampled, mixed = data["sources"]
    assert sampled["kind"] == "sampled from the source model" and mixed["text"] == "bundled calibration mix"
    assert sampled["tokens"] == mixed["tokens"] == (2048 + 512) // 2
    monkeypatch.setattr(run_module, "DEMO_DIR", src)
    assert "no --data" not in ok("calibrate", mla, tmp_path / "b", *fast)
    assert read_record(tmp_path / "b")["calibrate"][-1]["data"]["name"] == "bundled docstrings"


def test_the_default_set_reads_the_samples_convert_cached(pair, monkeypatch) -> None:
    """Sampled with the conversion's settings, cut to calibrate's rows: no sampling again, and both kinds
    held out."""
    src, mla = pair
    tokenizer = AutoTokenizer.from_pretrained(src)
    conversion = {"calibration": {"sources": [{"kind": "sampled from the source model", "seq_len": 128,
                                               "temperature": 1.0, "seed": 3, "chat": True}]}}
    settings = sample_settings(conversion, 64)
    assert settings == SampleSettings(128, 1.0, 3, True) and sample_settings(conversion, 96).seq_len == 96
    cached, _ = sample_windows(src, tokenizer, settings, 2)
    monkeypatch.setattr("mlakit.core.sampling._generate", lambda *a, **k: pytest.fail("sampled again"))
    default = default_set(src, tokenizer, 256, 128, 64, settings, "cpu")
    rows = [r.tolist() for r in torch.cat([default.rows.ids, default.held_out.ids])]
    assert len(rows) == 6 and len(default.held_out) == 2
    sampled = [c.tolist() for c in cached.reshape(-1, 64)]
    assert [r for r in rows if r in sampled] == sampled[:3]  # the cached rows, cut, in order
    held = [r.tolist() for r in default.held_out.ids]
    assert sum(r in sampled for r in held) == 1  # one held-out row of each kind
    assert (default.rows.pos == torch.arange(64)).all()


# ---- distillation --------------------------------------------------------------------------------

DISTILL = ["--mode", "distill", "--lr", "3e-3"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_distillation_lowers_the_kl(pair, tmp_path: Path, precision: str) -> None:
    """Under bf16 autocast over float32 weights (GPUs, and CPUs with fast bf16) as in float32."""
    src, mla = pair
    out = tmp_path / "cal"
    text = ok("calibrate", mla, out, *small(src), *DISTILL, "--train", "all", "--lm-weight", "0.01", "--tokens",
              "8192", "--precision", precision)
    steps = [line for line in text.splitlines() if line.startswith("distill: step ")]  # stderr is no terminal
    assert len(steps) == 16 and steps[-1].startswith("distill: step 32/32, loss "), steps
    assert sum(line.startswith("distill: held-out KL to the teacher") for line in text.splitlines()) == 2, text
    run = read_record(out)["calibrate"][-1]
    assert run["mode"] == "distill" and run["after"]["kl"] < 0.9 * run["before"]["kl"]
    assert run["precision"] == precision and run["teacher_dtype"] == ("bfloat16" if precision == "bf16" else "float32")
    assert_loads_in_stock_transformers(out)
    assert not (tmp_path / "cal.ckpt").exists()


def test_checkpointing_trains_the_same_weights(pair, tmp_path: Path, monkeypatch) -> None:
    """Recomputing activations in the backward pass saves memory and changes nothing else: the trained
    weights are those of a run that keeps them."""
    src, mla = pair
    trained, switched = {}, []
    enable = distill_module._checkpoint_activations

    def spy(model) -> None:
        enable(model)
        switched.append(model.is_activation_checkpointing if hasattr(model, "activation_checkpointing_enable")
                        else model.is_gradient_checkpointing)

    monkeypatch.setattr(distill_module, "_checkpoint_activations", spy)
    for mode in ("off", "on"):
        out = tmp_path / mode
        ok("calibrate", mla, out, *small(src), *DISTILL, "--precision", "fp32", "--checkpointing", mode)
        assert switched == ([True] if mode == "on" else []), (mode, switched)
        assert read_record(out)["calibrate"][-1]["options"]["checkpointing"] == mode
        trained[mode] = load_file(out / "model.safetensors")
    assert trained["on"].keys() == trained["off"].keys()
    changed = [name for name in trained["on"] if not torch.equal(trained["on"][name], trained["off"][name])]
    assert not changed, changed
    assert not torch.equal(trained["on"]["model.layers.0.self_attn.o_proj.weight"],
                           load_file(mla / "model.safetensors")["model.layers.0.self_attn.o_proj.weight"])


def test_auto_precision_follows_what_the_device_multiplies_fast(tmp_path: Path, monkeypatch) -> None:
    """auto: bf16 on GPUs; on a CPU bf16 autocast and the teacher as stored where bf16 matmuls are at
    least as fast as float32's (AMX), float32 for both elsewhere (AVX2)."""
    bf16 = tmp_path / "bf16"
    make_llama(tmp_path / "src")
    AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.bfloat16).save_pretrained(bf16)
    for fast, expected in [(True, (True, torch.bfloat16)), (False, (False, torch.float32))]:
        monkeypatch.setattr(distill_module, "run_dtype",
                            lambda device, stored, fast=fast: stored if fast and stored != torch.float32 else torch.float32)
        assert distill_module.precision("auto", False, bf16) == expected
        assert distill_module.precision("auto", True, bf16) == (True, torch.bfloat16)
        assert distill_module.precision("fp32", True, bf16) == (False, torch.float32)
        assert distill_module.precision("bf16", False, bf16) == (True, torch.bfloat16)


def test_distillation_holds_one_student_at_a_time(pair, tmp_path: Path, monkeypatch) -> None:
    """The copy that measures `before` is freed before the trained student is built, and the trained
    student, its weights and its optimizer (which accelerate references too) before OUT is loaded back
    for `after`."""
    src, mla = pair
    held, loaded = [], []  # weak references to each student and its parameters; what each was for
    load, build = distill_module._load_student, distill_module._trainable_student

    def alone(model, what: str) -> None:
        assert all(ref() is None for ref in held), f"another student is still in memory when {what} is loaded"
        held.extend(weakref.ref(t) for t in (model, *model.parameters()))
        loaded.append(what)

    def load_student(*args):
        model = load(*args)
        alone(model, "a student to measure")
        return model

    def trainable_student(*args):
        built = build(*args)
        alone(built[0], "the student to train")
        return built

    monkeypatch.setattr(distill_module, "_load_student", load_student)
    monkeypatch.setattr(distill_module, "_trainable_student", trainable_student)
    ok("calibrate", mla, tmp_path / "out", *small(src), *DISTILL)
    assert loaded == ["a student to measure", "the student to train", "a student to measure"]


def test_both_modes_chain_and_record_each_run(pair, tmp_path: Path) -> None:
    src, mla = pair
    out = tmp_path / "cal"
    text = ok("calibrate", mla, out, *small(src), *DISTILL[2:], "--mode", "both", "--layer-steps", "5")
    assert "layer-wise" in text and "distilled" in text
    runs = read_record(out)["calibrate"]
    assert [r["mode"] for r in runs] == ["layerwise", "distill"]
    # distillation starts from what the layer-wise stage kept (its input, when fitting made it worse)
    kept = runs[0]["after"] if runs[0]["kept"] == "calibrated" else runs[0]["before"]
    assert runs[1]["before"]["kl"] == pytest.approx(kept["kl"], rel=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal"]


@pytest.mark.parametrize("teacher", [[], ["--teacher-topk", "16"]], ids=["live", "cached"])
def test_resume_reproduces_an_uninterrupted_run(pair, tmp_path: Path, monkeypatch, teacher: list[str]) -> None:
    """8 steps with a checkpoint at 4: interrupted after it and resumed, the weights equal one run's.
    A cached teacher is computed once: the resumed run reads it back. The resume recomputes activations
    (`--checkpointing on`, as after running out of memory), which changes nothing."""
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
        assert (tmp_path / "resumed.ckpt" / CACHE / "info.json").is_file()
        monkeypatch.setattr(distill_module, "load_teacher", lambda *a, **k: pytest.fail("teacher cache computed twice"))
    ok("calibrate", *[resumed if a is None else a for a in args], "--resume", "--checkpointing", "on")
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


def test_cached_teacher_holds_only_the_rows_training_reads(pair, tmp_path: Path, monkeypatch) -> None:
    """The cache covers the rows the steps read (not the whole pool) and the held-out rows, in chunk
    files written one at a time; an interrupted build keeps its chunks and the next run computes the
    rest only."""
    src, mla = pair
    monkeypatch.setattr(teacher_module, "CHUNK_BYTES", 8 * 64 * (8 * 16 + 8))  # 8 rows of 64 tokens at k 16
    chunks = []
    chunk = teacher_module._chunk

    def chunk_then_stop(*args, **kwargs):
        chunks.append(len(args[2]))
        if len(chunks) == 2:
            raise KeyboardInterrupt
        return chunk(*args, **kwargs)

    monkeypatch.setattr(teacher_module, "_chunk", chunk_then_stop)
    argv = [mla, tmp_path / "out", *small(src), *DISTILL, "--teacher-topk", "16"]  # 8 steps of 4 rows
    assert invoke("calibrate", *argv).exit_code == 130
    cache = tmp_path / "out.ckpt" / CACHE
    assert sorted(p.name for p in cache.glob("*.safetensors")) == ["fit-00000.safetensors"]
    assert not json.loads((cache / "info.json").read_text()).get("complete")
    monkeypatch.setattr(teacher_module, "_chunk", lambda *a, **k: chunks.append(len(a[2])) or chunk(*a, **k))
    ok("calibrate", *argv)
    # first run: fit chunk 0 written, chunk 1 interrupted; second run: fit chunks 1-3, held-out chunk 0.
    # The 4 fit chunks hold the 32 rows that 8 steps of 4 rows read, not the pool's 900 or so.
    assert chunks == [8, 8, 8, 8, 8, 8]
    assert sorted(used_rows(8, 4, 1000, 0).tolist()) == sorted(set(torch.cat([step_rows(s, 4, 1000, 0)
                                                                            for s in range(8)]).tolist()))


def test_cached_teacher_is_spread_over_the_gpus(tmp_path: Path, monkeypatch) -> None:
    """On CUDA the cache build loads the teacher with device_map="auto"; on the CPU, or for a live
    teacher, it is loaded whole straight onto the one device (no CPU copy moved over afterwards)."""
    calls = []

    class Model:
        def eval(self):
            return self

        def requires_grad_(self, flag):
            return self

    def from_pretrained(folder, **kwargs):
        calls.append(kwargs)
        return Model()

    monkeypatch.setattr(teacher_module.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    load_teacher(tmp_path, torch.bfloat16, torch.device("cuda"), spread=True)
    load_teacher(tmp_path, torch.bfloat16, torch.device("cuda", 1))
    load_teacher(tmp_path, torch.float32, torch.device("cpu"), spread=True)
    assert calls == [{"dtype": torch.bfloat16, "device_map": "auto"},
                     {"dtype": torch.bfloat16, "device_map": {"": torch.device("cuda", 1)}},
                     {"dtype": torch.float32, "device_map": {"": torch.device("cpu")}}]


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
    one_line_error(invoke("calibrate", mla, out, *small(src), "--mode", "distill", "--lr", "-1"), "must be positive")
    one_line_error(invoke("calibrate", mla, out, *small(src), "--layer-lr", "0"), "must be positive")
    out.mkdir()
    one_line_error(invoke("calibrate", mla, out, *small(src)), "--force")
    assert not any(out.iterdir())


def test_packed_data_is_removed_however_the_run_ends(pair, tmp_path: Path, monkeypatch) -> None:
    """The packed rows are files in `.OUT.data-*` beside OUT while the run needs them; a finished run,
    Ctrl-C, SIGTERM and a full disk (one line) all leave nothing behind."""
    src, mla = pair
    out, seen = tmp_path / "out", []
    real_hold_out = run_module.hold_out

    def watch(packed: Packed, eval_tokens: int) -> tuple[Packed, Packed]:
        seen.append(sorted(p.name for p in tmp_path.glob(".*.data-*/*")))
        return real_hold_out(packed, eval_tokens)

    monkeypatch.setattr(run_module, "hold_out", watch)
    ok("calibrate", mla, out, *small(src), "--layer-steps", "1")
    assert seen == [[data_module.IDS_FILE, data_module.POSITIONS_FILE]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    for n, (stop, code) in enumerate(((KeyboardInterrupt, 130), (Terminated, 143)), 2):
        def halt(*args, stop=stop) -> None:
            raise stop

        monkeypatch.setattr(run_module, "_layerwise", halt)
        assert invoke("calibrate", mla, tmp_path / "stopped", *small(src)).exit_code == code
        assert len(seen) == n and seen[-1] == seen[0]  # stopped once the data was packed
        assert not list(tmp_path.glob(".*"))  # the checkpoint folder stays, for --resume

    class FullDisk(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(data_module, "open", lambda path, mode: FullDisk(), raising=False)
    one_line_error(invoke("calibrate", mla, tmp_path / "full", *small(src)), "disk full while writing")
    assert not list(tmp_path.glob(".*")) and not (tmp_path / "full").exists()


def ends_in_one_error_line(result, *words: str) -> None:
    """Progress lines may come first; the run ends in one error line, with no traceback."""
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert lines and [line for line in lines if line.startswith("error: ")] == lines[-1:], result.output
    for word in words:
        assert word in lines[-1], lines[-1]


def test_a_full_disk_while_saving_progress_is_one_line(pair, tmp_path: Path, monkeypatch) -> None:
    """Saved layers and the teacher cache (safetensors, which raises its own error type) and
    distillation checkpoints (torch.save through accelerate, a RuntimeError) fail on a full disk
    with one error line, like every other write."""
    import safetensors.torch
    from accelerate import Accelerator
    from safetensors import SafetensorError

    src, mla = pair

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "serialize_file", full)
        ends_in_one_error_line(invoke("calibrate", mla, tmp_path / "a", *small(src), "--layer-steps", "1"),
                               "disk full while writing", LAYERS)
        ends_in_one_error_line(invoke("calibrate", mla, tmp_path / "b", *small(src), *DISTILL, "--teacher-topk", "8"),
                               "disk full while writing", CACHE)

    def torch_save_fails(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(Accelerator, "save_state", torch_save_fails)
    ends_in_one_error_line(invoke("calibrate", mla, tmp_path / "c", *small(src), *DISTILL, "--save-every", "1"),
                           "cannot write", ".step-0000001.tmp", "unexpected pos")
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".ckpt")]


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


# ---- the README walk-through ---------------------------------------------------------------------

def test_readme_walkthrough_reads_the_folders_it_writes() -> None:
    """Each command of the README's walk-through reads a folder that an earlier one wrote (no
    placeholders), and its demo calibrations use the settings docs/calibrate.md measures."""
    written = set()
    commands = r"^ {4}.*\bmlakit (?:convert|calibrate|validate|check|push) .*$"
    for line in re.findall(commands, (ROOT / "README.md").read_text(), re.M):
        command, *args = line.split("mlakit ", 1)[1].split("#")[0].split()
        paths = [a for a in args if not a.startswith("-")]
        if any(a.isupper() for a in paths):  # a synopsis, not a command
            continue
        if command == "convert":
            written.add(paths[1])
        elif command == "calibrate":
            assert paths[0] in written, line
            assert "--seq-len 256" in line and "--tokens" in line and "--data" not in line, line
            written.add(paths[1])
        else:
            assert paths[1 if command == "validate" else 0] in written, line
    assert {"./demo-mla", "./demo-cal"} <= written


def test_layerwise_fitting_rows_are_spread_over_the_data() -> None:
    """A corpus ordered by kind is fitted on every kind: the fitting rows are evenly spaced over the
    pool, first and last row included, each once; asking for more rows than there are gives them all."""
    ids = torch.arange(40, dtype=torch.int32).view(10, 4)
    packed = data_module.Packed(ids, torch.zeros_like(ids))
    rows = data_module.spread(packed, 4).ids[:, 0] // 4
    assert rows.tolist() == [0, 3, 6, 9]
    assert data_module.spread(packed, 10) is packed and data_module.spread(packed, 12) is packed
