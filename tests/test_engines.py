"""The shapes each engine takes (core/engines.py), `--kv-lora-rank ENGINE`, and the zero-padded latent."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_llama
from transformers import AutoModelForCausalLM

from mlakit.cli import main
from mlakit.core import deepseek, engines
from mlakit.core.deepseek import MLAShape
from mlakit.validate.check import check_folder

FAST = ["--calib-tokens", "2048", "--calib-seq-len", "128", "--dtype", "fp32"]
# Where bench_engines.py unpacks llama.cpp; MLAKIT_LLAMA_CPP names another llama.cpp source folder.
LLAMA_CPP = Path(os.environ.get("MLAKIT_LLAMA_CPP", "")) if os.environ.get("MLAKIT_LLAMA_CPP") else next(
    iter(sorted((Path.home() / ".cache" / "mlakit" / "llama.cpp").glob("llama_cpp_python-*/vendor/llama.cpp"))), None)


def shape(rank: int, rope: int = 64, nope: int = 64, v: int = 128) -> MLAShape:
    return MLAShape(64, 2, nope, rope, v, rank)


# For each rule: a shape it takes and one it refuses (None: it takes every shape).
RULE_CASES = {
    "vLLM MLA width": (shape(256), shape(128)),
    "vLLM CPU MLA width": (shape(512), shape(256)),
    "vLLM prefill head dims": (shape(32), shape(32, nope=32)),
    "vLLM FA3-MLA decode": (shape(512), shape(448)),
    "vLLM CUTLASS MLA decode": (shape(512), shape(448, rope=128)),
    "SGLang fast MLA decode": (shape(512), shape(256)),
    "llama.cpp MLA shape": (shape(17, rope=8), None),
    "MLX MLA shape": (shape(17, rope=8), None),
}


def test_every_engine_rule_is_tested_and_cites_its_source() -> None:
    assert set(RULE_CASES) == {rule.name for rule in engines.SHAPE_RULES}
    versions = (engines.VLLM, engines.SGLANG, engines.LLAMACPP, engines.MLX)
    for rule in engines.SHAPE_RULES:
        assert rule.source.startswith(versions), rule.name
        assert re.search(r"[\w/]+\.(py|cpp):\d+", rule.source), rule.name


@pytest.mark.parametrize("name", sorted(RULE_CASES))
def test_each_engine_rule_takes_and_refuses_what_its_source_says(name: str) -> None:
    rule = next(r for r in engines.SHAPE_RULES if r.name == name)
    takes, refuses = RULE_CASES[name]
    assert rule.accepts(takes)
    assert refuses is None or not rule.accepts(refuses)


@pytest.mark.parametrize("target,cache,rope,expected", [
    ("vllm", 1024, 64, (512, None)),  # widest of 320/512/576 within 1024: 576
    ("vllm", 384, 64, (256, None)),  # SmolLM2-135M (3 kv heads of 64): 320
    ("vllm", 256, 64, (192, 256)),  # nothing within 256: 320, the source fills 192
    ("vllm-cpu", 384, 64, (320, 512)),  # the CPU backend's 576, padded
    ("vllm-cpu", 2048, 64, (512, None)),
])
def test_engine_rank_takes_the_widest_width_within_the_cache_or_pads(target: str, cache: int, rope: int,
                                                                      expected: tuple[int, int | None]) -> None:
    choice = engines.engine_rank(target, cache, rope, lambda k: shape(k, rope))
    assert (choice.filled, choice.padded) == expected


def test_engine_rank_says_why_no_width_fits() -> None:
    with pytest.raises(ValueError, match="no width it takes has rope dim 32"):
        engines.engine_rank("vllm-cpu", 4096, 32, lambda k: shape(k, 32))


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A pico source with 2 kv heads of 64 (a cache of 256 elements) converted at rope 64 and the full
    latent it can fill (192), in the exact and the native format."""
    tmp = tmp_path_factory.mktemp("pad")
    src = make_llama(tmp / "src", heads=4, kv_heads=2, head_dim=64, hidden=64, tied=False)
    out = {"src": src}
    for latent in ("exact", "native"):
        out[latent] = tmp / latent
        result = CliRunner().invoke(main, ["convert", str(src), str(out[latent]), *FAST, "--kv-lora-rank", "192",
                                           "--latent", latent])
        assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("latent", ["exact", "native"])
def test_zero_padded_latent_gives_the_same_logits(converted: dict[str, Path], tmp_path: Path, latent: str) -> None:
    """`--kv-lora-rank vllm-cpu` on a source that fills 192 latent dims: the conversion at 192, padded as
    each layer is written to 512 (the CPU backend's only width), computes what the unpadded one does:
    zero rows and columns, and in the native format the norm weights rescaled for the mean over more
    dims."""
    padded = tmp_path / "padded"
    result = CliRunner().invoke(main, ["convert", str(converted["src"]), str(padded), *FAST, "--kv-lora-rank", "vllm-cpu",
                                       "--latent", latent])
    assert result.exit_code == 0, result.output
    record = json.loads((padded / "mlakit.json").read_text())
    assert record["latent_padding"] == {"filled": 192, "kv_lora_rank": 512}
    assert record["kv_cache"]["converted_elements_per_token_layer"] == 576
    assert json.loads((padded / "config.json").read_text())["kv_lora_rank"] == 512
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = _logits(converted[latent], ids)
    # fp32 rounding only: the native format's norm weights are rescaled by sqrt(512 / 192), which
    # moves the last bits of the normalized latent (measured: up to 1.2e-5 on one logit of 24576)
    tol = 1e-5 if latent == "exact" else 5e-5
    torch.testing.assert_close(_logits(padded, ids), ref, rtol=1e-5, atol=tol)
    result = check_folder(padded)
    assert not result.failures, result.table()
    assert {r.rule: r.detail for r in result.rules}["latent format"].startswith(latent)


