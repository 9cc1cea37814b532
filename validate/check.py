"""`mlakit check`: will stock transformers, vLLM (GPU and CPU), SGLang, llama.cpp and MLX load and serve a
folder, and with which MLA kernels and rope.

One row per rule of the output format (README and docs/engines.md), each naming the engines it matters to and
citing, in brackets, the engine source lines the rule comes from (core/engines.py's form: version, file:line). The
numbers behind the rules live in core/deepseek.py and core/engines.py (the shape rules, with their sources); the
other rules' sources are SOURCES below. This module only reads a folder and applies them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import safe_open
from transformers import AutoConfig

from mlakit.core import deepseek, engines
from mlakit.core.latent import latent_is_linear
from mlakit.core.checkpoint import CheckpointReader, read_json, resolve_model
from mlakit.core.engines import LLAMACPP, MLX, SGLANG, VLLM
from mlakit.core.errors import MlakitError
from mlakit.validate import quant

ALL = ("transformers", "vllm", "vllm-cpu", "sglang", "llamacpp", "mlx")
PYTHON = ("transformers", "vllm", "vllm-cpu", "sglang")
NATIVE = ("vllm", "vllm-cpu", "sglang", "llamacpp")
SERVERS = (*NATIVE, "mlx")
VLLMS = ("vllm", "vllm-cpu")
ENGINE_NAMES = engines.ENGINE_NAMES
# How a verdict of an engine that refuses the folder starts.
FAILS = "fails"
# How close an engine's rope must come to transformers' (relative) to count as the same.
ROPE_TOLERANCE = 1e-6
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# Layers whose kv_a_proj_with_mqa the quantization rules read.
QUANT_CHECK_LAYERS = 8

# The engine source each rule comes from, by rule name, printed in the row as engines.ShapeRule prints its own.
# SGLang is not installed here: its rules cite file and function, read from the public repository, not pinned
# to a line of 0.5.23. The shape rules cite theirs in engines.SHAPE_RULES.
_VLLM_DEEPSEEK = "vllm/model_executor/models/deepseek_v2.py"
_SGLANG_DEEPSEEK = "sglang/srt/models/deepseek_v2.py"
_SGLANG_LOADER = ("sglang/srt/models/deepseek_common/deepseek_weight_loader.py "
                  "DeepseekV2WeightLoaderMixin.do_load_weights")
_MLX_DEEPSEEK = "mlx_lm/models/deepseek_v3.py"
_MLX_STRICT = "mlx_lm/utils.py:599 load_weights(strict=True)"
_VLLM_ROPE = (f"{VLLM}: {_VLLM_DEEPSEEK}:1115 (every scaled rope read as DeepSeek YaRN), "
              "vllm/model_executor/layers/rotary_embedding/__init__.py:284-286 (reads factor and "
              "original_max_position_embeddings)")
SOURCES = {
    "model type": f"{VLLM}: vllm/model_executor/models/registry.py:91; {SGLANG}: {_SGLANG_DEEPSEEK} EntryClass; "
                  f"{LLAMACPP}: conversion/deepseek.py:227 (architectures it converts); {MLX}: mlx_lm/utils.py:222 "
                  "(module named by model_type)",
    "config": f"{VLLM}: vllm/transformers_utils/config.py:399 AutoConfig.from_pretrained; {SGLANG}: "
              "sglang/srt/utils/hf_transformers/config.py get_config (AutoConfig.from_pretrained)",
    "dense layers": f"{VLLM}: {_VLLM_DEEPSEEK}:1293-1297; {SGLANG}: {_SGLANG_DEEPSEEK} "
                    f"DeepseekV2DecoderLayer._is_layer_sparse; {LLAMACPP}: src/models/deepseek2.cpp:126 (expert "
                    f"tensors from leading_dense_block_count on); {MLX}: {_MLX_DEEPSEEK}:297-303",
    "n_routed_experts": f"{VLLM}: {_VLLM_DEEPSEEK}:1632; {SGLANG}: {_SGLANG_LOADER}",
    "kv heads": f"{LLAMACPP}: conversion/deepseek.py:442 (asserts kv_b_proj holds num_key_value_heads heads)",
    "plain q_proj": f"{VLLM}: {_VLLM_DEEPSEEK}:1051, :1081; {SGLANG}: {_SGLANG_DEEPSEEK} "
                    f"DeepseekV2AttentionMLA.__init__; {MLX}: {_MLX_DEEPSEEK}:69",
    "attention_bias": f"{MLX}: {_MLX_DEEPSEEK}:85, :98, {_MLX_STRICT}",
    "hidden_act": f"{VLLM}: {_VLLM_DEEPSEEK}:278 (raises); {SGLANG}: {_SGLANG_DEEPSEEK} DeepseekV2MLP.__init__ "
                  f"(raises); {LLAMACPP}: src/models/deepseek2.cpp:651 (always SiLU); {MLX}: {_MLX_DEEPSEEK}:190 "
                  "(always SiLU)",
    "rope_interleave": f"{VLLM}: {_VLLM_DEEPSEEK}:1126 is_neox_style=False; {LLAMACPP}: src/llama-model.cpp:3095 "
                       f"(LLAMA_ROPE_TYPE_NORM for deepseek2); {MLX}: {_MLX_DEEPSEEK}:112 traditional=True",
    "untied lm_head": f"{VLLM}: {_VLLM_DEEPSEEK}:1918 (lm_head never tied); {MLX}: {_MLX_DEEPSEEK}:373",
    "rms_norm_eps": f"{VLLM}: {_VLLM_DEEPSEEK}:1098; {SGLANG}: {_SGLANG_DEEPSEEK} DeepseekV2AttentionMLA.__init__; "
                    f"{LLAMACPP}: src/models/deepseek2.cpp:10, :537",
    "llama.cpp q_lora_rank": f"{LLAMACPP}: conversion/base.py:1293, :1352 ({deepseek.LLAMACPP_BLOCK} merged over the "
                             "top level), conversion/deepseek.py:344; src/models/deepseek2.cpp:12-13 (key required "
                             "unless 26 or 27 layers), :109 (0: plain wq)",
    "llama.cpp expert groups": f"{LLAMACPP}: src/llama-model.cpp:1362-1374",
    "rope: vLLM": _VLLM_ROPE,
    "rope: vLLM (CPU)": f"{_VLLM_ROPE}, vllm/model_executor/layers/rotary_embedding/base.py:298 forward_cpu (default)",
    "rope: SGLang": f"{SGLANG}: {_SGLANG_DEEPSEEK} DeepseekV2AttentionMLA.__init__ (every scaled rope read as "
                    "deepseek_yarn), sglang/srt/layers/rotary_embedding get_rope",
    "rope: llama.cpp": f"{LLAMACPP}: conversion/base.py:1463-1482 (YaRN reads original_max_position_embeddings, "
                       "linear its factor), conversion/deepseek.py:382 (mscale_all_dim), src/models/deepseek2.cpp:34, "
                       "src/llama-hparams.h:161-162 (beta 32/1, never read for deepseek2)",
    "rope: MLX": f"{MLX}: mlx_lm/models/rope_utils.py:305, :318, :326 initialize_rope (rope_scaling), "
                 f"{_MLX_DEEPSEEK}:101-107",
    "weights": f"{VLLM}: vllm/model_executor/model_loader/default_loader.py:563 (missing), {_VLLM_DEEPSEEK}:1820 "
               f"(unexpected); {SGLANG}: {_SGLANG_LOADER} (loads only what the folder holds); {LLAMACPP}: "
               f"conversion/base.py:630 (unexpected), src/llama-model-loader.cpp:1159 (missing); {MLX}: {_MLX_STRICT}",
    "no bias weights": f"{VLLM}: {_VLLM_DEEPSEEK}:1702, :1808 (dropped); {SGLANG}: {_SGLANG_LOADER} (dropped); "
                       f"{LLAMACPP}: src/llama-model-loader.cpp:1398 (wrong number of tensors); {MLX}: {_MLX_STRICT}, "
                       f"{_MLX_DEEPSEEK}:85, :98",
    "lm_head weight": f"{VLLM}: {_VLLM_DEEPSEEK}:1918, vllm/model_executor/model_loader/default_loader.py:563; "
                      f"{SGLANG}: {_SGLANG_DEEPSEEK} DeepseekV2ForCausalLM.__init__; {MLX}: {_MLX_DEEPSEEK}:373",
    "weight shapes": f"{VLLM}: vllm/model_executor/layers/linear.py:592, "
                     f"vllm/model_executor/model_loader/weight_utils.py:1485; {SGLANG}: "
                     f"sglang/srt/model_loader/weight_utils.py default_weight_loader; {LLAMACPP}: "
                     f"src/llama-model-loader.cpp:917; {MLX}: {_MLX_STRICT} (mlx 0.32.4 mlx/nn/layers/base.py:199)",
    "dtype": f"{VLLM}: vllm/config/model.py:2462-2468 (--dtype auto: the config's); {SGLANG}: "
             f"sglang/srt/configs/model_config.py _get_and_verify_dtype; {LLAMACPP}: conversion/base.py:181-196 "
             f"(--outtype auto: the tensors'); {MLX}: mlx_lm/utils.py:456 (as stored)",
    "tokenizer": f"{VLLM}: vllm/config/model.py:596-597; {SGLANG}: sglang/srt/server_args.py "
                 f"ServerArgs._handle_missing_default_values; {LLAMACPP}: conversion/deepseek.py:265 set_vocab; {MLX}: "
                 "mlx_lm/utils.py:699",
}


@dataclass(frozen=True)
class Rule:
    """One rule's outcome: `status` is pass, warn (served, but not as well) or fail."""

    rule: str
    status: str
    engines: tuple[str, ...]
    detail: str


