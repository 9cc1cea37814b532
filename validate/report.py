"""The validation report: report.json for machines, report.md with embedded plots for people.

The whole folder is written to a temporary folder and renamed into place, so a failed run never
leaves half a report; the model card renders the same markdown with its image paths.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from mlakit.core.checkpoint import write_json  # noqa: E402
from mlakit.core.errors import MlakitError  # noqa: E402
from mlakit.core.guard import atomic_folder  # noqa: E402
from mlakit.validate.check import ENGINE_NAMES  # noqa: E402

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
MEMORY_PNG = "memory.png"
LAYER_PNG = "layer_error.png"
COLORS = {"source": "#7f7f7f", "converted": "#1f77b4"}
# What error lines call the report folder: an earlier report there is replaced, nothing else is.
REPORT_TARGET = "--report folder"


def _scale(max_bytes: float) -> tuple[float, str]:
    """The binary unit that shows `max_bytes` with a few digits before the point."""
    for power, unit in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if max_bytes >= 1024**power:
            return 1024**power, unit
    return 1, "B"


def human_bytes(n: float) -> str:
    div, unit = _scale(n)
    return f"{n:.0f} B" if unit == "B" else f"{n / div:.2f} {unit}"


def plot_memory(report: dict, path: Path) -> None:
    """KV cache alone and weights plus cache, against context length, for both models (batch 1)."""
    kv = report["kv_cache"]
    n_max = kv["max_position_embeddings"]
    x = np.linspace(0, n_max, 256)
    fig, (ax_kv, ax_all) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    kv_div, kv_unit = _scale(max(kv["source_bytes_per_token"], kv["converted_bytes_per_token"]) * n_max)
    all_top = max(kv["weights_bytes"][s] + kv[f"{s}_bytes_per_token"] * n_max for s in COLORS)
    all_div, all_unit = _scale(all_top)
    measured = kv["measured"]
    points = [r["context"] for r in measured]
    for side, color in COLORS.items():
        per_token, weights = kv[f"{side}_bytes_per_token"], kv["weights_bytes"][side]
        label = f"{side} ({human_bytes(per_token)} per token)"
        ax_kv.plot(x, per_token * x / kv_div, color=color, lw=2, label=label)
        ax_all.plot(x, (weights + per_token * x) / all_div, color=color, lw=2,
                    label=f"{side} (weights {human_bytes(weights)})")
        ax_kv.plot(points, [r[f"{side}_bytes"] / kv_div for r in measured], "o", color=color, ms=6)
        ax_all.plot(points, [(weights + r[f"{side}_bytes"]) / all_div for r in measured], "o", color=color, ms=6)
    ax_kv.plot([], [], "o", color="black", label="measured DynamicCache")
    ax_kv.set_title(f"KV cache: {-kv['reduction_percent']:+.1f}%")
    ax_kv.set_ylabel(f"KV cache ({kv_unit})")
    params = report["converted"]["parameters"] / report["source"]["parameters"] - 1
    ax_all.set_title(f"Weights + KV cache (converted: {100 * params:+.1f}% parameters)")
    even = kv["break_even_tokens"]
    if even and even < n_max:
        ax_all.axvline(even, color="black", ls=":", lw=1, label=f"converted smaller from {even:,.0f} tokens")
    ax_all.set_ylabel(f"memory ({all_unit})")
    for ax in (ax_kv, ax_all):
        ax.set_xlabel("context length (tokens), batch 1")
        ax.set_xlim(0, n_max * 1.02)
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1024:g}K" if n_max >= 8192 else f"{v:g}"))
        ax.grid(alpha=0.3)
    ax_kv.legend(loc="upper left", fontsize=9)
    ax_all.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Memory against context length, up to max_position_embeddings {n_max} "
                 f"({report['converted']['dtype']})")
    note = textwrap.wrap(f"Weights {human_bytes(kv['weights_bytes']['source'])} -> "
                         f"{human_bytes(kv['weights_bytes']['converted'])}: {_parameter_sources(report)}; "
                         f"{_break_even(kv)}.", 150)
    fig.text(0.5, 0.01, "\n".join(note), ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.035 * len(note), 1, 1))
    fig.savefig(path)
    plt.close(fig)


def layer_series(report: dict) -> list[tuple[str, list[float]]]:
    """The per-layer errors to show, each labelled with the model, the text and the windows it was
    measured on.

    convert records its errors in mlakit.json and calibrate copies that record, so for a calibrated
    folder those are the one-shot conversion's, not the validated model's; and they are measured on
    other text in other windows, so the two series are never a before/after pair."""
    conversion = report.get("conversion") or {}
    calibrated = any(run.get("kept") != "input" for run in conversion.get("calibrate", []))
    this = "calibrated model" if calibrated else "converted model"
    text = report.get("text", {})
    series = [(f"{this}, evaluation text, {text.get('layer_tokens', '?')} tokens in windows of "
               f"{text.get('seq_len', '?')} (validate)", [row["attn_rel_error"] for row in report["layers"]])]
    at_convert = [row["attn_rel_error"] for row in conversion.get("layers", [])]
    if len(at_convert) == len(series[0][1]):
        before = "one-shot conversion before calibration" if calibrated else this
        calib = conversion.get("calibration", {})
        series.append((f"{before}, its calibration text, {calib.get('tokens', '?')} tokens in windows of "
                       f"{calib.get('seq_len', '?')} (convert)", at_convert))
    return series


# Under the per-layer plot and table: why the series may not be read as before and after.
NOT_BEFORE_AFTER = ("each measured on its own text and windows (and, after calibration, on other weights): not a "
                    "before/after pair")


def plot_layers(report: dict, path: Path) -> None:
    """Per-layer relative attention error, one panel per series of `layer_series`, each titled with what
    it measures, so that side-by-side bars never read as a before/after comparison."""
    series = layer_series(report)
    idx = np.arange(len(series[0][1]))
    top = max([1e-12] + [e for _, errors in series for e in errors]) * 1.15
    fig, axes = plt.subplots(1, len(series), figsize=(max(6.0, 0.45 * len(idx) + 2) * len(series), 3.8), dpi=120,
                             squeeze=False)
    for ax, (label, errors), color in zip(axes[0], series, (COLORS["converted"], "#ff7f0e")):
        ax.bar(idx, errors, 0.7, color=color)
        ax.set_xticks(idx)
        ax.set_xlabel("layer")
        ax.set_ylabel("||attn_conv - attn_src|| / ||attn_src||")
        ax.set_title("\n".join(textwrap.wrap(label, 60)), fontsize=9)
        ax.set_ylim(0, top)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Per-layer attention error, each layer fed the source's hidden states"
                 + (f"\npanels {NOT_BEFORE_AFTER}" if len(series) > 1 else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render_markdown(report: dict, images: str = "", level: int = 1) -> str:
    """report.md; `images` prefixes the PNG paths and `level` sets the top heading, so the model card
    can embed the same text."""
    h = "#" * level
    src, conv, kv, text = report["source"], report["converted"], report["kv_cache"], report["text"]
    ppl = report["perplexity"]
    lines = [
        f"{h} Validation of {conv['id']} against {src['id']}",
        "",
        "| | source | converted |",
        "|---|---|---|",
        f"| model | `{src['id']}` | `{conv['id']}` |",
        f"| parameters | {src['parameters']:,} | {conv['parameters']:,} |",
        f"| dtype | {src['dtype']} | {conv['dtype']} |",
        f"| perplexity | {ppl['source']:.4f} | {ppl['converted']:.4f} "
        f"({100 * (ppl['converted'] / ppl['source'] - 1):+.2f}%) |",
        f"| KV cache per token | {human_bytes(kv['source_bytes_per_token'])} | "
        f"{human_bytes(kv['converted_bytes_per_token'])} ({-kv['reduction_percent']:+.1f}%) |",
        "",
        f"On {report['tokens_scored']:,} predicted tokens of {text['name']} (sha256 `{text['sha256'][:12]}`), in "
        f"windows of {text['seq_len']}: KL(source || converted) per token mean **{report['kl']['mean']:.4g}**, "
        f"99th percentile **{report['kl']['p99']:.4g}** nats (KL over the {text['kl_reference']}); the two "
        f"models' top-1 tokens agree on **{100 * report['top1_agreement']:.2f}%** of positions.",
        "",
        *_position_lines(report.get("by_position")),
        f"{h}# Memory against context length",
        "",
        f"![memory against context length]({images}{MEMORY_PNG})",
        "",
        "Cache bytes measured from the `DynamicCache` transformers builds, next to the formula "
        f"(source 2 x kv_heads x head_dim x layers x bytes, MLA (kv_lora_rank + qk_rope_head_dim) x layers x bytes): "
        f"**{'they agree' if kv['measured_matches'] else 'they DO NOT agree'}**.",
        "",
        "| context | source measured | source formula | converted measured | converted formula |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['context']:,} | {r['source_bytes']:,} | {r['source_formula_bytes']:,} | "
              f"{r['converted_bytes']:,} | {r['converted_formula_bytes']:,} |" for r in kv["measured"]]
    lines += ["", _weights_text(report)]
    series = layer_series(report)
    lines += ["", f"{h}# Per-layer attention error", "", f"![per-layer attention error]({images}{LAYER_PNG})", "",
              "Relative error of each layer's attention output against the source's, both fed the source's "
              "hidden states" + (f"; the columns are {NOT_BEFORE_AFTER}." if len(series) > 1 else "."), "",
              "| layer | " + " | ".join(label for label, _ in series) + " |", "|---:|" + "---:|" * len(series)]
    lines += [f"| {i} | " + " | ".join(f"{errors[i]:.4g}" for _, errors in series) + " |"
              for i in range(len(series[0][1]))]
    lines += ["", f"{h}# Greedy generation", ""]
    for g in report["generation"]:
        where = ("identical" if g["diverges_at"] is None else
                 f"first differs at generated token {g['diverges_at']} (counted from 1)")
        lines += [f"Prompt `{g['prompt']}`: {where}.", "", "| model | continuation |", "|---|---|",
                  f"| source | {_cell(g['source'])} |", f"| converted | {_cell(g['converted'])} |", ""]
    lines += [f"{h}# Serving check", "", "| rule | status | detail |", "|---|---|---|"]
    lines += [f"| {r['rule']} | {r['status']} | {_cell(r['detail'])} |" for r in report["check"]]
    lines += [""] + [f"- **{ENGINE_NAMES[engine]}**: {verdict}" for engine, verdict in report["engines"].items()]
    lines += ["", f"{h}# Settings", ""]
    lines += _conversion_lines(report.get("conversion"))
    t = report["timings"]
    lines += ["", f"Validation took {t['total_s']:.1f} s (source {t['source_s']:.1f} s, converted "
              f"{t['converted_s']:.1f} s, per-layer errors {t['layer_errors_s']:.1f} s).", ""]
    return "\n".join(lines)


def _position_lines(rows: list[dict] | None) -> list[str]:
    """The table of perplexity by context length (absent from reports of mlakit before it)."""
    if not rows:
        return []
    return ["By tokens of context before the predicted one (a conversion may lose more past the length of its "
            "calibration windows):", "", "| context | tokens | source perplexity | converted | vs source |",
            "|---|---:|---:|---:|---:|",
            *(f"| {r['context'][0]:,}-{r['context'][1]:,} | {r['tokens']:,} | {r['source']:.4f} | "
              f"{r['converted']:.4f} | {100 * (r['converted'] / r['source'] - 1):+.2f}% |" for r in rows), ""]


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n:,}" for name, n in counts.items())


def _parameter_sources(report: dict) -> str:
    """The parameters the converted model adds, by where they come from."""
    p = report["parameters"]
    per_layer = sum(p["converted_attention_per_layer"].values()) - sum(p["source_attention_per_layer"].values())
    parts = [f"MLA attention {p['layers'] * per_layer:+,} parameters over {p['layers']} layers"]
    if p["untied_lm_head"]:
        parts.append(f"untied lm_head {p['untied_lm_head']:+,}")
    if p["unexplained"]:
        parts.append(f"elsewhere {p['unexplained']:+,}")
    return ", ".join(parts)


def _break_even(kv: dict) -> str:
    """From which context length the converted model's weights plus cache take less memory."""
    even, n_max = kv["break_even_tokens"], kv["max_position_embeddings"]
    if even is None:
        return "the converted model never takes less memory at long contexts"
    if even == 0:
        return "the converted model takes less memory at every context length"
    text = f"the converted model's weights plus cache take less memory from {even:,.0f} cached tokens on"
    if even > n_max:
        return text + (f", beyond one sequence's max_position_embeddings {n_max:,}: only a batch of at least "
                       f"{math.ceil(even / n_max)} full-length sequences gains")
    return text + " (batch 1; a batch of B sequences reaches it at 1/B of that length each)"


