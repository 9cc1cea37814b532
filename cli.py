"""Command-line entry point: thin click wiring, one function per command."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

import click

from mlakit.convert.errors import MlakitError


def friendly_errors(fn: Callable) -> Callable:
    """Turn MlakitError (and Ctrl-C) into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MlakitError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mlakit")
def main() -> None:
    """mlakit: turn Hugging Face GQA/MHA models into DeepSeek-V3 MLA models.

    \b
    mlakit convert demo ./demo-mla            convert the bundled demo model
    mlakit convert meta-llama/Llama-3.2-1B ./llama-mla --kv-lora-rank 512
    """
    from transformers.utils import logging

    logging.set_verbosity_error()


@main.command()
@click.argument("source")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--kv-lora-rank", type=int, default=None,
              help="Latent size per token. Default 512 (the size FlashMLA needs) when the source can fill it, "
                   "else the largest power of two that halves the source's KV cache.")
@click.option("--rope-dim", type=int, default=64, show_default=True,
              help="qk_rope_head_dim: rotary dims of the shared key. 64 is what the fast MLA kernels take.")
@click.option("--calib-text", type=click.Path(path_type=Path), multiple=True,
              help="Text file(s) for calibration statistics (repeatable). Default: the bundled docstrings.")
@click.option("--calib-tokens", type=int, default=65536, show_default=True, help="Calibration tokens.")
@click.option("--calib-seq-len", type=int, default=512, show_default=True, help="Calibration window length.")
@click.option("--dtype", type=click.Choice(["bf16", "fp32", "fp16"]), default="bf16", show_default=True,
              help="Output dtype (fp16 is refused: the exact latent-norm trick needs bf16's range).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N] for the calibration passes.")
@click.option("--rope-strategy", type=click.Choice(["auto", "fold", "even", "high"]), default="auto",
              show_default=True,
              help="How head_dim/2 source frequencies share rope_dim/2 rotary slots; auto picks the one with the "
                   "lowest attention error on calibration text.")
@click.option("--real-pca", is_flag=True, help="Real (TransMLA) instead of complex PCA across kv heads.")
@click.option("--no-expected-rotation", is_flag=True,
              help="Drop lost rotations (TransMLA) instead of replacing them by their attention-weighted mean.")
@click.option("--weight-svd", is_flag=True, help="Factor the latent from weights alone (no activation statistics).")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of SOURCE.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@friendly_errors
def convert(source: str, out: Path, **kw) -> None:
    """Convert SOURCE (local folder, hub id, or `demo`) into a DeepSeek-V3 MLA checkpoint at OUT.

    Training-free: RoRoPE across kv heads, then a joint activation-aware PCA of no-rope keys and
    values. Streams one decoder layer at a time; OUT appears only when complete.
    """
    from mlakit.convert.pipeline import ConvertOptions, convert as run, summary

    opts = ConvertOptions(
        kv_lora_rank=kw["kv_lora_rank"], rope_dim=kw["rope_dim"], calib_text=list(kw["calib_text"]) or None,
        calib_tokens=kw["calib_tokens"], calib_seq_len=kw["calib_seq_len"], dtype=kw["dtype"],
        device=kw["device"], rope_strategy=kw["rope_strategy"], complex_pca=not kw["real_pca"],
        expected_rotation=not kw["no_expected_rotation"], activation_aware=not kw["weight_svd"],
        revision=kw["revision"],
    )
    record = run(source, out, opts, force=kw["force"], log=lambda m: click.echo(m, err=True))
    click.echo(summary(record))
    click.echo(f"wrote {out}")
