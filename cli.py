"""Command-line entry point: thin click wiring, one function per command."""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import click

from mlakit.core.engines import rank_request
from mlakit.core.errors import MlakitError, Terminated
from mlakit.core.guard import (
    DISK_FULL,
    cache_share,
    check_output,
    disk_error,
    local_model,
    positive,
    record_id,
    stale_folders,
)


def _terminate(signum: int, frame) -> None:
    """SIGTERM: raise where the process is, so that temporary folders are removed as on Ctrl-C;
    further SIGTERMs are ignored so that the cleanup itself is not cut short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def friendly_errors(fn: Callable) -> Callable:
    """Turn MlakitError, a full disk wherever it is met, Ctrl-C and SIGTERM into one line on stderr and a
    non-zero exit."""

    def fail(exc: MlakitError) -> None:
        click.echo("error: " + " ".join(str(exc).split()), err=True)  # one line, whatever the cause wrote
        sys.exit(1)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            return fn(*args, **kwargs)
        except MlakitError as exc:
            fail(exc)
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            fail(disk_error(exc, Path(exc.filename or ".")))
        except Terminated:
            click.echo("terminated; OUT was not written", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("interrupted; OUT was not written", err=True)
            sys.exit(130)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


def _start(out: Path | None = None) -> None:
    """Once the arguments are checked: name what killed runs left beside OUT, quiet transformers."""
    if out is not None:
        for line in stale_folders(out):
            click.echo(line, err=True)
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


class OneLineErrors(click.Group):
    """Usage mistakes (an unknown option, a value not among the choices, a missing file) end like every
    other bad input: one `error:` line, not click's usage block (exit status 2, as click gives)."""

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.exceptions.NoArgsIsHelpError as exc:  # `mlakit` alone: the help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) else ""
            click.echo(f"error: {exc.format_message()}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:  # Ctrl-C before a command started
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mlakit")
def main() -> None:
    """mlakit: turn Hugging Face GQA/MHA models into DeepSeek-V3 MLA models.

    \b
    mlakit convert demo ./demo-mla            convert the bundled demo model
    mlakit convert meta-llama/Llama-3.2-1B ./llama-mla --kv-lora-rank 512
    """


@main.command()
@click.argument("source")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--kv-lora-rank", default=None,
              help="Latent size per token. Default 512 (the size FlashMLA needs) when the source can fill it, "
                   "else the largest power of two that halves the source's KV cache. An engine name (vllm, "
                   "vllm-cpu) takes the widest latent that engine serves within the source's cache, or the narrowest "
                   "it serves, zero-padded, when none fits.")
@click.option("--cache", "cache_share", default=None, metavar="SHARE",
              help="KV cache to keep, as a share of the source's (0.5, 25%, ...): sets --kv-lora-rank and, unless "
                   "given, --rope-dim (64, or 32 below 192 elements per token per layer, where 32 measured better).")
@click.option("--rope-dim", type=int, default=None,
              help="qk_rope_head_dim: rotary dims of the shared key. Default 64, what the fast MLA kernels take (with "
                   "--cache, 32 for small caches). At a quarter of the source's cache or less, 32 keeps more quality "
                   "(the latent gets the other 32 elements).")
@click.option("--calib-text", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True,
              help="Text file(s) for calibration statistics (repeatable), instead of the default set: half text "
                   "sampled from SOURCE itself (cached), half a bundled mix of prose, code and fifteen languages. "
                   "A text of one kind fits the model to that kind.")
@click.option("--calib-mix", is_flag=True,
              help="With --calib-text: calibrate on half that text and half the default set, to serve that text "
                   "well without losing the rest.")
@click.option("--calib-temperature", type=float, default=1.0, show_default=True,
              help="Sampling temperature of the calibration text sampled from SOURCE.")
@click.option("--calib-seed", type=int, default=0, show_default=True,
              help="Seed of the calibration text sampled from SOURCE.")
@click.option("--calib-tokens", type=int, default=32768, show_default=True,
              help="Calibration tokens, in windows spread over the text; time grows linearly with them.")
@click.option("--calib-seq-len", type=int, default=512, show_default=True, help="Calibration window length.")
@click.option("--shrink", type=click.FloatRange(0, 1), default=None, metavar="SHARE",
              help="Pull each layer's calibration input moment this share of the way to its diagonal, so that "
                   "the latent keeps directions the calibration text rarely uses. Default 0.5 on the default set "
                   "and with --calib-mix (measured best on text unlike the calibration text), 0 with --calib-text "
                   "alone (measured best in that text's own domain).")