def _weights_text(report: dict) -> str:
    """Why the converted model can hold more weights than the source while its KV cache is smaller,
    with the measured counts and bytes."""
    p, kv = report["parameters"], report["kv_cache"]
    n_src, n_conv = report["source"]["parameters"], report["converted"]["parameters"]
    src, conv = p["source_attention_per_layer"], p["converted_attention_per_layer"]
    text = (f"**Weights.** The converted model has {n_conv:,} parameters, the source {n_src:,} "
            f"({100 * (n_conv / n_src - 1):+.1f}%). Per layer the source's attention holds {sum(src.values()):,} "
            f"({_counts(src)}) and the MLA attention {sum(conv.values()):,} ({_counts(conv)}): the cache keeps "
            "only the latent and the shared rope key, so kv_b_proj holds every head's own up-projection of the "
            "latent into its keys and values, and q_proj a no-rope and a rope part per head.")
    if p["converted_zero_padding_per_layer"]:
        text += (f" {p['converted_zero_padding_per_layer']:,} of those per layer are zeros that pad the heads to "
                 "the head dims vLLM's prefill kernels take.")
    if p["untied_lm_head"]:
        text += " The source ties lm_head to its embeddings; DeepSeek-V3 engines need it untied."
    weights = kv["weights_bytes"]
    return text + (f" In all: {_parameter_sources(report)}. In bytes: weights {human_bytes(weights['source'])} -> "
                   f"{human_bytes(weights['converted'])}, KV cache {human_bytes(kv['source_bytes_per_token'])} -> "
                   f"{human_bytes(kv['converted_bytes_per_token'])} per token, so {_break_even(kv)}.")


