"""The validation report: report.json for machines, report.md with embedded plots for people.

The whole folder is written to a temporary folder and renamed into place, so a failed run never
leaves half a report; the model card renders the same markdown with its image paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from mlakit.convert.checkpoint import write_json  # noqa: E402
from mlakit.convert.errors import MlakitError  # noqa: E402
from mlakit.convert.guard import atomic_folder  # noqa: E402
from mlakit.validate.check import ENGINE_NAMES  # noqa: E402

MEMORY_PNG = "memory.png"
LAYER_PNG = "layer_error.png"
COLORS = {"source": "#7f7f7f", "converted": "#1f77b4"}


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
        ax_all.plot(x, (weights + per_token * x) / all_div, color=color, lw=2, label=side)
        ax_kv.plot(points, [r[f"{side}_bytes"] / kv_div for r in measured], "o", color=color, ms=6)
        ax_all.plot(points, [(weights + r[f"{side}_bytes"]) / all_div for r in measured], "o", color=color, ms=6)
    ax_kv.plot([], [], "o", color="black", label="measured DynamicCache")
    ax_kv.set_title(f"KV cache: {kv['reduction_percent']:.1f}% smaller")
    ax_kv.set_ylabel(f"KV cache ({kv_unit})")
    ax_all.set_title("Weights + KV cache")
    ax_all.set_ylabel(f"memory ({all_unit})")
    for ax in (ax_kv, ax_all):
        ax.set_xlabel("context length (tokens), batch 1")
        ax.set_xlim(0, n_max * 1.02)
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1024:g}K" if n_max >= 8192 else f"{v:g}"))
        ax.grid(alpha=0.3)
    ax_kv.legend(loc="upper left", fontsize=9)
    ax_all.legend(loc="lower right", fontsize=9)
    fig.suptitle(f"Memory against context length, up to max_position_embeddings {n_max} "
                 f"({report['converted']['dtype']})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_layers(report: dict, path: Path) -> None:
    """Per-layer relative attention error on the evaluation text, next to convert's on its calibration text."""
    errors = [row["attn_rel_error"] for row in report["layers"]]
    at_convert = [row["attn_rel_error"] for row in (report.get("conversion") or {}).get("layers", [])]
    idx = np.arange(len(errors))
    both = len(at_convert) == len(errors)
    width = 0.4 if both else 0.7
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(errors) + 2), 3.8), dpi=120)
    ax.bar(idx - (width / 2 if both else 0), errors, width, color=COLORS["converted"],
           label="evaluation text (validate)")
    if both:
        ax.bar(idx + width / 2, at_convert, width, color="#ff7f0e", label="calibration text (convert)")
    ax.set_xticks(idx)
    ax.set_xlabel("layer")
    ax.set_ylabel("||attn_conv - attn_src|| / ||attn_src||")
    ax.set_title("Per-layer attention error, both fed the source's hidden states")
    ax.set_ylim(0, max(errors + at_convert + [1e-12]) * 1.3)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9)
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
    lines += ["", f"{h}# Per-layer attention error", "", f"![per-layer attention error]({images}{LAYER_PNG})", "",
              "| layer | relative error |", "|---:|---:|"]
    lines += [f"| {row['layer']} | {row['attn_rel_error']:.4g} |" for row in report["layers"]]
    lines += ["", f"{h}# Greedy generation", ""]
    for g in report["generation"]:
        where = "identical" if g["diverges_at"] is None else f"first differs at generated token {g['diverges_at']}"
        lines += [f"Prompt `{g['prompt']}`: {where}.", "", "| model | continuation |", "|---|---|",
                  f"| source | {_cell(g['source'])} |", f"| converted | {_cell(g['converted'])} |", ""]
    lines += [f"{h}# Serving check", "", "| rule | status | detail |", "|---|---|---|"]
    lines += [f"| {r['rule']} | {r['status']} | {_cell(r['detail'])} |" for r in report["check"]]
    lines += [""] + [f"- **{ENGINE_NAMES[engine]}**: {verdict}" for engine, verdict in report["engines"].items()]
    lines += ["", f"{h}# Conversion settings", ""]
    lines += _conversion_lines(report.get("conversion"))
    t = report["timings"]
    lines += ["", f"Validation took {t['total_s']:.1f} s (source {t['source_s']:.1f} s, converted "
              f"{t['converted_s']:.1f} s, per-layer errors {t['layer_errors_s']:.1f} s).", ""]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text that stays inside one markdown table cell, control characters shown as dots."""
    text = text.replace("|", "\\|").replace("\n", "⏎")
    return "".join(ch if ch.isprintable() else "·" for ch in text).strip() or "(nothing)"


def _conversion_lines(conversion: dict | None) -> list[str]:
    if not conversion:
        return ["No mlakit.json: this folder was not written by `mlakit convert`."]
    shape, rope, calib = conversion.get("shape", {}), conversion.get("rope", {}), conversion.get("calibration", {})
    return [
        f"- source: `{conversion['source']['id']}` ({conversion['source'].get('model_type')}, "
        f"{conversion['source'].get('dtype')}), mlakit {conversion.get('mlakit_version')}",
        f"- shape: {json.dumps(shape)}",
        f"- rope: strategy {rope.get('strategy')}, rope_parameters {json.dumps(rope.get('rope_parameters'))}",
        f"- factorization: {json.dumps(conversion.get('factorization'))}",
        f"- calibration: {calib.get('tokens')} tokens of {calib.get('text')} in windows of {calib.get('seq_len')} "
        f"(sha256 `{str(calib.get('sha256'))[:12]}`)",
        f"- output dtype: {conversion.get('dtype')}",
    ]


def write_report(out: Path, report: dict) -> None:
    """report.json, report.md and the PNGs, renamed into `out` only once all are written."""
    report = {**report, "plots": [MEMORY_PNG, LAYER_PNG]}
    with atomic_folder(out, force=True) as tmp:
        try:
            plot_memory(report, tmp / MEMORY_PNG)
            plot_layers(report, tmp / LAYER_PNG)
            (tmp / "report.md").write_text(render_markdown(report))
        except OSError as exc:
            raise MlakitError(f"cannot write the report into {out.parent}: {exc.strerror or exc}") from exc
        write_json(tmp / "report.json", report)


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
        f"attention error per layer: worst {worst['attn_rel_error']:.4g} (layer {worst['layer']})",
        "greedy generation diverges at token: " + ", ".join("never" if d is None else str(d) for d in diverged),
    ])