def _cited(rule: str, detail: str) -> str:
    """The detail with the engine source the rule comes from (SOURCES), where it has one."""
    return f"{detail} [{SOURCES[rule]}]" if rule in SOURCES else detail


def _rule(rule: str, ok: bool, engines: tuple[str, ...], value: str, why: str = "", *, warn: bool = False) -> Rule:
    """A row whose detail is the value found, plus the reason it matters when the rule is not met, and the
    engine source the rule comes from."""
    detail = value if ok or not why else f"{value}: {why}"
    return Rule(rule, "pass" if ok else "warn" if warn else "fail", engines, _cited(rule, detail))


@dataclass
class CheckResult:
    """The rows for one folder, and what they mean for each engine."""

    folder: Path
    rules: list[Rule]

    @property
    def failures(self) -> list[Rule]:
        return [r for r in self.rules if r.status == "fail"]

    def loads(self, engine: str) -> bool:
        return not any(engine in r.engines for r in self.failures)

    def decode_kernels(self, engine: str) -> list[str]:
        """The MLA decode kernels an engine serves this shape with: the fast ones it fits, then the fallback."""
        fast = [rule.kernel for rule in engines.SHAPE_RULES if rule.kernel and engine in rule.engines
                and any(r.rule == rule.name and r.status == "pass" for r in self.rules)]
        return fast + [engines.FALLBACK_DECODE[engine]]

    def verdicts(self) -> dict[str, str]:
        """One line per engine: whether it loads (and serves) the folder, and with which kernels."""
        out = {}
        for engine in ALL:
            if not self.loads(engine):
                reasons = "; ".join(r.rule for r in self.failures if engine in r.engines)
                out[engine] = f"{FAILS} ({reasons})"
            elif engine == "llamacpp":
                out[engine] = "loads after convert_hf_to_gguf.py, no overrides (if that script knows the tokenizer)"
            elif engine in engines.FALLBACK_DECODE:
                out[engine] = f"serves; MLA decode kernels: {', '.join(self.decode_kernels(engine))}"
            else:
                out[engine] = "loads"
        return out

    def as_dicts(self) -> list[dict]:
        return [{**asdict(r), "engines": list(r.engines)} for r in self.rules]

    def table(self) -> str:
        width = max(len(r.rule) for r in self.rules)
        lines = [f"{r.status.upper():4}  {r.rule:{width}}  {r.detail}" for r in self.rules]
        lines.append("")
        lines += [f"{ENGINE_NAMES[e] + ':':13} {v}" for e, v in self.verdicts().items()]
        return "\n".join(lines)


