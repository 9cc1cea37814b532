"""The plan before work: headers instead of tensors, shapes checked before the first layer, --dry-run,
and estimates that hold (the memory estimate is checked by benchmarks/bench_memory.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import DEMO_AVAILABLE, make_llama
from safetensors.torch import load_file, save_file

from mlakit.cli import main
from mlakit.core.checkpoint import CheckpointReader

FAST = ["--calib-tokens", "1024", "--calib-seq-len", "128", "--rope-dim", "8", "--kv-lora-rank", "16"]


def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make reading any tensor from a shard fail: what passes after this read headers only."""
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr("mlakit.core.checkpoint.safe_open", refuse)


def test_dtype_and_shapes_come_from_the_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_llama(tmp_path / "src", tied=False, shards=True)
    tensors = {}
    for shard in src.glob("model-*.safetensors"):
        tensors |= load_file(shard)
    no_tensor_reads(monkeypatch)
    reader = CheckpointReader(src)
    assert reader.dtype() == torch.float32
    assert sorted(reader.names) == sorted(tensors)
    for name, t in tensors.items():
        assert reader.info(name).dtype == t.dtype and reader.info(name).shape == tuple(t.shape)


def test_the_dtype_is_that_of_most_weight_elements(tmp_path: Path) -> None:
    tensors = {"a.weight": torch.ones(4), "b.weight": torch.ones(64, 64, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors")
    assert CheckpointReader(tmp_path).dtype() == torch.bfloat16


@pytest.mark.parametrize("model_type,name,shape", [
    ("llama", "model.layers.1.self_attn.k_proj.weight", (48, 64)),
    ("qwen2", "model.layers.0.self_attn.v_proj.bias", (16,)),
    ("llama", "lm_head.weight", (255, 64)),
])
def test_a_wrong_shape_is_refused_before_any_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   model_type: str, name: str, shape: tuple[int, ...]) -> None:
    src = make_llama(tmp_path / "src", model_type=model_type, tied=False)
    tensors = load_file(src / "model.safetensors")
    expected = list(tensors[name].shape)
    tensors[name] = torch.zeros(shape)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})

    def never(*args, **kwargs):
        raise AssertionError("conversion started")

    monkeypatch.setattr("mlakit.convert.pipeline._stream", never)
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), *FAST])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    line = result.output.rstrip().splitlines()[-1]
    assert line.startswith("error: ") and f"{name} has shape {list(shape)}" in line and str(expected) in line, line
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_plan_reads_no_tensor_and_writes_nothing(pico: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    no_tensor_reads(monkeypatch)
    result = CliRunner().invoke(main, ["convert", str(pico), str(tmp_path / "out"), *FAST, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert list(tmp_path.iterdir()) == [pico]
    out = result.output
    assert "every weight's shape matches config.json" in out
    assert "kv_lora_rank 16, rope dim 8" in out
    assert "KV cache per token: 64 -> 24 elements per layer, 256 -> 96 bytes over all layers" in out and "-62.5%" in out
    for figure in ("peak RAM", "GiB", "GB on disk", "time", "GFLOP/s measured now"):
        assert figure in out, out


@pytest.mark.skipif(not DEMO_AVAILABLE, reason="bundled demo model not present")
def test_the_plan_comes_first_and_its_disk_estimate_is_exact(tmp_path: Path) -> None:
    out = tmp_path / "demo-mla"
    args = ["--calib-tokens", "1024", "--calib-seq-len", "256", "--kv-lora-rank", "32"]
    result = CliRunner().invoke(main, ["convert", "demo", str(out), *args])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("plan: demo") and any("estimated: peak RAM" in line for line in lines[:6])
    from mlakit.convert.plan import ConvertOptions, make_plan

    plan = make_plan("demo", ConvertOptions(calib_tokens=1024, calib_seq_len=256, kv_lora_rank=32))
    reader = CheckpointReader(out)
    assert plan.cost.disk_bytes == sum(reader.info(name).nbytes for name in reader.names)
    shards = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert 0 < shards - plan.cost.disk_bytes < 64 * 1024  # the headers
    assert json.loads((out / "mlakit.json").read_text())["kv_cache"] == plan.cache_summary()


def test_the_matmul_rate_is_timed_on_one_thread_and_scaled() -> None:
    """One thread's rate times the thread count, without leaving the thread count changed: with
    several threads, a busy machine reads the rate up to 40% low."""
    from mlakit.convert.cost import matmul_gflops

    threads = torch.get_num_threads()
    assert matmul_gflops.__wrapped__("cpu") > 0
    assert torch.get_num_threads() == threads


def test_the_native_pass_is_in_the_plan_and_prints_its_progress(pico: Path, tmp_path: Path) -> None:
    """--latent native fits each layer's native latent in the conversion pass: the plan's time counts it,
    and the per-layer progress lines report its error (one line per layer when stderr is not a terminal)."""
    from mlakit.convert.plan import ConvertOptions, make_plan

    opts = ConvertOptions(kv_lora_rank=16, rope_dim=8, calib_tokens=1024, calib_seq_len=128, rope_strategy="fold")
    exact = make_plan(str(pico), opts)
    native = make_plan(str(pico), ConvertOptions(**{**vars(opts), "latent": "native"}))
    assert "native latent (fitted per layer in the same pass" in native.describe() and "exact latent" in exact.describe()
    assert native.cost.seconds > exact.cost.seconds
    result = CliRunner().invoke(main, ["convert", str(pico), str(tmp_path / "out"), *FAST, "--latent", "native"])
    assert result.exit_code == 0, result.output
    progress = [line for line in result.output.splitlines() if line.startswith("converting: layer ")]
    assert [line.split(" in ")[0] for line in progress] == ["converting: layer 1/2", "converting: layer 2/2"]
    assert all(", native latent against exact " in line for line in progress)
    assert not list(tmp_path.glob(".out.*")), "one pass: no staging folder beside OUT"


def test_sampling_that_cannot_fit_in_memory_is_refused_before_any_layer(pico: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling holds the whole model: where host memory cannot hold it, one error line before any work,
    naming --calib-text; with --calib-text the layer stream alone runs and nothing is refused."""
    from mlakit.convert.cost import sample_bytes
    from mlakit.convert.plan import ConvertOptions, _work, make_plan

    opts = ConvertOptions(kv_lora_rank=16, rope_dim=8, calib_tokens=1024, calib_seq_len=128, rope_strategy="fold")
    plan = make_plan(str(pico), opts)
    need = sample_bytes(_work(plan.spec, plan.shape, plan.strategies, plan.dtype, plan.reader, opts, 32))
    assert need > 4 * sum(p.stat().st_size for p in pico.glob("*.safetensors"))  # the model in float32, and more
    monkeypatch.setattr("mlakit.convert.plan.available_ram", lambda: need - 1)
    monkeypatch.setenv("MLAKIT_CACHE", str(tmp_path / "cache"))  # nothing sampled yet
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", str(pico), str(out), *FAST])
    assert result.exit_code != 0 and "--calib-text" in result.output and "Traceback" not in result.output
    assert not out.exists()
    text = tmp_path / "text.txt"
    text.write_text("Plain text to calibrate on, written out a few times over. " * 400)
    result = CliRunner().invoke(main, ["convert", str(pico), str(out), *FAST, "--calib-text", str(text)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args,expected", [
    (["--cache", "0.5"], "kv_lora_rank 128, rope dim 64"),  # 192 elements: rope 64 measured better
    (["--cache", "25%"], "kv_lora_rank 64, rope dim 32"),  # 96 elements: rope 32 measured better
    (["--cache", "0.25", "--rope-dim", "64"], "kv_lora_rank 32, rope dim 64"),  # a rope dim given is kept
])
def test_cache_share_sets_the_rank_and_the_rope_dim(tmp_path: Path, args: list[str], expected: str) -> None:
    src = make_llama(tmp_path / "src", heads=3, kv_heads=3, head_dim=64, hidden=48)  # SmolLM2's 384 cache elements
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), *args, "--dry-run"])
    assert result.exit_code == 0, result.output
    share = float(args[1].rstrip("%")) / (100 if args[1].endswith("%") else 1)
    assert expected in result.output and f"384 -> {round(384 * share)} elements per layer" in result.output


@pytest.mark.parametrize("args,message", [
    (["--cache", "1"], "between 0 and 1"),
    (["--cache", "half"], "e.g. 0.5 or 25%"),
    (["--cache", "0.5", "--kv-lora-rank", "16"], "not both"),
    (["--cache", "1%"], "give a larger share"),
])
def test_a_bad_cache_share_is_one_error_line(pico: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["convert", str(pico), str(tmp_path / "out"), *args, "--dry-run"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: ") and message in result.output
