"""`mlakit validate`: exact metrics of a model against itself, measured caches equal to the formula,
a converted pico model end to end, and bad input refused with one line and nothing written."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import DEMO_AVAILABLE, byte_tokenizer, make_llama
from test_check import make_deepseek
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlakit.cli import main
from mlakit.core.checkpoint import CheckpointReader, read_json
from mlakit.core.deepseek import effective_config, mla_shape
from mlakit.core.errors import MlakitError
from mlakit.core.stream import SourceModel
from mlakit.validate import cache, metrics, weights
from mlakit.validate import run as run_module
from mlakit.validate.report import layer_series, render_markdown
from mlakit.validate.run import load_kwargs, parse_max_memory

SMALL = ["--tokens", "1024", "--seq-len", "128", "--contexts", "64,200"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A pico MQA source (head_dim 64) and its lossy conversion (kv_lora_rank 48 of 64)."""
    root = tmp_path_factory.mktemp("pair")
    src = make_llama(root / "src", heads=2, kv_heads=1, head_dim=64, hidden=64, tied=True)
    result = CliRunner().invoke(main, ["convert", str(src), str(root / "mla"), "--kv-lora-rank", "48",
                                       "--calib-tokens", "2048", "--calib-seq-len", "128", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    return src, root / "mla"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("Return the\n\nIf the file\n")
    return path


@pytest.fixture(scope="module")
def validated(pair: tuple[Path, Path], prompts: Path) -> tuple[dict, Path]:
    src, mla = pair
    result = CliRunner().invoke(main, ["validate", str(src), str(mla), *SMALL, "--prompts", str(prompts)])
    assert result.exit_code == 0, result.output
    return json.loads((mla / "report" / "report.json").read_text()), mla / "report"


def _windows(folder: Path, n: int = 4, seq_len: int = 48) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, read_json(folder / "config.json")["vocab_size"], (n, seq_len))


@pytest.fixture(scope="module", params=["llama", "deepseek_v3"])
def any_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp(request.param)
    return make_llama(root / "m") if request.param == "llama" else make_deepseek(root / "m")


@pytest.mark.parametrize("top_k", [None, 16])
def test_a_model_against_itself_is_exact(any_model: Path, top_k: int | None) -> None:
    model = AutoModelForCausalLM.from_pretrained(any_model).eval()
    x = _windows(any_model)
    with torch.inference_mode():
        logits = model(x).logits
    scores = metrics.compare(metrics.reference(logits, x, top_k), logits, x)
    summary = metrics.summarize([scores], x.shape[1])
    assert summary["kl"]["mean"] == 0.0 and summary["kl"]["p99"] == 0.0 and summary["kl"]["max"] == 0.0
    assert summary["top1_agreement"] == 1.0
    assert summary["perplexity"]["source"] == summary["perplexity"]["converted"]
    assert summary["tokens_scored"] == x.shape[0] * (x.shape[1] - 1)
    assert all(r["source"] == r["converted"] for r in summary["by_position"])
    tokenizer = byte_tokenizer()
    first, again = (metrics.greedy(model, tokenizer, ["Return the"], 8) for _ in range(2))
    assert metrics.divergence(first[0], again[0]) is None and 0 < len(first[0]) <= 8


def test_top_k_kl_is_a_lower_bound_equal_at_full_vocabulary() -> None:
    torch.manual_seed(0)
    p = 3 * torch.randn(4, 48, 256)
    q = p + 0.5 * torch.randn(4, 48, 256)
    x = torch.randint(0, 256, (4, 48))
    full = metrics.compare(metrics.reference(p, x, None), q, x).kl
    every = metrics.compare(metrics.reference(p, x, 256), q, x).kl
    top = metrics.compare(metrics.reference(p, x, 32), q, x).kl
    torch.testing.assert_close(every, full, rtol=1e-9, atol=1e-12)
    assert (top <= full + 1e-12).all() and top.mean() > 0.5 * full.mean()
    assert metrics.keep_top_k(32768, 2048) is None and metrics.keep_top_k(32768, 128256) == metrics.TOP_K


def test_divergence_positions() -> None:
    assert metrics.divergence([1, 2, 3], [1, 2, 3]) is None
    assert metrics.divergence([1, 2, 3], [1, 5, 3]) == 2  # counted from 1: the second token differs
    assert metrics.divergence([7, 2], [1, 2]) == 1
    assert metrics.divergence([1, 2], [1, 2, 7]) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_cache_equals_the_formula(any_model: Path, dtype: torch.dtype) -> None:
    model = AutoModelForCausalLM.from_pretrained(any_model, dtype=dtype).eval()
    measured = cache.measure(model, [7, 40, 64], chunk=16)
    per_token = cache.formula_bytes_per_token(any_model, dtype)
    assert measured == {n: per_token * n for n in (7, 40, 64)}
    cfg = read_json(any_model / "config.json")
    if cfg["model_type"] == "llama":
        assert per_token == 2 * 2 * 16 * 2 * dtype.itemsize  # 2 x kv_heads x head_dim x layers x bytes
    else:
        width = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
        assert per_token == width * cfg["num_hidden_layers"] * dtype.itemsize  # (kv_lora_rank + rope) x layers x bytes


def test_attention_error_matches_transformers_modules(pair: tuple[Path, Path]) -> None:
    """The functional per-layer error equals the one computed with transformers' own attention modules."""
    src_dir, mla_dir = pair
    src, mla = (AutoModelForCausalLM.from_pretrained(d).eval() for d in pair)
    x = _windows(src_dir, n=2, seq_len=64)
    cfg = effective_config(read_json(mla_dir / "config.json"))
    with torch.inference_mode():
        hidden = list(src(x, output_hidden_states=True).hidden_states[:-1])
        ours = metrics.attention_errors(SourceModel.load(src_dir, x.shape[1], "cpu"), x, CheckpointReader(mla_dir),
                                        mla_shape(cfg), cfg["rms_norm_eps"], metrics.Rotary.of(mla))
        pos = torch.arange(x.shape[1])[None]
        theirs = []
        for i, h in enumerate(hidden):
            outs = [m.model.layers[i].self_attn(hidden_states=m.model.layers[i].input_layernorm(h),
                                                position_embeddings=m.model.rotary_emb(h, pos),
                                                attention_mask=None)[0] for m in (src, mla)]
            theirs.append(((outs[1] - outs[0]).norm() / outs[0].norm()).item())
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert all(0 < e < 1 for e in ours)


def test_report_has_every_listed_key_and_bounded_numbers(validated: tuple[dict, Path]) -> None:
    report, _ = validated
    ppl = report["perplexity"]
    assert ppl["source"] > 1 and abs(math.log(ppl["converted"] / ppl["source"])) < 0.1
    # measured on this pico pair (random weights, rank 48 of 64) with two versions of convert: ppl +1% / +2.6%,
    # KL mean 0.013 / 0.028, p99 0.16 / 0.30, top-1 90% / 85%; the bounds leave room for convert to change
    assert 0 < report["kl"]["mean"] < 0.1 and report["kl"]["mean"] <= report["kl"]["p99"] < 1.0
    assert 0.7 < report["top1_agreement"] <= 1.0
    kv = report["kv_cache"]
    assert kv["measured_matches"] is True
    assert kv["source_bytes_per_token"] == 2 * 1 * 64 * 2 * 4 and kv["converted_bytes_per_token"] == (48 + 64) * 2 * 4
    assert [r["context"] for r in kv["measured"]] == [64, 200]
    assert len(report["layers"]) == 2 and all(0 < row["attn_rel_error"] < 1 for row in report["layers"])
    assert [g["prompt"] for g in report["generation"]] == ["Return the", "If the file"]
    assert {row["rule"] for row in report["check"]} >= {"model type", "weights", "rms_norm_eps"}
    assert report["conversion"]["shape"]["kv_lora_rank"] == 48
    assert report["text"]["tokens"] == 1024 and report["tokens_scored"] == 8 * 127


def test_perplexity_by_position_splits_each_window_at_its_context_lengths() -> None:
    """Column j of a window's predictions has j + 1 tokens of context: the ranges cover every column once,
    each range's perplexity is the mean over its own columns, and together they give the overall one."""
    assert metrics.position_buckets(300) == [(0, 32), (32, 128), (128, 256), (256, 299)]
    assert metrics.position_buckets(33) == [(0, 32)]
    nll = torch.arange(4 * 299, dtype=torch.float64).view(4, 299) / 1000
    rows = metrics.by_position(torch.zeros_like(nll), nll)
    assert [r["context"] for r in rows] == [[1, 32], [33, 128], [129, 256], [257, 299]]
    assert [r["tokens"] for r in rows] == [4 * 32, 4 * 96, 4 * 128, 4 * 43]
    assert rows[3]["converted"] == pytest.approx(math.exp(nll[:, 256:].mean().item()))
    pooled = sum(r["tokens"] * math.log(r["converted"]) for r in rows) / nll.numel()
    assert pooled == pytest.approx(nll.mean().item()) and all(r["source"] == 1.0 for r in rows)


def test_report_folder_holds_markdown_with_its_plots(validated: tuple[dict, Path]) -> None:
    _, folder = validated
    assert sorted(p.name for p in folder.iterdir()) == ["layer_error.png", "memory.png", "report.json", "report.md"]
    text = (folder / "report.md").read_text()
    for png in ("memory.png", "layer_error.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in text
    assert "columns are each measured on its own text and windows" in text
    report = json.loads((folder / "report.json").read_text())
    assert [r["context"] for r in report["by_position"]] == [[1, 32], [33, 127]]
    for r in report["by_position"]:
        assert f"| {r['context'][0]}-{r['context'][1]} | {r['tokens']:,} | {r['source']:.4f} |" in text
    older = {k: v for k, v in report.items() if k != "by_position"}  # a report.json of mlakit before the table
    assert "By tokens of context" not in render_markdown(older) and "By tokens of context" in text
    for g in report["generation"]:
        if g["diverges_at"] is not None:
            assert f"first differs at generated token {g['diverges_at']} (counted from 1)" in text
    assert not list(folder.parent.glob(".report.tmp-*"))


def validate_fails(src: Path, mla: Path, *args: str) -> str:
    result = CliRunner().invoke(main, ["validate", str(src), str(mla), *SMALL, *args])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / folder.name
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("report"))
    return out


def test_refuses_a_converted_folder_that_is_not_mla(pair: tuple[Path, Path]) -> None:
    src, _ = pair
    assert "is not an MLA model" in validate_fails(src, src)
    assert not (src / "report").exists()


def test_refuses_a_converted_folder_that_fails_check(pair: tuple[Path, Path], tmp_path: Path) -> None:
    src, mla = pair
    bad = _copy(mla, tmp_path)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (bad / "config.json").write_text(json.dumps(cfg))
    line = validate_fails(src, bad)
    assert "fails check (no MTP layers" in line and not (bad / "report").exists()


def test_refuses_different_tokenizers(pair: tuple[Path, Path], tmp_path: Path) -> None:
    src, mla = pair
    bad = _copy(mla, tmp_path)
    tok = AutoTokenizer.from_pretrained(bad)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(bad)
    assert "tokenizers of" in validate_fails(src, bad) and not (bad / "report").exists()


def test_refuses_text_too_short_for_the_tokens(pair: tuple[Path, Path], tmp_path: Path) -> None:
    src, mla = pair
    text = tmp_path / "short.txt"
    text.write_text("def f():\n    return 1\n" * 40)
    line = validate_fails(src, mla, "--text", str(text), "--report", str(tmp_path / "r"))
    assert "fewer than --tokens 1024" in line and not (tmp_path / "r").exists()


def test_refuses_a_report_folder_without_write_access(pair: tuple[Path, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    src, mla = pair
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert "no write access" in validate_fails(src, mla, "--report", str(locked / "r"))
    assert not list(locked.iterdir())


def test_refuses_to_replace_a_folder_that_is_not_a_report(pair: tuple[Path, Path], tmp_path: Path) -> None:
    src, mla = pair
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    assert "not an output of mlakit" in validate_fails(src, mla, "--report", str(tmp_path / "notes"))
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("contexts", ["1024,abc", "0"])
def test_refuses_bad_contexts(pair: tuple[Path, Path], tmp_path: Path, contexts: str) -> None:
    src, mla = pair
    assert "--contexts" in validate_fails(src, mla, "--contexts", contexts, "--report", str(tmp_path / "r"))


@pytest.fixture(scope="module")
def demo_mla(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled demo converted at half its KV cache."""
    if not DEMO_AVAILABLE:
        pytest.skip("the bundled demo model is not trained yet")
    out = tmp_path_factory.mktemp("demo") / "demo-mla"
    result = CliRunner().invoke(main, ["convert", "demo", str(out), "--kv-lora-rank", "64", "--calib-tokens", "4096",
                                       "--calib-seq-len", "256"])
    assert result.exit_code == 0, result.output
    return out


def test_converted_demo_model(demo_mla: Path, prompts: Path) -> None:
    out = demo_mla
    result = CliRunner().invoke(main, ["validate", "demo", str(out), "--tokens", "2048", "--seq-len", "256",
                                       "--contexts", "256", "--prompts", str(prompts)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report" / "report.json").read_text())
    kv = report["kv_cache"]
    assert kv["measured_matches"] and kv["source_bytes_per_token"] == 2 * 2 * 64 * 4 * 2  # 4 layers, bf16
    assert kv["converted_bytes_per_token"] == (64 + 64) * 4 * 2 and kv["reduction_percent"] == 50.0
    # measured (rank 64, 4096 calibration tokens, training-free): ppl 67.57 -> 68.94 (+2.0%),
    # KL mean 0.073, p99 0.59, top-1 agreement 78%, worst layer error 0.25; only the error is bounded,
    # and only from above, so that a better conversion passes
    ppl = report["perplexity"]
    assert 60 < ppl["source"] < 75 and ppl["converted"] < 1.1 * ppl["source"]
    assert report["kl"]["mean"] < 0.2 and report["kl"]["p99"] < 1.5
    assert report["top1_agreement"] > 0.65
    assert all(row["attn_rel_error"] < 0.4 for row in report["layers"])


def test_calibrated_demo_report_names_each_stage(demo_mla: Path, tmp_path: Path, prompts: Path) -> None:
    """A calibrated folder's mlakit.json holds convert's per-layer errors (of the one-shot model) and the
    calibrate run: the report labels the errors by model and text, lists calibrate's settings, and
    explains why the converted demo holds more parameters than the source."""
    cal = tmp_path / "demo-cal"
    result = CliRunner().invoke(main, ["calibrate", str(demo_mla), str(cal), "--tokens", "2048", "--eval-tokens",
                                       "256", "--seq-len", "256", "--layer-steps", "20"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["validate", "demo", str(cal), "--tokens", "1024", "--seq-len", "256",
                                       "--contexts", "256", "--prompts", str(prompts)])
    assert result.exit_code == 0, result.output
    report = json.loads((cal / "report" / "report.json").read_text())
    text = (cal / "report" / "report.md").read_text()
    run = report["conversion"]["calibrate"][0]
    assert run["kept"] == "calibrated"  # 20 Adam steps per layer lower the held-out KL (0.058 -> 0.038)
    assert "`mlakit convert` (one-shot):" in text and "`mlakit calibrate`, run 1:" in text
    assert "- mode: layerwise, teacher `demo`" in text
    assert f"{run['data']['held_out_tokens']} held-out tokens" in text and '"fit_tokens": 2048' in text
    assert f"perplexity {run['before']['student_ppl']:.4f} -> {run['after']['student_ppl']:.4f}" in text
    labels = "| layer | calibrated model, evaluation text, 1024 tokens in windows of 256 (validate) | one-shot " \
             "conversion before calibration, its calibration text, 4096 tokens in windows of 256 (convert) |"
    assert labels in text and "not a before/after pair" in text
    # the demo: 4 heads of 64, 2 kv heads, hidden 256, vocab 2048, tied; MLA heads: nope 64, rope 64, v padded to 128
    params = report["parameters"]
    assert sum(params["source_attention_per_layer"].values()) == 4 * 64 * 256 * 2 + 2 * 2 * 64 * 256  # 196,608
    assert sum(params["converted_attention_per_layer"].values()) == (  # 344,128
        4 * 128 * 256 + 128 * 256 + 64 + 4 * (64 + 128) * 64 + 256 * 4 * 128)
    assert params["converted_zero_padding_per_layer"] == 4 * (64 * 64 + 64 * 256)
    assert params["untied_lm_head"] == 2048 * 256 and params["unexplained"] == 0
    assert "**Weights.** The converted model has 4,786,688 parameters, the source 3,672,320 (+30.3%)" in text
    assert "81,920 of those per layer are zeros" in text
    assert "In all: MLA attention +590,080 parameters over 4 layers, untied lm_head +524,288." in text
    assert "from 2,176 cached tokens on, beyond one sequence's max_position_embeddings 1,024" in text
    assert "kv_b_proj holds every head's own up-projection" in text


def test_layer_series_say_which_model_text_and_windows() -> None:
    """The two series differ in text and windows (and after calibration in weights): each label says what
    it measured, and the report says they are not a before/after pair."""
    layers = [{"layer": 0, "attn_rel_error": 0.1}]
    text = {"seq_len": 512, "layer_tokens": 2048}
    conversion = {"layers": [{"layer": 0, "attn_rel_error": 0.2}], "calibration": {"tokens": 32768, "seq_len": 256}}
    converted = {"layers": layers, "text": text, "conversion": conversion}
    assert [label for label, _ in layer_series(converted)] == [
        "converted model, evaluation text, 2048 tokens in windows of 512 (validate)",
        "converted model, its calibration text, 32768 tokens in windows of 256 (convert)"]
    calibrated = {**converted, "conversion": {**conversion, "calibrate": [{"kept": "calibrated"}]}}
    assert layer_series(calibrated) == [
        ("calibrated model, evaluation text, 2048 tokens in windows of 512 (validate)", [0.1]),
        ("one-shot conversion before calibration, its calibration text, 32768 tokens in windows of 256 (convert)",
         [0.2])]
    unchanged = {**converted, "conversion": {**conversion, "calibrate": [{"kept": "input"}]}}
    assert layer_series(unchanged) == layer_series(converted)
    assert layer_series({**converted, "conversion": None}) == [layer_series(converted)[0]]


def test_parameters_and_break_even_of_the_pico_pair(validated: tuple[dict, Path]) -> None:
    """The pico pair (tied source, head_dim 64): the measured difference is MLA attention plus an untied lm_head,
    and weights plus cache cross where the extra weights equal the cache saved."""
    report, folder = validated
    params, kv = report["parameters"], report["kv_cache"]
    assert params["unexplained"] == 0 and params["untied_lm_head"] == 256 * 64
    assert params["converted_zero_padding_per_layer"] == 2 * (0 + 64 * 48 + 64 * 64)  # v_head 128 for head_dim 64
    extra = kv["weights_bytes"]["converted"] - kv["weights_bytes"]["source"]
    assert kv["break_even_tokens"] == pytest.approx(extra / (kv["source_bytes_per_token"]
                                                             - kv["converted_bytes_per_token"]))
    assert "**Weights.**" in (folder / "report.md").read_text()


def test_break_even_context() -> None:
    assert weights.break_even_tokens({"source": 10, "converted": 20}, {"source": 3, "converted": 1}) == 5
    assert weights.break_even_tokens({"source": 20, "converted": 10}, {"source": 3, "converted": 1}) == 0
    assert weights.break_even_tokens({"source": 10, "converted": 20}, {"source": 3, "converted": 3}) is None
    assert weights.break_even_tokens({"source": 20, "converted": 10}, {"source": 1, "converted": 3}) is None


def test_placement_on_cuda_uses_a_device_map() -> None:
    """A model is spread over the GPUs as it loads, never whole on one, unless one GPU is named."""
    assert load_kwargs(torch.device("cpu")) == {"dtype": "auto"}
    assert load_kwargs(torch.device("cuda")) == {"dtype": "auto", "device_map": "auto"}
    assert load_kwargs(torch.device("cuda:1")) == {"dtype": "auto", "device_map": {"": 1}}
    limits = parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB")
    assert limits == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    assert load_kwargs(torch.device("cuda"), limits) == {"dtype": "auto", "device_map": "auto", "max_memory": limits}
    for device in ("cpu", "cuda:0"):
        with pytest.raises(MlakitError, match="--max-memory spreads a model over the GPUs"):
            load_kwargs(torch.device(device), limits)
    for bad in ("gpu0=1GiB", "0=lots", ",", "0=12"):
        with pytest.raises(MlakitError, match="give DEVICE=SIZE pairs"):
            parse_max_memory(bad)


def test_a_device_map_placed_model_gives_the_same_report(pair: tuple[Path, Path], validated: tuple[dict, Path],
                                                        prompts: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The device_map path (accelerate places the model as it loads; here every layer lands on the CPU)
    scores exactly as the plain load does."""
    monkeypatch.setattr(run_module, "load_kwargs", lambda device, max_memory: {"dtype": "auto", "device_map": "auto"})
    src, mla = pair
    result = CliRunner().invoke(main, ["validate", str(src), str(mla), *SMALL, "--prompts", str(prompts),
                                       "--report", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    report, plain = json.loads((tmp_path / "r" / "report.json").read_text()), validated[0]
    for key in ("perplexity", "kl", "top1_agreement", "layers", "generation"):
        assert report[key] == plain[key], key
    assert report["kv_cache"]["measured"] == plain["kv_cache"]["measured"]


def test_refuses_max_memory_without_cuda(pair: tuple[Path, Path], tmp_path: Path) -> None:
    src, mla = pair
    line = validate_fails(src, mla, "--device", "cpu", "--max-memory", "0=1GiB", "--report", str(tmp_path / "r"))
    assert "--max-memory spreads a model over the GPUs" in line and not (tmp_path / "r").exists()
    assert "give DEVICE=SIZE pairs" in validate_fails(src, mla, "--max-memory", "0=lots")
