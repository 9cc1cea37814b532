"""`mlakit check`: a good DeepSeek-V3 folder passes, and breaking any one rule fails exactly that rule."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import byte_tokenizer, make_llama
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from mlakit.cli import main
from mlakit.core import deepseek, engines
from mlakit.core.latent import latent_norm_trick
from mlakit.core.errors import MlakitError
from mlakit.validate.check import ALL, SOURCES, Rule, check_folder, require_mla


def make_deepseek(folder: Path, *, layers: int = 2, kv_lora_rank: int = 512, seed: int = 0) -> Path:
    """A random pico DeepSeek-V3 in the output format: dense, plain q_proj, head dims (64, 64, 128), the
    default rope written as convert writes it (YaRN with factor 1, in both rope fields), with the block
    of values llama.cpp's converter reads. kv_lora_rank 512 + rope 64 is the width every engine takes."""
    torch.manual_seed(seed)
    rope = deepseek.default_rope_as_yarn({"rope_type": "default", "rope_theta": 10000.0}, 256)
    cfg = DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=kv_lora_rank,
        qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=layers, n_routed_experts=1,
        num_nextn_predict_layers=0, tie_word_embeddings=False, max_position_embeddings=256, rms_norm_eps=1e-6,
        n_group=1, topk_group=1, num_experts_per_tok=1, **{deepseek.LLAMACPP_BLOCK: dict(deepseek.LLAMACPP_VALUES)},
        rope_parameters=rope,
    )
    DeepseekV3ForCausalLM(cfg).to(torch.float32).save_pretrained(folder)
    set_rope(folder, rope)
    byte_tokenizer().save_pretrained(folder)
    return folder


