"""The model card (README.md) that push uploads: hub metadata, what was converted, how to serve it,
and the validation report with its plots; and what of the records may go public."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData

import mlakit
from mlakit.core.engines import ENGINE_NAMES, MEASURED, USAGE
from mlakit.validate.check import FAILS
from mlakit.validate.report import render_markdown

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# A folder of the Hugging Face cache: .../models--OWNER--NAME/snapshots/COMMIT
HUB_CACHE = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")
REPORT_DIR = "report"
# Records join several names with this (calibration texts, --data values).
NAME_SEPARATOR = ", "


def public_name(path: str) -> str:
    """A local path as it may be published: the hub id of a folder in the hub cache, else its last name,
    so that no home directory or folder layout leaves the machine."""
    cached = HUB_CACHE.search(path)
    return f"{cached[1]}/{cached[2]}" if cached else Path(path).name or path


def public(value: object) -> object:
    """A record (mlakit.json, report.json) with every absolute local path, whole string or one of its
    comma-separated names, made a `public_name`; everything else as it is."""
    if isinstance(value, dict):
        return {key: public(item) for key, item in value.items()}
    if isinstance(value, list):
        return [public(item) for item in value]
    if isinstance(value, str) and any(part.startswith(("/", "~")) for part in value.split(NAME_SEPARATOR)):
        return NAME_SEPARATOR.join(public_name(part) if part.startswith(("/", "~")) else part
                                   for part in value.split(NAME_SEPARATOR))
    return value


def base_model(source_id: str) -> str | None:
    """The source's hub id, or None when it was converted from a local folder (the hub would reject a path)."""
    return source_id if HUB_ID.fullmatch(source_id) and not Path(source_id).expanduser().exists() else None


def card_data(repo_id: str, report: dict) -> ModelCardData:
    """Front matter: base_model, library, pipeline, tags and a model-index with the validation metrics."""
    text = report["text"]["name"]
    metrics = [
        ("perplexity", report["perplexity"]["converted"], "Perplexity"),
        ("perplexity", report["perplexity"]["source"], "Perplexity of the source"),
        ("kl_divergence", report["kl"]["mean"], "KL(source || converted), mean per token"),
        ("kl_divergence", report["kl"]["p99"], "KL(source || converted), 99th percentile"),
        ("accuracy", report["top1_agreement"], "Top-1 agreement with the source"),
    ]
    results = [EvalResult(task_type="text-generation", dataset_type="text", dataset_name=text, metric_type=kind,
                          metric_value=round(value, 6), metric_name=name)
               for kind, value, name in metrics]
    return ModelCardData(base_model=base_model(_source_id(report)), library_name="transformers",
                         pipeline_tag="text-generation", tags=["mla", "deepseek_v3", "mlakit"],
                         model_name=repo_id.split("/")[-1], eval_results=results)


def _source_id(report: dict) -> str:
    return ((report.get("conversion") or {}).get("source") or {}).get("id") or report["source"]["id"]


def quantization_lines(report: dict) -> list[str]:
    """What `mlakit check` found for the latent format and each weight quantization scheme."""
    rows = [r for r in report["check"] if r["rule"] == "latent format" or r["rule"].startswith("quantize ")]
    lines = []
    for r in rows:
        if r["rule"] == "latent format":
            lines.append(f"- latent format: {r['detail']}")
        else:
            verdict = "survives it" if r["status"] == "pass" else "does NOT survive it"
            lines.append(f"- {r['rule'].removeprefix('quantize ')}: {verdict} ({r['detail']})")
    return lines


def engine_section(repo_id: str, verdicts: dict[str, str]) -> str:
    """The serving engines: those that mlakit's engine bench has run on converted models and whose
    rules this model passes, each with how to start it; the others only as what `mlakit check` read
    from their source."""
    served = [e for e in MEASURED if e in verdicts and not verdicts[e].startswith(FAILS)]
    lines = ["## Serving", "", "Engines run on converted models by mlakit's engine bench, whose rules this model "
             "passes (`mlakit check`):", ""]
    lines += [f"- {ENGINE_NAMES[e]} ({MEASURED[e]}): {verdicts[e]}" for e in served] or ["- none"]
    if served:
        name = repo_id.split("/")[-1]
        lines += ["", "```bash", *(USAGE[e].format(repo=repo_id, name=name) for e in served), "```"]
    others = [f"{ENGINE_NAMES[e]}: {v}" for e, v in verdicts.items() if e not in served and e != "transformers"]
    if others:
        lines += ["", "Not run here; what `mlakit check` reads from the engines' source: " + "; ".join(others) + "."]
    return "\n".join(lines)


def model_card(repo_id: str, report: dict) -> str:
    """README.md: YAML front matter, then the body a person reads."""
    kv, conversion = report["kv_cache"], report.get("conversion") or {}
    source = _source_id(report)
    shape = conversion.get("shape", {})
    trained = "calibrated with `mlakit calibrate`" if conversion.get("calibrate") else "training-free (closed form)"
    engines = engine_section(repo_id, report["engines"])
    quantization = "\n".join(quantization_lines(report)) or "- not checked"
    rope = (conversion.get("rope") or {}).get("strategy", "n/a")
    calibration = (conversion.get("calibration") or {}).get("text", "n/a")
    shape_line = (f"kv_lora_rank {shape['kv_lora_rank']}, qk_rope_head_dim {shape['qk_rope']}, qk_nope_head_dim "
                  f"{shape['qk_nope']}, v_head_dim {shape['v_head']}, {shape['heads']} heads" if shape else "")
    body = f"""# {repo_id.split('/')[-1]}

`{source}` converted to Multi-head Latent Attention in the stock DeepSeek-V3 format by
mlakit {conversion.get('mlakit_version', mlakit.__version__)}, {trained}.
Its KV cache holds {kv['converted_bytes_per_token']:,.0f} bytes per token instead of the source's
{kv['source_bytes_per_token']:,.0f} ({-kv['reduction_percent']:+.1f}%): the same cache memory holds
{kv['source_bytes_per_token'] / kv['converted_bytes_per_token']:.2f}x the tokens. Stock transformers loads
it: no custom code, no `trust_remote_code`.

## What was converted

- source: `{source}`; every attention layer became MLA ({shape_line or 'see config.json'})
- rope: {rope}; calibration text: {calibration}
- MLP, norms, embeddings and lm_head are the source's weights; the settings are in `mlakit.json`

## Use it

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype="auto")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```

{engines}

## Quantization

Whether the latent rows of `kv_a_proj_with_mqa` survive each weight quantization scheme as well as
the rope rows beside them (measured by `mlakit check` on the stored weights):

{quantization}

{render_markdown(report, images=f"{REPORT_DIR}/", level=2)}"""
    return f"---\n{card_data(repo_id, report).to_yaml()}\n---\n\n{body}"