def _cell(text: str) -> str:
    """Text that stays inside one markdown table cell, control characters shown as dots."""
    text = text.replace("|", "\\|").replace("\n", "⏎")
    return "".join(ch if ch.isprintable() else "·" for ch in text).strip() or "(nothing)"


def _conversion_lines(conversion: dict | None) -> list[str]:
    """convert's settings, then one entry per calibrate run recorded after it."""
    if not conversion:
        return ["No mlakit.json: this folder was not written by `mlakit convert`."]
    shape, rope, calib = conversion.get("shape", {}), conversion.get("rope", {}), conversion.get("calibration", {})
    lines = [
        "`mlakit convert` (one-shot):",
        "",
        f"- source: `{conversion['source']['id']}` ({conversion['source'].get('model_type')}, "
        f"{conversion['source'].get('dtype')}), mlakit {conversion.get('mlakit_version')}",
        f"- shape: {json.dumps(shape)}",
        f"- rope: strategy {rope.get('strategy')}, rope_parameters {json.dumps(rope.get('rope_parameters'))}",
        f"- factorization: {json.dumps(conversion.get('factorization'))}",
        f"- calibration text: {calib.get('tokens')} tokens of {calib.get('text')} in windows of "
        f"{calib.get('seq_len')} (sha256 `{str(calib.get('sha256'))[:12]}`)",
        f"- output dtype: {conversion.get('dtype')}",
    ]
    for i, run in enumerate(conversion.get("calibrate", []), 1):
        lines += ["", f"`mlakit calibrate`, run {i}:", ""] + _calibrate_lines(run)
    return lines