def set_rope(folder: Path, rope: dict) -> None:
    """Write a rope into config.json as convert does: `rope_parameters`, and the older `rope_scaling`
    (without rope_theta) that MLX reads."""
    raw = json.loads((folder / "config.json").read_text())
    raw["rope_parameters"] = rope
    raw["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    (folder / "config.json").write_text(json.dumps(raw))


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_deepseek(tmp_path_factory.mktemp("check") / "good")


def broken_copy(good: Path, tmp_path: Path, config: dict | None = None,
                weights: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    """A copy of the good folder with config.json fields replaced (None removes one) or weights edited."""
    folder = tmp_path / "broken"
    shutil.copytree(good, folder)
    raw = json.loads((folder / "config.json").read_text())
    for key, value in (config or {}).items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    (folder / "config.json").write_text(json.dumps(raw))
    if weights:
        tensors = load_file(folder / "model.safetensors")
        weights(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def failing(folder: Path) -> set[str]:
    return {r.rule for r in check_folder(folder).failures}


def test_good_folder_passes_every_rule(good: Path) -> None:
    result = check_folder(good)
    assert not result.failures, result.table()
    assert not [r.rule for r in result.rules if r.status == "warn"], result.table()
    assert all(result.loads(engine) for engine in ALL)
    assert result.decode_kernels("vllm") == ["FA3-MLA", "CUTLASS MLA", "Triton MLA"]
    assert result.decode_kernels("sglang")[0] == "FlashMLA, TRT-LLM MLA"


@pytest.mark.parametrize("rank,refused,kernels", [
    (32, {"vllm", "vllm-cpu"}, None),  # width 96: vLLM fails on the first forward pass
    (256, {"vllm-cpu"}, ["Triton MLA"]),  # width 320: vLLM's GPU backends take it, the CPU one does not
])
def test_latent_widths_vllm_refuses_fail_for_vllm_only(tmp_path: Path, rank: int, refused: set[str],
                                                       kernels: list[str] | None) -> None:
    result = check_folder(make_deepseek(tmp_path / f"r{rank}", layers=1, kv_lora_rank=rank))
    assert {e for e in ALL if not result.loads(e)} == refused, result.table()
    assert {r.rule for r in result.failures} <= {"vLLM MLA width", "vLLM CPU MLA width"}
    if kernels:
        assert result.decode_kernels("vllm") == kernels
    assert {r.rule: r.status for r in result.rules}["SGLang fast MLA decode"] == "warn"


CONFIG_CASES = [
    ({"model_type": "llama"}, {"model type"}),
    ({"first_k_dense_replace": 1}, {"dense layers"}),
    ({"num_nextn_predict_layers": 1}, {"no MTP layers"}),
    ({"num_nextn_predict_layers": None}, {"no MTP layers"}),
    ({"num_key_value_heads": 1}, {"kv heads"}),
    ({"q_lora_rank": 16}, {"plain q_proj", "llama.cpp q_lora_rank"}),
    ({"attention_bias": True}, {"attention_bias"}),
    ({"hidden_act": "gelu"}, {"hidden_act"}),
    ({"rope_interleave": False}, {"rope_interleave"}),
    ({"tie_word_embeddings": True}, {"untied lm_head"}),
    ({"qk_nope_head_dim": 32}, {"vLLM prefill head dims", "weight shapes"}),
    ({"initializer_range": "wide"}, {"config"}),
]


@pytest.mark.parametrize("config,rules", CONFIG_CASES)
def test_each_broken_config_rule_fails(good: Path, tmp_path: Path, config: dict, rules: set[str]) -> None:
    assert failing(broken_copy(good, tmp_path, config)) == rules


def exact(tensors: dict[str, torch.Tensor]) -> None:
    """The good folder's weights in the exact latent format (its random latent is at a natural scale)."""
    for i in range(2):
        p = f"model.layers.{i}."
        kv_a, gamma = tensors[p + "self_attn.kv_a_proj_with_mqa.weight"], tensors[p + "input_layernorm.weight"]
        rank = tensors[p + "self_attn.kv_a_layernorm.weight"].shape[0]
        latent, norm = latent_norm_trick(kv_a[:rank], gamma, 64)
        tensors[p + "self_attn.kv_a_proj_with_mqa.weight"] = torch.cat([latent, kv_a[rank:]])
        tensors[p + "self_attn.kv_a_layernorm.weight"] = norm


def test_rms_norm_eps_is_fixed_by_the_exact_format_only(good: Path, tmp_path: Path) -> None:
    """The native format keeps a source's eps (1e-5 here); the exact one fails without 1e-6."""
    assert failing(broken_copy(good, tmp_path, {"rms_norm_eps": 1e-5})) == set()
    assert failing(broken_copy(good, tmp_path / "exact", {"rms_norm_eps": 1e-5}, weights=exact)) == {"rms_norm_eps"}


def test_fp16_fails_the_exact_format_only(good: Path, tmp_path: Path) -> None:
    """A random model's latent is at a natural scale (native); scaled by the exact trick, fp16 fails it."""
    assert failing(broken_copy(good, tmp_path, {"dtype": "float16"})) == set()
    folder = broken_copy(good, tmp_path / "exact", {"dtype": "float16"}, weights=exact)
    result = check_folder(folder)
    assert {r.rule for r in result.failures} == {"dtype"}
    assert {r.rule for r in result.rules if r.status == "warn"} >= {"quantize f16", "quantize q8_0", "quantize fp8"}


def null_experts(folder: Path) -> Path:
    """The folder with n_routed_experts written as null (broken_copy drops a key set to None)."""
    raw = json.loads((folder / "config.json").read_text())
    raw["n_routed_experts"] = None
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def test_null_experts_fail_in_transformers_vllm_and_sglang(good: Path, tmp_path: Path) -> None:
    folder = null_experts(broken_copy(good, tmp_path))
    assert failing(folder) == {"n_routed_experts", "config"}
    assert {e for e in ALL if not check_folder(folder).loads(e)} == {"transformers", "vllm", "vllm-cpu", "sglang"}


@pytest.mark.parametrize("block,rules", [
    (None, {"llama.cpp q_lora_rank", "llama.cpp expert groups"}),
    ({"q_lora_rank": 0}, {"llama.cpp expert groups"}),
    ({"n_group": 0, "topk_group": 0}, {"llama.cpp q_lora_rank"}),
    ({**deepseek.LLAMACPP_VALUES, "q_lora_rank": 16}, {"llama.cpp q_lora_rank"}),
])
def test_llama_cpp_values_fail_llama_cpp_only(good: Path, tmp_path: Path, block: dict | None, rules: set[str]) -> None:
    folder = broken_copy(good, tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw[deepseek.LLAMACPP_BLOCK] = block
    (folder / "config.json").write_text(json.dumps(raw))
    result = check_folder(folder)
    assert failing(folder) == rules and not result.loads("llamacpp")
    assert result.loads("transformers") and result.loads("vllm") and result.loads("sglang")


def _rope_rows(good: Path, tmp_path: Path, rope: dict) -> dict[str, str]:
    folder = broken_copy(good, tmp_path)
    set_rope(folder, rope)
    result = check_folder(folder)
    assert not result.failures, result.table()
    return {r.rule.removeprefix("rope: "): r.status for r in result.rules if r.rule.startswith("rope: ")}


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "attention_factor": 1.0}


def test_llama3_rope_differs_in_every_engine_but_transformers(good: Path, tmp_path: Path) -> None:
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    assert _rope_rows(good, tmp_path, rope) == {
        "transformers": "pass", "vLLM": "warn", "vLLM (CPU)": "warn", "SGLang": "warn", "llama.cpp": "warn",
        "MLX": "pass"}


def test_output_yarn_is_computed_alike_by_every_engine(good: Path, tmp_path: Path) -> None:
    beta_fast, beta_slow = deepseek.LLAMACPP_YARN_BETAS
    rope = {**YARN, "beta_fast": beta_fast, "beta_slow": beta_slow, "mscale": deepseek.YARN_MSCALE,
            "mscale_all_dim": deepseek.YARN_MSCALE}
    assert set(_rope_rows(good, tmp_path, rope).values()) == {"pass"}


@pytest.mark.parametrize("change", [{"beta_fast": 4.0}, {"mscale": 0.0, "mscale_all_dim": 0.0}])
def test_yarn_that_llama_cpp_reads_differently_warns_for_it_only(good: Path, tmp_path: Path, change: dict) -> None:
    rope = {**YARN, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": deepseek.YARN_MSCALE,
            "mscale_all_dim": deepseek.YARN_MSCALE, **change}
    rows = _rope_rows(good, tmp_path, rope)
    assert rows == {"transformers": "pass", "vLLM": "pass", "vLLM (CPU)": "pass", "SGLang": "pass",
                    "llama.cpp": "warn", "MLX": "pass"}


def test_llama_cpp_keeps_yarn_magnitude_when_mscale_all_dim_is_zero() -> None:
    cfg = {**DeepseekV3Config(qk_rope_head_dim=64).to_dict(), "rope_parameters": {**YARN, "mscale": 0.0,
                                                                              "mscale_all_dim": 0.0}}
    engines = deepseek.engine_rope(cfg)
    magnitude = 1 + 0.1 * math.log(4.0)
    assert engines["transformers"].logit_scale == 1.0 and engines["vllm"].rotary_logit_scale == 1.0
    assert engines["llamacpp"].logit_scale == pytest.approx(magnitude**2)
    assert engines["llamacpp"].rotary_logit_scale == pytest.approx(magnitude**4)


def _drop(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.pop(name)


def _add_bias(tensors: dict[str, torch.Tensor]) -> None:
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)


def _wrong_rank(tensors: dict[str, torch.Tensor]) -> None:
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    tensors[name] = tensors[name][:, :16].contiguous()


WEIGHT_CASES = [
    (_drop("model.layers.1.self_attn.kv_a_layernorm.weight"), "weights"),
    (_add_bias, "no bias weights"),
    (_drop("lm_head.weight"), "lm_head weight"),
    (_wrong_rank, "weight shapes"),
]


@pytest.mark.parametrize("edit,rule", WEIGHT_CASES)
def test_each_broken_weight_rule_fails(good: Path, tmp_path: Path, edit, rule: str) -> None:
    assert failing(broken_copy(good, tmp_path, weights=edit)) == {rule}


def without_tokenizer(folder: Path) -> Path:
    """The folder without the tokenizer files make_deepseek writes."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    return folder


def test_missing_tokenizer_fails_for_the_servers(good: Path, tmp_path: Path) -> None:
    folder = without_tokenizer(broken_copy(good, tmp_path))
    result = check_folder(folder)
    assert failing(folder) == {"tokenizer"} and result.loads("transformers") and not result.loads("vllm")


def test_cli_prints_every_rule_and_exits_by_outcome(good: Path, tmp_path: Path) -> None:
    ok = CliRunner().invoke(main, ["check", str(good)])
    assert ok.exit_code == 0, ok.output
    assert "PASS  weights" in ok.output and "vLLM:" in ok.output and "Triton MLA" in ok.output
    bad = CliRunner().invoke(main, ["check", str(broken_copy(good, tmp_path, {"rope_interleave": False}))])
    assert bad.exit_code == 1 and "FAIL  rope_interleave" in bad.output
    assert [line for line in bad.output.splitlines() if line.startswith("error: ")] == [
        f"error: {tmp_path / 'broken'}: 1 rule(s) fail"]


def test_cli_says_a_source_model_is_not_an_mla_folder(tmp_path: Path) -> None:
    """A plain Llama is not a folder that fails rules but no MLA folder at all: one line says so,
    with no engine verdicts."""
    result = CliRunner().invoke(main, ["check", str(make_llama(tmp_path / "llama"))])
    assert result.exit_code == 1 and "fails" not in result.output and "transformers:" not in result.output
    assert result.output.strip().splitlines() == [
        f"error: {tmp_path / 'llama'} is not an MLA model (model_type llama, architectures ['LlamaForCausalLM']); "
        "convert it first with `mlakit convert`"]


def test_yarn_without_original_length_fails_where_it_is_not_inferred(good: Path, tmp_path: Path) -> None:
    """transformers infers original_max_position_embeddings; vLLM, SGLang and llama.cpp's converter need it."""
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    result = check_folder(broken_copy(good, tmp_path, {"rope_parameters": rope}))
    rows = {r.rule: r.status for r in result.rules if r.rule.startswith("rope: ")}
    assert rows == {"rope: transformers": "pass", "rope: vLLM": "fail", "rope: vLLM (CPU)": "fail",
                    "rope: SGLang": "fail", "rope: llama.cpp": "fail", "rope: MLX": "warn"}
    assert result.loads("transformers") and not any(result.loads(e) for e in ("vllm", "vllm-cpu", "sglang",
                                                                              "llamacpp"))


def test_a_folder_only_serving_engines_refuse_still_validates(good: Path, tmp_path: Path) -> None:
    """validate runs transformers: a folder that llama.cpp or vLLM refuses (no llama.cpp block, a width
    vLLM does not take) still validates; one that transformers refuses does not."""
    assert require_mla(broken_copy(good, tmp_path, {deepseek.LLAMACPP_BLOCK: None}), "old").failures
    assert require_mla(make_deepseek(tmp_path / "narrow", layers=1, kv_lora_rank=32), "narrow").failures
    with pytest.raises(MlakitError, match="fails check .no MTP layers"):
        require_mla(broken_copy(good, tmp_path / "b", {"num_nextn_predict_layers": 1}), "bad")


def test_older_rope_scaling_field_is_read_like_rope_parameters(good: Path, tmp_path: Path) -> None:
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.0,
            "mscale_all_dim": 0.0}
    folder = broken_copy(good, tmp_path, {"rope_parameters": None, "rope_scaling": rope, "rope_theta": 10000.0})
    rows = {r.rule: r.detail for r in check_folder(folder).rules if r.rule.startswith("rope: ")}
    assert rows["rope: transformers"].startswith("yarn as written") and "logits x 1.29648" in rows["rope: llama.cpp"]


@pytest.mark.parametrize("config,refused", [
    ({"hidden_act": "gelu"}, {"vllm", "vllm-cpu", "sglang", "llamacpp", "mlx"}),  # transformers computes gelu
    ({"attention_bias": True}, {"mlx"}),  # vLLM and SGLang never read it
    ({"num_nextn_predict_layers": 1}, {"transformers"}),  # vLLM and SGLang skip MTP layers
    ({"num_key_value_heads": 1}, {"transformers", "llamacpp"}),  # MLA in vLLM, SGLang and MLX ignores it
    ({"rope_interleave": False}, {"vllm", "vllm-cpu", "llamacpp", "mlx"}),  # SGLang follows it
    ({"tie_word_embeddings": True}, {"vllm", "vllm-cpu", "mlx"}),  # SGLang and llama.cpp tie
    ({"initializer_range": "wide"}, {"transformers", "vllm", "vllm-cpu", "sglang"}),  # llama.cpp and MLX read json
])
def test_a_config_rule_refuses_only_the_engines_whose_source_enforces_it(good: Path, tmp_path: Path, config: dict,
                                                                          refused: set[str]) -> None:
    result = check_folder(broken_copy(good, tmp_path, config))
    assert {e for e in ALL if not result.loads(e)} == refused, result.table()


# The version label each engine's citations start with.
SOURCE_LABELS = {"vllm": engines.VLLM, "vllm-cpu": engines.VLLM, "sglang": engines.SGLANG,
                 "llamacpp": engines.LLAMACPP, "mlx": engines.MLX}


def uncited(row: Rule) -> list[str]:
    """The engines besides transformers that a row names but whose source file its bracketed citation does not."""
    return [e for e in row.engines if e != "transformers"
            and not re.search(rf"\[.*{re.escape(SOURCE_LABELS[e])}: [\w/.-]+\.(py|cpp|h)\b", row.detail)]


def test_every_failing_engine_row_cites_the_engine_source(good: Path, tmp_path: Path) -> None:
    """Every row that fails for vLLM, SGLang, llama.cpp or MLX names the source file of each of those engines,
    and these folders make every cited rule fail or warn."""
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}  # no original length
    folders = [broken_copy(good, tmp_path / f"c{i}", config) for i, (config, _) in enumerate(CONFIG_CASES)]
    folders += [broken_copy(good, tmp_path / f"w{i}", weights=edit) for i, (edit, _) in enumerate(WEIGHT_CASES)]
    folders += [
        null_experts(broken_copy(good, tmp_path / "experts")),
        broken_copy(good, tmp_path / "llamacpp", {deepseek.LLAMACPP_BLOCK: None}),
        broken_copy(good, tmp_path / "rope", {"rope_parameters": yarn}),
        without_tokenizer(broken_copy(good, tmp_path / "tokenizer")),
        broken_copy(good, tmp_path / "eps", {"rms_norm_eps": 1e-5}, weights=exact),
        broken_copy(good, tmp_path / "fp16", {"dtype": "float16"}, weights=exact),
        make_deepseek(tmp_path / "narrow", layers=1, kv_lora_rank=32),
    ]
    rows = [row for folder in folders for row in check_folder(folder).rules if row.status != "pass"]
    missing = {f"{row.rule}: {e}" for row in rows if row.status == "fail" for e in uncited(row)}
    assert not missing, f"no engine source cited: {sorted(missing)}"
    assert set(SOURCES) <= {row.rule for row in rows}, "a cited rule is never broken here"
