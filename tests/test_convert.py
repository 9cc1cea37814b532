"""The convert command end to end on pico models: exact cases, format invariants, families."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import DEMO_AVAILABLE, DEVICES, make_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV3ForCausalLM, DynamicCache

from mlakit.cli import main
from mlakit.convert.pipeline import summary
from mlakit.core.checkpoint import SAFETENSORS_DTYPES, CheckpointReader, ShardWriter
from mlakit.core.guard import DEMO_DIR
from mlakit.core.text import DEFAULT_TEXT, token_windows
from mlakit.validate.check import check_folder

FAST = ["--calib-tokens", "2048", "--calib-seq-len", "128", "--dtype", "fp32"]


def run_convert(src: Path, out: Path, *args: str) -> None:
    result = CliRunner().invoke(main, ["convert", str(src), str(out), *FAST, *args])
    assert result.exit_code == 0, result.output
    assert "KV cache per token per layer" in result.output


def load_pair(src: Path, out: Path) -> tuple[torch.nn.Module, DeepseekV3ForCausalLM]:
    source = AutoModelForCausalLM.from_pretrained(src).eval()
    converted, info = DeepseekV3ForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    return source, converted.eval()


@pytest.mark.parametrize("device", DEVICES)
def test_mqa_full_latent_is_exact_prefill_and_cached_decode(tmp_path: Path, device: str) -> None:
    """MQA with rope dim = head dim and a full latent: every step of the conversion is exact, with
    the passes and the factorization on each device."""
    src = make_llama(tmp_path / "mqa", kv_heads=1, tied=False)
    run_convert(src, tmp_path / "out", "--rope-dim", "16", "--kv-lora-rank", "16", "--latent", "exact",
                "--device", device)
    source, converted = load_pair(src, tmp_path / "out")
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        ref = source(ids).logits
        torch.testing.assert_close(converted(ids).logits, ref, rtol=1e-4, atol=1e-4)
        cache = DynamicCache(config=converted.config)
        first = converted(ids[:, :30], cache=cache, use_cache=True).logits
        steps = [converted(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(30, 40)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), ref, rtol=1e-4, atol=1e-4)


def test_default_rope_is_written_as_yarn_with_factor_one(tmp_path: Path) -> None:
    """The same rope (transformers' logits match the source's exactly over 300 positions), written as
    YaRN with factor 1, which vLLM's CPU backend computes right; every engine's rope row passes."""
    src = make_llama(tmp_path / "mqa", kv_heads=1, tied=False)
    run_convert(src, tmp_path / "out", "--rope-dim", "16", "--kv-lora-rank", "16", "--latent", "exact")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["rope_parameters"]["factor"] == 1.0
    assert cfg["rope_scaling"]["factor"] == 1.0 and cfg["rope_parameters"]["original_max_position_embeddings"] == 512
    source, converted = load_pair(src, tmp_path / "out")
    ids = torch.randint(0, 256, (1, 300))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, source(ids).logits, rtol=1e-4, atol=1e-4)
    rows = {r.rule: r.status for r in check_folder(tmp_path / "out").rules if r.rule.startswith("rope: ")}
    assert len(rows) == 6 and set(rows.values()) == {"pass"}, rows


def test_output_obeys_the_format_contract(tmp_path: Path) -> None:
    src = make_llama(tmp_path / "gqa", head_dim=64, hidden=128, heads=2, kv_heads=1, tied=True, shards=True)
    run_convert(src, tmp_path / "out", "--kv-lora-rank", "32", "--dtype", "bf16")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert cfg["first_k_dense_replace"] == cfg["num_hidden_layers"] and isinstance(cfg["n_routed_experts"], int)
    assert cfg["num_nextn_predict_layers"] == 0 and cfg["q_lora_rank"] is None
    assert cfg["num_key_value_heads"] == cfg["num_attention_heads"]
    assert (cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]) == (64, 64, 128)
    assert cfg["rope_interleave"] is True and cfg["tie_word_embeddings"] is False
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["attention_bias"] is False
    assert cfg["lm_config"] == {"q_lora_rank": 0, "n_group": 0, "topk_group": 0}  # read by llama.cpp only
    # kv_lora_rank 32 + rope 64 is a width vLLM does not take: every other engine's rules pass
    assert {r.rule for r in check_folder(tmp_path / "out").failures} == {"vLLM MLA width", "vLLM CPU MLA width"}
    reader = CheckpointReader(tmp_path / "out")
    assert "lm_head.weight" in reader and not any(n.endswith(".bias") for n in reader.names)
    for i in range(2):  # the exact format's norm constant is a power of two: exact in bf16
        norm = reader.get(f"model.layers.{i}.self_attn.kv_a_layernorm.weight").double()
        assert torch.equal(norm, 2.0 ** norm.log2().round())
    assert all(reader.get(n).dtype == torch.bfloat16 for n in reader.names)
    for name in ("tokenizer.json", "generation_config.json", "mlakit.json"):
        assert (tmp_path / "out" / name).is_file()
    record = json.loads((tmp_path / "out" / "mlakit.json").read_text())
    assert record["kv_cache"]["converted_elements_per_token_layer"] == 32 + 64
    assert len(record["layers"]) == 2
    assert [s.get("text", s["kind"]) for s in record["calibration"]["sources"]] == \
        ["bundled calibration mix", "sampled from the source model"]
    _, converted = load_pair(src, tmp_path / "out")
    assert converted.dtype == torch.bfloat16
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_streamed_shards_read_back_bit_for_bit(tmp_path: Path) -> None:
    """Every dtype, empty and 0-d tensors, non-contiguous input, several shards: stock safetensors reads
    back exactly what was written, and the index names every tensor once."""
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t.{dtype}".replace("torch.", ""): (torch.randn(37, 5, generator=gen) * 100).to(dtype)
               for dtype in SAFETENSORS_DTYPES}
    tensors |= {"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "transposed": torch.randn(6, 9).T}
    writer = ShardWriter(tmp_path, max_bytes=2000)
    for name, t in tensors.items():
        writer.add(name, t)
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(tensors) and len(set(index["weight_map"].values())) > 2
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    back = {}
    for shard in set(index["weight_map"].values()):
        back |= load_file(tmp_path / shard)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name].view(-1).view(torch.uint8), t.contiguous().view(-1).view(torch.uint8)), name
    assert not list(tmp_path.glob("shard-*"))


def demo_as(family: str, folder: Path) -> Path:
    """The bundled demo (a trained Llama) in fp32 as a Mistral, or as a Qwen2 with q/k/v biases added
    (N(0, 0.1), seeded), so that each family's conversion is measured on trained attention."""
    shutil.copytree(DEMO_DIR, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type=family, architectures=[f"{family.capitalize()}ForCausalLM"], dtype="float32",
               sliding_window=None)
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors = {name: t.float() for name, t in load_file(folder / "model.safetensors").items()}
    gen = torch.Generator().manual_seed(0)
    for i in range(cfg["num_hidden_layers"] if family == "qwen2" else 0):
        for p in ("q", "k", "v"):
            rows = tensors[f"model.layers.{i}.self_attn.{p}_proj.weight"].shape[0]
            tensors[f"model.layers.{i}.self_attn.{p}_proj.bias"] = 0.1 * torch.randn(rows, generator=gen)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.skipif(not DEMO_AVAILABLE, reason="bundled demo model missing")
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_families_convert_load_and_stay_close(tmp_path: Path, family: str) -> None:
    """Each family converts (rope budget chosen among three, rank 64 of 128 elements) and loads, and
    its next-token distributions on held-out text stay within a bound of the source's (measured:
    Mistral KL 0.091, relative logit error 0.108, top-1 69%; Qwen2 with its biases 0.102, 0.106, 75%)."""
    src = demo_as(family, tmp_path / family)
    run_convert(src, tmp_path / "out", "--rope-dim", "32")
    source, converted = load_pair(src, tmp_path / "out")
    text = DEFAULT_TEXT.read_text(encoding="utf-8")[-20000:]
    ids = token_windows(AutoTokenizer.from_pretrained(src), text, 512, 128, what="evaluation")
    with torch.no_grad():
        got, ref = converted(ids).logits, source(ids).logits
    lp, lq = ref.log_softmax(-1), got.log_softmax(-1)
    assert (lp.exp() * (lp - lq)).sum(-1).mean() < 0.13
    assert (got - ref).norm() / ref.norm() < 0.14 and (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.6
    record = json.loads((tmp_path / "out" / "mlakit.json").read_text())
    assert set(record["rope"]["strategy_errors"]) == {"fold", "even", "high"}


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128},
])
def test_rope_scaling_is_carried_exactly_in_transformers(tmp_path: Path, rope: dict) -> None:
    src = make_llama(tmp_path / "src", kv_heads=1, rope_parameters=rope, tied=False)
    run_convert(src, tmp_path / "out", "--rope-dim", "16", "--kv-lora-rank", "16", "--llama3-rope", "keep",
                "--latent", "exact")
    source, converted = load_pair(src, tmp_path / "out")
    ids = torch.randint(0, 256, (1, 300))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, source(ids).logits, rtol=2e-4, atol=2e-4)