# Entries of a calibrate run that _calibrate_lines writes out itself (per-layer rows are left out).
CALIBRATE_SHOWN = ("mode", "teacher", "data", "kept", "before", "after", "layers", "converted", "mlakit_version")


def _calibrate_lines(run: dict) -> list[str]:
    """One calibrate run as recorded in mlakit.json: mode, teacher, data, held-out quality before and
    after, which weights it kept, and every other setting it recorded."""
    data = run.get("data", {})
    lines = [f"- mode: {run.get('mode')}, teacher `{run.get('teacher')}`, mlakit {run.get('mlakit_version')}",
             f"- data: {data.get('name')} (sha256 `{str(data.get('sha256'))[:12]}`), rows of {data.get('seq_len')} "
             f"tokens, {data.get('held_out_tokens')} held-out tokens"]
    before, after = run.get("before"), run.get("after")
    if before and after:
        lines.append(f"- held out: perplexity {before['student_ppl']:.4f} -> {after['student_ppl']:.4f} (teacher "
                     f"{before['teacher_ppl']:.4f}), KL to the teacher {before['kl']:.4g} -> {after['kl']:.4g}; "
                     f"kept: {run.get('kept')}")
    rest = {k: v for k, v in run.items() if k not in CALIBRATE_SHOWN}
    if rest:
        lines.append(f"- settings: {json.dumps(rest)}")
    return lines