@click.option("--calib-bos/--no-calib-bos", default=False, show_default=True,
              help="Start every calibration window with the tokenizer's bos_token, as served prompts start with a "
                   "special token (refused when the tokenizer has none). Measured on SmolLM2-135M: see "
                   "docs/real-models.md.")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="Output dtype. No fp16: the exact latent format's scaled latent rows need bf16's range, and a "
                   "native-format model quantizes to f16 later (docs/quantization.md).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N] for the calibration passes.")
@click.option("--rope-strategy", default="auto", show_default=True,
              help="How head_dim/2 source frequencies share rope_dim/2 rotary slots: fold, foldN (N slots per "
                   "PCA group, TransMLA's FreqFold), even or high; auto picks by attention error on calibration text.")
@click.option("--llama3-rope", type=click.Choice(["yarn", "keep"]), default="yarn", show_default=True,
              help="llama3 rope scaling: a fitted YaRN that transformers, vLLM, SGLang and llama.cpp all compute "
                   "alike, or llama3 kept as is (exact in transformers only).")
@click.option("--real-pca", is_flag=True, help="Real (TransMLA) instead of complex PCA across kv heads.")
@click.option("--no-expected-rotation", is_flag=True,
              help="Drop lost rotations (TransMLA) instead of replacing them by their attention-weighted mean.")
@click.option("--weight-svd", is_flag=True, help="Factor the latent from weights alone (no activation statistics).")
@click.option("--latent", type=click.Choice(["exact", "native"]), default="exact", show_default=True,
              help="exact: the latent scaled so small that kv_a_layernorm is linear (exact in bf16 and fp32, but "
                   "f16, GGUF q8_0 and per-tensor fp8 weights destroy it). native: every weight at a normal scale, "
                   "kv_a_layernorm normalizing, kv_b_proj refitted on the calibration latents of each layer (survives "
                   "those quantizations, approximate: 9-14% more perplexity than exact on SmolLM2-135M at half the cache). "
                   "See docs/quantization.md.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of SOURCE.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (never when it is, holds or lies in SOURCE).")
@click.option("--dry-run", is_flag=True,
              help="Print the plan (every weight's shape checked against config.json, the cache, estimated peak "
                   "memory, output size and time) and exit: reads only config.json and the shard headers, writes "
                   "nothing.")
@friendly_errors
def convert(source: str, out: Path, **kw) -> None:
    """Convert SOURCE (local folder, hub id, or `demo`) into a DeepSeek-V3 MLA checkpoint at OUT.

    Training-free: RoRoPE across kv heads, then a joint activation-aware PCA of no-rope keys and
    values. Streams one decoder layer at a time; OUT appears only when complete.
    """
    check_output(out, kw["force"], protect=[local_model(source)])
    try:
        rank = rank_request(kw["kv_lora_rank"])
    except ValueError as exc:
        raise MlakitError(str(exc)) from exc
    if not isinstance(rank, str):
        positive("--kv-lora-rank", rank, "the rank")
    share = cache_share(kw["cache_share"])
    _start(out)
    from mlakit.convert.plan import ConvertOptions, make_plan

    opts = ConvertOptions(
        kv_lora_rank=rank, rope_dim=kw["rope_dim"], cache=share, calib_text=list(kw["calib_text"]) or None,
        calib_tokens=kw["calib_tokens"], calib_seq_len=kw["calib_seq_len"],
        calib_bos=kw["calib_bos"], calib_mix=kw["calib_mix"], calib_temperature=kw["calib_temperature"],
        calib_seed=kw["calib_seed"], shrink=kw["shrink"], dtype=kw["dtype"],
        device=kw["device"], rope_strategy=kw["rope_strategy"], llama3_rope=kw["llama3_rope"], complex_pca=not kw["real_pca"],
        expected_rotation=not kw["no_expected_rotation"], activation_aware=not kw["weight_svd"],
        output_aware=not kw["weight_svd"], latent=kw["latent"],
        revision=kw["revision"],
    )
    if kw["dry_run"]:
        click.echo(make_plan(record_id(source), opts).describe())
        return
    from mlakit.convert.pipeline import convert as run
    from mlakit.convert.pipeline import summary

    record = run(record_id(source), out, opts, force=kw["force"], log=lambda m: click.echo(m, err=True))
    click.echo(summary(record))
    click.echo(f"wrote {out}")


@main.command()
@click.argument("converted")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--teacher", default=None,
              help="The source model (folder, hub id or `demo`). Default: the source named in CONVERTED/mlakit.json.")