def _config_rules(folder: Path, raw: dict) -> list[Rule]:
    """The config.json rules. Each names only the engines whose source enforces it (SOURCES): llama.cpp's
    converter and MLX read config.json without transformers; vLLM and SGLang serve a model without its MTP
    layers, and their MLA attention reads neither num_key_value_heads nor attention_bias; SGLang follows
    rope_interleave and tie_word_embeddings, as transformers does."""
    try:
        AutoConfig.from_pretrained(folder)
        loads, why = True, "transformers reads it as DeepseekV3Config"
    except Exception as exc:  # strict configs raise several types
        loads, why = False, (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    cfg = deepseek.effective_config(raw)
    layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    experts = cfg["n_routed_experts"]
    return [
        _rule("config", loads, PYTHON, why),
        _rule("dense layers", cfg["first_k_dense_replace"] == layers, ALL,
              f"first_k_dense_replace {cfg['first_k_dense_replace']}, num_hidden_layers {layers}",
              "must be equal (every layer dense)"),
        _rule("n_routed_experts", isinstance(experts, int) and not isinstance(experts, bool), PYTHON, f"{experts!r}",
              "must be an int even when dense (transformers' strict config rejects null, vLLM and SGLang add to it)"),
        _rule("no MTP layers", cfg["num_nextn_predict_layers"] == 0, ("transformers",),
              f"num_nextn_predict_layers {cfg['num_nextn_predict_layers']}",
              "must be 0 (transformers 5 defaults to 1 and then expects MTP weights)"),
        _rule("kv heads", cfg["num_key_value_heads"] == heads, ("transformers", "llamacpp"),
              f"num_key_value_heads {cfg['num_key_value_heads']}, num_attention_heads {heads}", "must be equal"),
        _rule("plain q_proj", cfg["q_lora_rank"] is None, (*PYTHON, "mlx"), f"q_lora_rank {cfg['q_lora_rank']}",
              "must be null (any other value builds q_a_proj and q_b_proj)"),
        _rule("attention_bias", cfg["attention_bias"] is False, ("mlx",), f"{cfg['attention_bias']}",
              "must be false (MLX then builds attention biases the folder does not hold)"),
        _rule("hidden_act", cfg["hidden_act"] == "silu", SERVERS, f"{cfg['hidden_act']}", "must be silu"),
        _rule("rope_interleave", cfg["rope_interleave"] is True, (*VLLMS, "llamacpp", "mlx"),
              f"{cfg['rope_interleave']}", "must be true (vLLM, llama.cpp and MLX always rotate interleaved pairs)"),
        _rule("untied lm_head", cfg["tie_word_embeddings"] is False, (*VLLMS, "mlx"),
              f"tie_word_embeddings {cfg['tie_word_embeddings']}", "must be false (vLLM and MLX never tie)"),
    ]


def _eps_rule(cfg: dict, exact: bool) -> Rule:
    """The exact format needs rms_norm_eps to be the eps transformers fixes for kv_a_layernorm, since the
    other engines use rms_norm_eps for it and its output is latent / sqrt(eps); the native format's
    latent is at a normal scale, where that eps is immaterial (`deepseek.output_eps`)."""
    eps = cfg["rms_norm_eps"]
    if not exact:
        return Rule("rms_norm_eps", "pass", NATIVE,
                    _cited("rms_norm_eps", f"{eps:g}: the native latent's norm does not depend on it"))
    return _rule("rms_norm_eps", eps == deepseek.LATENT_NORM_EPS, NATIVE, f"{eps:g}",
                 f"the exact latent format needs {deepseek.LATENT_NORM_EPS:g} (kv_a_layernorm uses "
                 f"{deepseek.LATENT_NORM_EPS:g} in transformers and rms_norm_eps in vLLM, SGLang and llama.cpp)")


def _llamacpp_rules(raw: dict, cfg: dict) -> list[Rule]:
    """What llama.cpp's converter writes and its deepseek2 loader asserts, read from the config as the
    converter sees it (the llama.cpp block merged over the top level)."""
    seen = {**cfg, **(raw.get(deepseek.LLAMACPP_BLOCK) or {})}
    q_rank, layers = seen["q_lora_rank"], cfg["num_hidden_layers"]
    q_ok = layers in (26, 27) or isinstance(q_rank, int) and (q_rank == 0) == (cfg["q_lora_rank"] is None)
    experts, used = seen["n_routed_experts"] or 0, seen["num_experts_per_tok"] or 0
    groups, groups_used = seen["n_group"] or 0, seen["topk_group"] or 0
    grouping = groups <= 1 or (experts % groups == 0 and 0 < groups_used < groups)
    experts_ok = used <= experts and (used > 0 and groups < experts and grouping if experts else groups == 0)
    fix = f'add "{deepseek.LLAMACPP_BLOCK}": {json.dumps(deepseek.LLAMACPP_VALUES)}'
    return [
        _rule("llama.cpp q_lora_rank", q_ok, ("llamacpp",), f"q_lora_rank {q_rank} as llama.cpp's converter reads it",
              f"its loader requires the key and reads 0 as a plain q_proj; {fix}"),
        _rule("llama.cpp expert groups", experts_ok, ("llamacpp",),
              f"n_routed_experts {experts}, num_experts_per_tok {used}, n_group {groups}, topk_group {groups_used}",
              f"its loader asserts num_experts_per_tok <= n_routed_experts and n_group < n_routed_experts; {fix}"),
    ]


def _rope_rules(raw: dict, cfg: dict) -> list[Rule]:
    """One row per engine: what it computes from the rope fields, against transformers' (exact) rope.
    A config with only the older `rope_scaling` (and top-level rope_theta) is read as transformers does."""
    theta = raw.get("rope_theta", cfg["rope_parameters"]["rope_theta"])
    older = {"rope_type": "default", **(raw.get("rope_scaling") or {}), "rope_theta": theta}
    rope = raw.get("rope_parameters") or older
    engines = deepseek.engine_rope({**cfg, "rope_parameters": rope})
    ref = engines["transformers"]
    rows = []
    for engine, got in engines.items():
        name = f"rope: {ENGINE_NAMES[engine]}"
        if got.inv_freq is None or ref.inv_freq is None:
            rows.append(Rule(name, "fail", (engine,), _cited(name, got.reads)))
            continue
        diff = ((got.inv_freq - ref.inv_freq).abs() / ref.inv_freq).max().item()
        scales = (got.logit_scale, got.rotary_logit_scale)
        same = diff <= ROPE_TOLERANCE and all(abs(a / b - 1) <= ROPE_TOLERANCE for a, b in
                                               zip(scales, (ref.logit_scale, ref.rotary_logit_scale)))
        where = "" if engine == "transformers" else f", max relative difference from transformers {diff:.3g}"
        detail = (f"{got.reads}: {len(got.inv_freq)} frequencies {got.inv_freq[0]:.4g}..{got.inv_freq[-1]:.4g}{where}; "
                  f"logits x {scales[0]:.6g}, rotary part x {scales[1]:.6g}")
        rows.append(_rule(name, same, (engine,), detail, "differs from transformers", warn=True))
    return rows


def _shape_rules(shape: deepseek.MLAShape) -> list[Rule]:
    """One row per engine shape rule, with the engine source it comes from: a shape an engine refuses
    fails for it; one that only misses a fast kernel warns."""
    return [_rule(rule.name, ok, rule.engines, rule.detail(shape), warn=not rule.fatal)
            for rule, ok in engines.shape_rows(shape)]


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Shapes from the safetensors headers, without reading any tensor."""
    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as fh:
            shapes.update({name: tuple(fh.get_slice(name).get_shape()) for name in fh.keys()})
    return shapes


def _weight_rules(folder: Path, cfg: dict) -> list[Rule]:
    try:
        names = set(CheckpointReader(folder).names)
    except MlakitError as exc:
        return [Rule("weights", "fail", ALL, _cited("weights", str(exc)))]
    expected = deepseek.expected_shapes(cfg)
    biases = sorted(n for n in names if n.endswith(".bias"))
    missing = sorted(set(expected) - names - {"lm_head.weight"})
    unknown = sorted(names - set(expected) - set(biases))
    found = _shapes(folder)
    wrong = [f"{n} {found[n]} (config says {expected[n]})" for n in sorted(expected) if n in found
             and found[n] != expected[n]]
    rules = [
        _rule("weights", not missing and not unknown, ALL,
              f"{len(missing)} missing{f' (first {missing[0]})' if missing else ''}, {len(unknown)} unexpected"
              f"{f' (first {unknown[0]})' if unknown else ''}", "transformers refuses missing or unexpected weights"),
        _rule("no bias weights", not biases, SERVERS, f"{len(biases)} bias tensors"
              f"{f' (first {biases[0]})' if biases else ''}",
              "vLLM and SGLang drop them, llama.cpp has none, MLX loads them only with attention_bias"),
        _rule("lm_head weight", "lm_head.weight" in names, (*VLLMS, "sglang", "mlx"),
              "lm_head.weight " + ("present" if "lm_head.weight" in names else "missing"),
              "vLLM and MLX never tie it, SGLang only with tie_word_embeddings"),
    ]
    if found:
        rules.append(_rule("weight shapes", not wrong, ALL,
                           f"{len(wrong)} differ from config.json{f', first {wrong[0]}' if wrong else ''}"))
    else:
        rules.append(Rule("weight shapes", "warn", ALL,
                          _cited("weight shapes", "no safetensors files, shapes not checked")))
    return rules


def _latent_rules(folder: Path, cfg: dict, dtype: str | None) -> tuple[list[Rule], bool]:
    """The latent format (read from layer 0's weights), the dtypes it holds in, and for each weight
    quantization scheme whether the latent rows survive it as well as the rope rows beside them
    (on up to QUANT_CHECK_LAYERS layers spread over the depth); and whether the format is exact."""
    reader = CheckpointReader(folder)
    rank, layers, hidden = cfg["kv_lora_rank"], cfg["num_hidden_layers"], cfg["hidden_size"]
    kv_a = {i: reader.get(deepseek.attention_names(i)["kv_a_proj_with_mqa"]).float()
            for i in sorted({round(k * (layers - 1) / max(QUANT_CHECK_LAYERS - 1, 1))
                             for k in range(min(layers, QUANT_CHECK_LAYERS))})}
    gamma = reader.get("model.layers.0.input_layernorm.weight").float()
    exact = latent_is_linear(kv_a[0][:rank], gamma, hidden)
    dtypes = deepseek.LATENT_TRICK_DTYPES if exact else deepseek.NATIVE_DTYPES
    rules = [
        Rule("latent format", "pass", ALL, "exact (kv_a_layernorm linear on every input)" if exact else
             "native (kv_a_layernorm normalizing, kv_b_proj refitted)"),
        _rule("dtype", dtype in dtypes, ALL, f"{dtype}",
              f"must be one of {', '.join(sorted(dtypes))} (fp16 flushes the exact format's scaled latent into "
              "subnormals)"),
    ]
    for scheme in quant.SCHEMES:
        errors = [quant.latent_errors(w, rank, scheme) for w in kv_a.values()]
        latent, rope = max(errors, key=lambda e: e[0] / max(e[1], 1e-30))
        ok = latent <= quant.SURVIVAL_FACTOR * max(rope, 1e-30)
        why = ("the exact format's latent rows are too small for it and the quantized model loses its attention; "
               "reconvert with `mlakit convert --latent native`" if exact else
               "the latent rows lose more than the other weights; quality will drop")
        rules.append(_rule(f"quantize {scheme}", ok, ALL, f"{quant.SCHEME_NAMES[scheme]}: latent rows lose "
                           f"{latent:.2%}, rope rows {rope:.2%}", why, warn=True))
    return rules, exact


def check_folder(folder: Path) -> CheckResult:
    """Every rule for a local folder; one that is not DeepSeek-V3, or whose config transformers
    refuses, stops there."""
    raw = read_json(folder / "config.json")
    kind = (raw.get("model_type"), raw.get("architectures"))
    is_mla = kind == ("deepseek_v3", ["DeepseekV3ForCausalLM"])
    rules = [_rule("model type", is_mla, ALL, f"model_type {kind[0]}, architectures {kind[1]}",
                   "must be deepseek_v3, [DeepseekV3ForCausalLM]")]
    if not is_mla:
        return CheckResult(folder, rules)
    config_rules = _config_rules(folder, raw)
    rules += config_rules
    if config_rules[0].status == "fail":  # its values cannot be trusted to describe the weights
        return CheckResult(folder, rules)
    cfg = deepseek.effective_config(raw)
    has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
    weight_rules = _weight_rules(folder, cfg)
    rules += _llamacpp_rules(raw, cfg) + _rope_rules(raw, cfg) + _shape_rules(deepseek.mla_shape(cfg)) + weight_rules
    exact = True  # unless the weights show otherwise, the strict rule
    if weight_rules[0].status == "pass":
        latent_rules, exact = _latent_rules(folder, cfg, raw.get("dtype") or raw.get("torch_dtype"))
        rules += latent_rules
    rules.append(_eps_rule(cfg, exact))
    rules.append(_rule("tokenizer", has_tokenizer, SERVERS, "tokenizer files " + ("present" if has_tokenizer
                       else "missing"), "engines load the tokenizer from the model folder"))
    return CheckResult(folder, rules)


def require_mla(folder: Path, name: str) -> CheckResult:
    """The check of a folder that validate or push works on; refuse one that is not MLA or fails a rule
    of transformers (what validate runs). A folder that a serving engine refuses, such as a latent
    width vLLM does not take, still validates; the model card says which engines serve it."""
    result = _mla_folder(folder, name)
    blocking = [r for r in result.failures if "transformers" in r.engines]
    if blocking:
        first = blocking[0]
        raise MlakitError(f"{name} fails check ({first.rule}: {first.detail}); run `mlakit check {name}` for every "
                          "rule")
    return result


def _mla_folder(folder: Path, name: str) -> CheckResult:
    """The check of a folder, refused in one line when it is not a DeepSeek-V3 folder at all (a
    source model, say): then no engine verdict is meaningful."""
    result = check_folder(folder)
    if result.rules[0].status == "fail":
        raise MlakitError(f"{name} is not an MLA model ({result.rules[0].detail.split(':')[0]}); convert it first "
                          "with `mlakit convert`")
    return result


def check_model(name: str) -> CheckResult:
    """`mlakit check NAME`: a local folder or a hub id."""
    return _mla_folder(resolve_model(name), name)