def write_report(out: Path, report: dict) -> None:
    """report.json, report.md and the PNGs, renamed into `out` only once all are written."""
    report = {**report, "plots": [MEMORY_PNG, LAYER_PNG]}
    with atomic_folder(out, force=True, marker=REPORT_JSON, what=REPORT_TARGET) as tmp:
        try:
            plot_memory(report, tmp / MEMORY_PNG)
            plot_layers(report, tmp / LAYER_PNG)
            (tmp / REPORT_MD).write_text(render_markdown(report))
        except OSError as exc:
            raise MlakitError(f"cannot write the report into {out.parent}: {exc.strerror or exc}") from exc
        write_json(tmp / REPORT_JSON, report)


def summary(report: dict) -> str:
    """The lines a user reads in the terminal after validate."""
    ppl, kv, kl = report["perplexity"], report["kv_cache"], report["kl"]
    worst = max(report["layers"], key=lambda row: row["attn_rel_error"])
    diverged = [g["diverges_at"] for g in report["generation"]]
    return "\n".join([
        f"perplexity: source {ppl['source']:.4f}, converted {ppl['converted']:.4f} on "
        f"{report['tokens_scored']:,} tokens",
        f"KL(source || converted) per token: mean {kl['mean']:.4g}, p99 {kl['p99']:.4g}; top-1 agreement "
        f"{100 * report['top1_agreement']:.2f}%",
        f"KV cache per token: {human_bytes(kv['source_bytes_per_token'])} -> "
        f"{human_bytes(kv['converted_bytes_per_token'])} ({-kv['reduction_percent']:+.1f}%), measured "
        f"{'equal to' if kv['measured_matches'] else 'DIFFERENT FROM'} the formula",
        "perplexity vs source by tokens of context: " + ", ".join(
            f"{r['context'][0]}-{r['context'][1]} {100 * (r['converted'] / r['source'] - 1):+.1f}%"
            for r in report["by_position"]),
        f"attention error per layer: worst {worst['attn_rel_error']:.4g} (layer {worst['layer']})",
        "greedy generation, first differing generated token (counted from 1): "
        + ", ".join("never" if d is None else str(d) for d in diverged),
    ])