@click.option("--data", multiple=True,
              help="Text file, jsonl file (one document per line) or Hugging Face dataset [hub:]NAME[:CONFIG][@SPLIT] "
                   "(repeatable; hub: when a local path has the same name). Default: convert's default set, half text "
                   "sampled from the teacher (the samples convert cached) and half the bundled mix of prose, code and "
                   "fifteen languages; for the demo model, its own text, the bundled docstrings.")
@click.option("--text-field", default="text", show_default=True, help="Text field of jsonl records and datasets.")
@click.option("--mode", type=click.Choice(["layerwise", "distill", "both"]), default="layerwise", show_default=True,
              help="layerwise: fit each attention block to the source's on the CPU; distill: end-to-end KL "
                   "training; both: the first, then the second.")
@click.option("--tokens", type=int, default=131072, show_default=True,
              help="Calibration tokens: the layer-wise fitting set (rows spread evenly over the data), and the "
                   "distillation budget.")
@click.option("--eval-tokens", type=int, default=16384, show_default=True,
              help="Held-out tokens (taken from the end of the data, at least --seq-len, at most a tenth) for the "
                   "before/after summary.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens per packed row.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Rows per distillation step.")
@click.option("--lr", type=float, default=2e-5, show_default=True,
              help="Distillation learning rate (AdamW, cosine). Measured on SmolLM2-135M: 1e-4 overshoots at half and at a "
                   "quarter of the cache; 2e-5 helps at both.")
@click.option("--layer-lr", type=float, default=1e-3, show_default=True, help="Layer-wise Adam learning rate.")
@click.option("--layer-steps", type=int, default=200, show_default=True,
              help="Adam steps per layer after the least-squares solve (0: least squares only).")
@click.option("--layer-batch", type=int, default=2, show_default=True, help="Rows per layer-wise Adam step.")
@click.option("--inputs", type=click.Choice(["teacher", "student"]), default="teacher", show_default=True,
              help="Layer-wise inputs: the source's hidden states (teacher-forced), or the student's own.")
@click.option("--train", type=click.Choice(["attention", "all"]), default="attention", show_default=True,
              help="Distillation trains the attention weights, or every weight. Measured on SmolLM2-135M: all is "
                   "within a point at half the cache, 1-2 points better on every kind at a quarter, for 1.24x the time.")
@click.option("--lm-weight", type=float, default=0.0, show_default=True,
              help="Weight of the next-token (LM) loss added to the KL.")
@click.option("--save-every", type=int, default=200, show_default=True, help="Distillation checkpoint interval.")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), default=None,
              help="Where the resumable state goes (saved layers, distillation checkpoints, teacher cache). Default: "
                   "OUT.ckpt beside OUT. When OUT is complete only mlakit's own files are removed from it.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run: after its last saved layer, from its last distillation checkpoint.")
@click.option("--teacher-topk", type=int, default=0, show_default=True,
              help="Distillation: run the teacher once, keep its top-K next-token log-probabilities in the "
                   "checkpoint folder and train without it in memory (for when teacher and student do not fit "
                   "together); the KL is then over those K tokens plus one bucket for the rest. 0: run the teacher "
                   "alongside.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="Distillation: bf16 autocast over float32 weights with the teacher in bf16, or everything in "
                   "float32. auto: bf16 on GPUs; on a CPU bf16 autocast (the teacher as stored) where it multiplies "
                   "bf16 at least as fast as float32 (AMX, AVX512-BF16), else float32.")
@click.option("--checkpointing", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Distillation: recompute each layer's activations in the backward pass instead of keeping them "
                   "(the same result in less memory, more time). auto: on GPUs only. Measured on a CPU, "
                   "Qwen2.5-Coder-1.5B, 2 rows of 256: peak RSS 14.6 -> 10.8 GiB at 0.8x the speed.")