def test_llama3_as_fitted_yarn(tmp_path: Path) -> None:
    """Llama-3.1's rope written as YaRN within what every engine reads (llama.cpp's fixed beta 32/1):
    the source's own factor and length fit best; the ramp leaves a worst relative error of 0.486."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    src = make_llama(tmp_path / "src", kv_heads=1, head_dim=128, hidden=128, heads=1, layers=1, rope_parameters=rope)
    run_convert(src, tmp_path / "out", "--kv-lora-rank", "64", "--rope-strategy", "even")
    record = json.loads((tmp_path / "out" / "mlakit.json").read_text())
    params = record["rope"]["rope_parameters"]
    assert params["rope_type"] == "yarn" and params["attention_factor"] == 1.0
    assert (params["beta_fast"], params["beta_slow"]) == (32.0, 1.0)
    assert (params["factor"], params["original_max_position_embeddings"]) == (8.0, 8192)
    assert abs(record["rope"]["max_relative_frequency_error"] - 0.486) < 1e-3
    rows = {r.rule: r.status for r in check_folder(tmp_path / "out").rules if r.rule.startswith("rope: ")}
    assert set(rows.values()) == {"pass"}, rows


def test_calibration_windows_can_start_with_the_bos_token(tmp_path: Path) -> None:
    """--calib-bos calibrates on --calib-text windows led by the tokenizer's BOS, says so in
    mlakit.json, and is refused in one line when the tokenizer has none or there is no text."""
    src = make_llama(tmp_path / "src")
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    small = ["--rope-dim", "16", "--kv-lora-rank", "16", "--calib-text", str(text)]
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "refused"), *FAST, *small, "--calib-bos"])
    assert result.exit_code != 0 and "no bos_token" in result.output
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "refused"), *FAST, "--calib-bos"])
    assert result.exit_code != 0 and "--calib-bos" in result.output
    tok = AutoTokenizer.from_pretrained(src)
    tok.bos_token = tok.convert_ids_to_tokens(1)
    tok.save_pretrained(src)
    for flag in ("--calib-bos", "--no-calib-bos"):
        run_convert(src, tmp_path / flag.lstrip("-"), *small, flag)
        record = json.loads((tmp_path / flag.lstrip("-") / "mlakit.json").read_text())
        assert record["calibration"]["sources"][0]["bos"] == (flag == "--calib-bos")
        assert record["calibration"]["tokens"] == 2048
        assert ("led by the BOS token" in summary(record)) == (flag == "--calib-bos")
    load_pair(src, tmp_path / "calib-bos")


def test_the_moment_shrink_follows_the_calibration_source(tmp_path: Path) -> None:
    """The default shrink is 0.5 on the default set and with --calib-mix and 0 on --calib-text alone;
    --shrink overrides it, changes the latent, is recorded in mlakit.json and is refused outside [0, 1]."""
    from mlakit.convert.plan import ConvertOptions

    text = tmp_path / "calib.txt"
    assert ConvertOptions().moment_shrink == 0.5
    assert ConvertOptions(calib_text=[text], calib_mix=True).moment_shrink == 0.5
    assert ConvertOptions(calib_text=[text]).moment_shrink == 0.0
    assert ConvertOptions(calib_text=[text], shrink=0.3).moment_shrink == 0.3
    src = make_llama(tmp_path / "src", layers=2)
    text.write_text(" ".join(f"word{i % 97} and word{i % 13}." for i in range(3000)))
    small = ["--rope-dim", "16", "--kv-lora-rank", "16", "--calib-text", str(text)]
    kv_a = {}
    for name, extra in (("default", []), ("half", ["--shrink", "0.5"])):
        run_convert(src, tmp_path / name, *small, *extra)
        record = json.loads((tmp_path / name / "mlakit.json").read_text())
        assert record["factorization"]["shrink"] == (0.5 if extra else 0.0)
        kv_a[name] = load_file(tmp_path / name / "model.safetensors")["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert not torch.equal(kv_a["default"], kv_a["half"])
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "bad"), *FAST, *small, "--shrink", "2"])
    assert result.exit_code != 0 and "--shrink" in result.output and not (tmp_path / "bad").exists()


def test_filled_value_dims_are_written_and_load(tmp_path: Path) -> None:
    """With `extra_values`, a source of head dim 16 (v_head_dim 128) gets its value rows plus latent
    directions they leave out, up to the latent's rank; o_proj's columns past them stay zero, the
    folder loads in transformers and mlakit.json says how many value dims are filled. The o_proj
    refit uses them (layer 0 refits in both runs), and the logits stay as close to the source's."""
    from mlakit.convert.pipeline import convert
    from mlakit.convert.plan import ConvertOptions

    src = make_llama(tmp_path / "src", layers=2)
    errors = {}
    for extra in (False, True):
        out = tmp_path / f"out-{extra}"
        convert(str(src), out, ConvertOptions(kv_lora_rank=24, rope_dim=8, calib_tokens=2048, calib_seq_len=128,
                                              dtype="fp32", extra_values=extra), log=lambda m: None)
        record = json.loads((out / "mlakit.json").read_text())
        assert record["factorization"]["value_dims"] == (24 if extra else 16)
        source, converted = load_pair(src, out)
        ids = torch.randint(0, 256, (2, 64))
        with torch.no_grad():
            ref = source(ids).logits
            errors[extra] = ((converted(ids).logits - ref).norm() / ref.norm()).item()
        o = load_file(out / "model.safetensors")["model.layers.0.self_attn.o_proj.weight"].unflatten(1, (4, 128))
        assert o[..., record["factorization"]["value_dims"]:].abs().max() == 0
        assert (o[..., 16:24].abs().max() > 0) == extra  # the refit used the filled dims
    assert errors[True] < 1.1 * errors[False], errors