def test_kv_lora_rank_names_an_engine(converted: dict[str, Path], tmp_path: Path) -> None:
    """`--kv-lora-rank vllm-cpu` on a source whose cache (256) is narrower than the CPU backend's 576:
    the latent the source fills (192), zero-padded to 512, the same model as the unpadded one, served
    by every engine check knows."""
    out = tmp_path / "cpu"
    result = CliRunner().invoke(main, ["convert", str(converted["src"]), str(out), *FAST, "--kv-lora-rank", "vllm-cpu",
                                       "--latent", "exact"])
    assert result.exit_code == 0, result.output
    assert "the source fills 192 dims" in result.output and "latent zero-padded from 192 to kv_lora_rank 512" in \
        result.output
    assert not list(tmp_path.glob(".cpu.*")), "staging folders are removed"
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(out, ids), _logits(converted["exact"], ids), rtol=1e-5, atol=1e-5)
    check = check_folder(out)
    assert all(check.loads(e) for e in engines.ENGINE_NAMES), check.table()
    record = json.loads((out / "mlakit.json").read_text())
    assert record["shape"]["kv_lora_rank"] == 512 and record["latent_padding"]["filled"] == 192


@pytest.mark.parametrize("args,message", [
    (["--kv-lora-rank", "sglang-fast"], "give a number, or an engine: vllm, vllm-cpu"),
    (["--kv-lora-rank", "vllm-cpu", "--rope-dim", "32"], "no width it takes has rope dim 32"),
    (["--kv-lora-rank", "200"], "or name an engine"),
])
def test_engine_rank_refusals_are_one_line(converted: dict[str, Path], tmp_path: Path, args: list[str],
                                           message: str) -> None:
    result = CliRunner().invoke(main, ["convert", str(converted["src"]), str(tmp_path / "out"), *FAST, *args])
    assert result.exit_code == 1 and message in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error: ")]


def test_the_plan_says_which_engines_serve_the_shape(converted: dict[str, Path]) -> None:
    result = CliRunner().invoke(main, ["convert", str(converted["src"]), "unused", *FAST, "--kv-lora-rank", "64",
                                       "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "engines: served by SGLang, llama.cpp, MLX; refused by vLLM, vLLM (CPU)" in result.output
    assert "refused: vLLM MLA width: latent width 128" in result.output and "mla_attention.py:1601" in result.output


@pytest.mark.skipif(LLAMA_CPP is None, reason="llama.cpp's source is not unpacked (benchmarks/bench_engines.py does it)")
def test_llama_cpp_converter_reads_the_llama_cpp_block(converted: dict[str, Path]) -> None:
    """llama.cpp's convert_hf_to_gguf.py merges the `lm_config` block over the top level (its
    `lm_config` -> `text_config` rename): the values only llama.cpp may see reach its hparams."""
    probe = """
import sys, tempfile
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
from pathlib import Path
import gguf
from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
folder = Path(sys.argv[2])
cls = get_model_class(get_model_architecture(ModelBase.load_hparams(folder, False), ModelType.TEXT))
model = cls(folder, gguf.LlamaFileType.ALL_F32, Path(tempfile.mkdtemp()) / "x.gguf", dry_run=True)
model.set_gguf_parameters()
kv = {k: v.value for d in model.gguf_writer.kv_data for k, v in d.items()}
print(cls.__name__, kv.get("deepseek2.attention.q_lora_rank"), kv.get("deepseek2.expert_group_count"))
"""
    proc = subprocess.run([sys.executable, "-c", probe, str(LLAMA_CPP), str(converted["exact"])],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-3:] == ["DeepseekV2Model", str(deepseek.LLAMACPP_VALUES["q_lora_rank"]),
                                        str(deepseek.LLAMACPP_VALUES["n_group"])]


def test_bench_scores_the_tokens_llama_perplexity_scores():
    """llama-perplexity scores the logits of positions n_ctx/2 .. n_ctx-2 of each chunk
    (tools/perplexity/perplexity.cpp), so n_ctx - 1 - n_ctx/2 tokens; the bench's transformers,
    vLLM and MLX sides must score the same ones, or every llama.cpp row is off by a token a chunk."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_engines import scored_ppl

    n_ctx = 8
    logprobs = torch.full((2, n_ctx - 1), -100.0)  # logprobs[:, t]: token t + 1; unscored ones huge
    first = n_ctx // 2
    logprobs[:, first:] = torch.tensor([[-1.0, -2.0, -3.0], [-2.0, -2.0, -2.0]])
    assert n_ctx - 1 - first == 3
    assert scored_ppl(logprobs) == pytest.approx(math.exp(2.0))  # the mean log-probability is -2