@click.option("--device", default=None, help="cpu or cuda. Default: cuda when available.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the order in which training rows are read: the same seed gives the same weights.")
@click.option("--force", is_flag=True, help="Replace OUT (and stale checkpoints) if present.")
@friendly_errors
def calibrate(converted: str, out: Path, **kw) -> None:
    """Recover quality of CONVERTED (an `mlakit convert` output) into OUT.

    \b
    mlakit calibrate ./demo-mla ./demo-cal --seq-len 256 --tokens 8192        layer-wise, on the CPU
    accelerate launch --multi_gpu --num_processes 8 -m mlakit calibrate ./llama-mla ./llama-cal --mode distill --data train.jsonl
    """
    teacher = kw["teacher"]
    check_output(out, kw["force"], protect=[local_model(converted), local_model(teacher) if teacher else None])
    _start(out)
    from mlakit.calibrate.distill import DistillOptions
    from mlakit.calibrate.layerwise import LayerwiseOptions
    from mlakit.calibrate.run import CalibrateOptions, summary
    from mlakit.calibrate.run import calibrate as run

    opts = CalibrateOptions(
        mode=kw["mode"], teacher=kw["teacher"], data=list(kw["data"]), text_field=kw["text_field"],
        tokens=kw["tokens"], eval_tokens=kw["eval_tokens"], seq_len=kw["seq_len"], batch_size=kw["batch_size"],
        seed=kw["seed"], device=kw["device"],
        layerwise=LayerwiseOptions(steps=kw["layer_steps"], lr=kw["layer_lr"], batch_rows=kw["layer_batch"],
                                   inputs=kw["inputs"]),
        distill=DistillOptions(lr=kw["lr"], train=kw["train"], lm_weight=kw["lm_weight"],
                               save_every=kw["save_every"], checkpoint_dir=kw["checkpoint_dir"],
                               resume=kw["resume"], teacher_topk=kw["teacher_topk"], precision=kw["precision"],
                               checkpointing=kw["checkpointing"]),
    )
    outcome = run(converted, out, opts, force=kw["force"], log=lambda m: click.echo(m, err=True))
    if outcome is not None:
        click.echo(summary(outcome))
        click.echo(f"wrote {out}")


@main.command()
@click.argument("source")
@click.argument("converted")
@click.option("--text", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True,
              help="Evaluation text file(s) (repeatable). Default: the held-out last 10% of the bundled docstrings.")
@click.option("--tokens", type=int, default=32768, show_default=True, help="Evaluation tokens for both models.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Evaluation window length.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Prompts for greedy generation, one per line. Default: four built-in prompts.")
@click.option("--contexts", default="1024,4096,32768", show_default=True,
              help="Context lengths at which to measure the real KV cache (clipped to max_position_embeddings).")
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="Report folder. Default: CONVERTED/report for a local folder, NAME-report here for a hub id.")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda (each model spread over every visible GPU by accelerate) or cuda:N (on GPU N).")
@click.option("--max-memory", default=None,
              help="With --device cuda: the most each GPU and the CPU may hold of a model, e.g. "
                   "0=70GiB,1=70GiB,cpu=200GiB. Default: what accelerate finds free.")
@friendly_errors
def validate(source: str, converted: str, **kw) -> None:
    """Compare CONVERTED with SOURCE on the same tokens and write a report.

    Perplexity, per-token KL, top-1 agreement, greedy divergence, per-layer attention error, and
    KV cache bytes measured from transformers' real caches; the two models run one after the other.
    """
    for name in (source, converted):
        local_model(name)  # a missing folder fails before torch is loaded
    _start()
    from mlakit.validate.report import summary
    from mlakit.validate.run import ValidateOptions, parse_contexts, parse_max_memory
    from mlakit.validate.run import validate as run

    opts = ValidateOptions(
        texts=list(kw["text"]) or None, tokens=kw["tokens"], seq_len=kw["seq_len"], prompts=kw["prompts"],
        contexts=parse_contexts(kw["contexts"]), report=kw["report"], device=kw["device"],
        max_memory=parse_max_memory(kw["max_memory"]) if kw["max_memory"] else None,
    )
    click.echo(summary(run(source, converted, opts, log=lambda m: click.echo(m, err=True))))


@main.command()
@click.argument("converted")
@friendly_errors
def check(converted: str) -> None:
    """Say whether stock transformers, vLLM, SGLang and llama.cpp load and serve CONVERTED, with which MLA
    kernels and rope."""
    local_model(converted)  # a missing folder fails before torch is loaded
    _start()
    from mlakit.validate.check import check_model

    result = check_model(converted)
    click.echo(result.table())
    if result.failures:
        raise MlakitError(f"{converted}: {len(result.failures)} rule(s) fail")


@main.command()
@click.argument("converted", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--revision", default=None, help="Branch to upload to (created if missing).")
@click.option("--dry-run", is_flag=True, help="Print the files and the model card that would be uploaded; upload nothing.")
@friendly_errors
def push(converted: Path, repo_id: str, **kw) -> None:
    """Upload CONVERTED to the hub as REPO_ID, with a model card, in one commit; CONVERTED is never written.

    CONVERTED must pass check and hold a validation report (CONVERTED/report). The uploaded records name
    local folders by their last name (or hub id), never by path. The token comes from HF_TOKEN or
    `hf auth login`; HF_ENDPOINT is honored.
    """
    _start()
    from mlakit.validate.push import push as run

    url = run(converted, repo_id, private=kw["private"], revision=kw["revision"], dry_run=kw["dry_run"],
              log=click.echo)
    if url:
        click.echo(f"uploaded: {url}")
