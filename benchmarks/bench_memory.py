"""Peak resident memory and time of `mlakit convert` against depth and calibration tokens.

Builds random-weight checkpoints with the shapes of Llama-3.1-8B (and optionally Llama-3.1-70B)
at several depths, or takes a real model (`--model`), converts each in a fresh process for each
`--calib-tokens`, and prints a table: wall time, CPU time (an idle machine's wall time with one
torch thread), seconds per layer and its parts (reading the layer, statistics and
attention-distance histogram, rope step and latent, the error pass with the o_proj refit and the
next layer's inputs, writing), and peak memory, with the plan's estimates of time and peak memory
beside them (both should be within 25%). Memory must stay flat as
layers grow: one layer, the embeddings and the calibration activations, never the whole model.

    python benchmarks/bench_memory.py --shape 8b --layers 2 4 8 --calib-tokens 8192
    python benchmarks/bench_memory.py --shape 70b --layers 2 4 --calib-tokens 4096
    python benchmarks/bench_memory.py --model ~/.cache/mlakit/SmolLM2-135M-Instruct --calib-tokens 16384 65536

`--stage calibrate` measures `mlakit calibrate --mode layerwise` instead: it converts each checkpoint
(at the first `--calib-tokens`) in a process of its own, then runs `mlakit calibrate CONVERTED OUT
--mode layerwise` on the result in another, both on a text file of Python standard-library
docstrings (the random checkpoints have a byte-level tokenizer, so any text works), and prints the
wall time, CPU time and peak memory of each, with the calibrate command beside the table. The work
folder holds three checkpoints at once (the source, its conversion and OUT: 9 GB at 8B shapes and
23 GB at 70B shapes, 2 layers):

    python benchmarks/bench_memory.py --stage calibrate --shape 70b --layers 2 --calib-tokens 2048 \
        --tokens 1024 --seq-len 256 --eval-tokens 512 --layer-steps 10 --solve-iterations 2
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SHAPES = {
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8},
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8},
}
LLAMA31 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "head_dim": 128,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "rope_theta": 500000.0,
}


def byte_tokenizer(folder: Path) -> None:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[1]).save_pretrained(folder)


def build(folder: Path, shape: str, layers: int) -> None:
    """Random bf16 weights, one shard per layer, with an index: the layout of real checkpoints."""
    cfg = {**LLAMA31, **SHAPES[shape], "num_hidden_layers": layers}
    D, I, H, G, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], \
        cfg["num_key_value_heads"], cfg["head_dim"]
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    byte_tokenizer(folder)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map = {}
    shards = [{"model.embed_tokens.weight": rand(cfg["vocab_size"], D)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({
            p + "self_attn.q_proj.weight": rand(H * d, D), p + "self_attn.k_proj.weight": rand(G * d, D),
            p + "self_attn.v_proj.weight": rand(G * d, D), p + "self_attn.o_proj.weight": rand(D, H * d),
            p + "mlp.gate_proj.weight": rand(I, D), p + "mlp.up_proj.weight": rand(I, D),
            p + "mlp.down_proj.weight": rand(D, I), p + "input_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
        })
    shards.append({"model.norm.weight": torch.ones(D, dtype=torch.bfloat16), "lm_head.weight": rand(cfg["vocab_size"], D)})
    for n, tensors in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# Peak resident memory is the child's VmHWM: ru_maxrss would also count what the parent (which
# built the checkpoint) had resident when it forked the child. The estimates are the plan's, made
# in the child before it converts.
CHILD = """
import json, sys, time
from pathlib import Path
from mlakit.convert.pipeline import convert
from mlakit.convert.plan import ConvertOptions, make_plan
opts = ConvertOptions(calib_tokens=int(sys.argv[3]), calib_seq_len=512, rope_strategy=sys.argv[4],
                      kv_lora_rank=int(sys.argv[5]) or None, calib_text=[Path(a) for a in sys.argv[6:]] or None)
cost = make_plan(sys.argv[1], opts).cost
t, cpu = time.time(), time.process_time()
convert(sys.argv[1], Path(sys.argv[2]), opts, log=lambda m: None)
cpu = time.process_time() - cpu
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
layers = json.loads((Path(sys.argv[2]) / "mlakit.json").read_text())["layers"]
parts = {k: sum(l["seconds"][k] for l in layers) / len(layers) for k in layers[0]["seconds"]}
print(json.dumps({"seconds": time.time() - t, "cpu": cpu, "rss": int(hwm.split()[1]) / 2**20, "parts": parts,
                  "est_seconds": cost.seconds, "est_rss": cost.ram_bytes / 2**30}))
"""
PARTS = ("read", "statistics", "rope and latent", "error pass", "write")

# `mlakit calibrate` through its CLI in a process of its own; the peak is its VmHWM, as for CHILD.
# argv[1]: the blockwise least squares' iteration cap (0: mlakit's own)
CALIBRATE_CHILD = """
import json, sys, time
from pathlib import Path
from mlakit.calibrate.layerwise import _Fit
from mlakit.cli import main
if int(sys.argv[1]):
    _Fit.blockwise.__defaults__ = (int(sys.argv[1]),)
t, cpu = time.time(), time.process_time()
main(sys.argv[2:], prog_name="mlakit")
cpu = time.process_time() - cpu
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
run = json.loads((Path(sys.argv[4]) / "mlakit.json").read_text())["calibrate"][-1]
print(json.dumps({"seconds": time.time() - t, "cpu": cpu, "rss": int(hwm.split()[1]) / 2**20,
                  "layerwise_seconds": run["seconds"], "fit_tokens": run["fit_tokens"],
                  "held_out_tokens": run["before"]["tokens"]}))
"""
DOC_MODULES = ("os", "json", "re", "collections", "functools", "itertools", "pathlib", "argparse", "subprocess",
               "shutil", "tempfile", "inspect", "dataclasses", "textwrap", "string", "math")


def docstring_text(path: Path, size: int) -> None:
    """About `size` bytes (at least) of standard-library docstrings, repeated if need be, as ASCII text."""
    docs = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        docs += [module.__doc__] + [getattr(getattr(module, a), "__doc__", None) for a in sorted(dir(module))
                                    if not a.startswith("_")]
    # a class's __doc__ can be a descriptor rather than a string
    text = "\n\n".join(d.strip() for d in docs if isinstance(d, str) and d.strip())
    text = text.encode("ascii", "ignore").decode()
    path.write_text((text + "\n\n") * (size // len(text) + 1))


def run_child(argv: list[str]) -> dict:
    """The JSON line a child script prints last; its stderr ends the benchmark if it fails."""
    res = subprocess.run([sys.executable, "-c", *argv], capture_output=True, text=True, check=False)
    if res.returncode:
        sys.exit(res.stderr)
    return json.loads(res.stdout.splitlines()[-1])


def calibrate_row(args: argparse.Namespace, src: Path, n: int, size: float, tmp: Path) -> None:
    """Convert `src`, then calibrate the result layer-wise, each in a process of its own: one table row
    and the calibrate command."""
    data = tmp / "docstrings.txt"
    # the held-out rows are at most a tenth of the data: enough text for --eval-tokens beside the fitting
    # rows, and for convert's calibration windows
    need = max(10 * args.eval_tokens, args.tokens + args.eval_tokens, args.calib_tokens[0]) + 4 * args.seq_len
    docstring_text(data, int(1.2 * need))
    # converted on the same text: convert's default set samples text from the model, which holds the
    # whole model in memory, a convert cost that this stage does not measure
    conv, out = tmp / f"conv{n}", tmp / f"cal{n}"
    converted = run_child([CHILD, str(src), str(conv), str(args.calib_tokens[0]), args.rope_strategy,
                           str(args.kv_lora_rank), str(data)])
    cmd = ["calibrate", str(conv), str(out), "--mode", "layerwise", "--data", str(data),
           "--tokens", str(args.tokens), "--seq-len", str(args.seq_len), "--eval-tokens", str(args.eval_tokens),
           "--layer-steps", str(args.layer_steps), "--layer-batch", str(args.layer_batch), "--device", "cpu"]
    got = run_child([CALIBRATE_CHILD, str(args.solve_iterations), *cmd])
    print(f"| {n} | {size:.1f} | {converted['seconds']:.0f} | {converted['rss']:.2f} | {got['fit_tokens']} | "
          f"{got['held_out_tokens']} | {args.layer_steps} | {got['seconds']:.0f} | {got['cpu']:.0f} | "
          f"{got['layerwise_seconds'] / n:.1f} | {got['rss']:.2f} |", flush=True)
    print("    mlakit " + " ".join(a.removeprefix(f"{tmp}/") for a in cmd), flush=True)  # paths in the work folder
    for folder in (out, conv, out.with_name(out.name + ".ckpt")):
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--model", default=None, help="a real model folder instead of random weights of --shape")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--calib-tokens", type=int, nargs="+", default=[8192])
    ap.add_argument("--kv-lora-rank", type=int, default=0, help="0: the default for the source")
    ap.add_argument("--rope-strategy", default="fold", help="fixed, so the table times one conversion pass")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build checkpoints (needs disk)")
    ap.add_argument("--text", choices=("sampled", "docstrings"), default="sampled",
                    help="convert's calibration text: sampled from the model (the default, which holds the whole "
                         "model while it samples) or standard-library docstrings given as --calib-text (the layer "
                         "stream alone)")
    ap.add_argument("--stage", choices=("convert", "calibrate"), default="convert",
                    help="calibrate: convert at the first --calib-tokens, then measure `mlakit calibrate --mode "
                         "layerwise` on the result")
    cal = ap.add_argument_group("--stage calibrate: options of mlakit calibrate")
    cal.add_argument("--tokens", type=int, default=1024, help="fitting tokens")
    cal.add_argument("--seq-len", type=int, default=256)
    cal.add_argument("--eval-tokens", type=int, default=512)
    cal.add_argument("--layer-steps", type=int, default=10)
    cal.add_argument("--layer-batch", type=int, default=2)
    cal.add_argument("--solve-iterations", type=int, default=0,
                     help="cap on the blockwise least squares' iterations (0: mlakit's own, 50): each iteration "
                          "allocates what the first does, so the peak is a full run's, the time is not")
    args = ap.parse_args()
    what = args.model or f"shape {args.shape} ({SHAPES[args.shape]})"
    print(f"{what}, --rope-strategy {args.rope_strategy}, torch threads {torch.get_num_threads()}"
          + (f", calibration text: {args.text}" if args.stage == "convert" else ""))
    if args.stage == "calibrate":
        calibrate_table(args)
        return
    print("| layers | calib tokens | checkpoint GB | convert s | CPU s | est. s | est. / convert | s per layer | "
          + " | ".join(PARTS) + " | peak RSS GiB | est. RSS GiB | est. / peak |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(PARTS) + "---:|---:|---:|")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in [None] if args.model else args.layers:
            src, out = (Path(args.model).expanduser(), Path(tmp) / "out") if args.model else \
                (Path(tmp) / f"src{n}", Path(tmp) / f"out{n}")
            if not args.model:
                build(src, args.shape, n)
            n = n or json.loads((src / "config.json").read_text())["num_hidden_layers"]
            size = sum(f.stat().st_size for f in src.iterdir()) / 1e9
            for tokens in args.calib_tokens:
                text = []
                if args.text == "docstrings":
                    text = [str(Path(tmp) / "docstrings.txt")]
                    docstring_text(Path(text[0]), int(1.2 * tokens) + 4096)
                got = run_child([CHILD, str(src), str(out), str(tokens), args.rope_strategy, str(args.kv_lora_rank),
                                 *text])
                parts = " | ".join(f"{got['parts'].get(p, 0.0):.2f}" for p in PARTS)
                print(f"| {n} | {tokens} | {size:.1f} | {got['seconds']:.0f} | {got['cpu']:.0f} | "
                      f"{got['est_seconds']:.0f} | {got['est_seconds'] / got['seconds']:.2f} | {got['seconds'] / n:.1f} | {parts} | {got['rss']:.2f} | "
                      f"{got['est_rss']:.2f} | "
                      f"{got['est_rss'] / got['rss']:.2f} |", flush=True)
                shutil.rmtree(out)
            if not args.model:
                shutil.rmtree(src)


def calibrate_table(args: argparse.Namespace) -> None:
    """The `--stage calibrate` table: one row per depth (or for `--model`)."""
    print(f"convert at --calib-tokens {args.calib_tokens[0]}, then mlakit calibrate --mode layerwise"
          + (f", blockwise least squares capped at {args.solve_iterations} iterations" if args.solve_iterations else ""))
    print("| layers | checkpoint GB | convert s | convert peak RSS GiB | fit tokens | held-out tokens | "
          "layer steps | calibrate s | CPU s | layer-wise s per layer | calibrate peak RSS GiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in [None] if args.model else args.layers:
            src = Path(args.model).expanduser() if args.model else Path(tmp) / f"src{n}"
            if not args.model:
                build(src, args.shape, n)
            n = n or json.loads((src / "config.json").read_text())["num_hidden_layers"]
            size = sum(f.stat().st_size for f in src.iterdir()) / 1e9
            calibrate_row(args, src, n, size, Path(tmp))
            if not args.model:
                shutil.rmtree(src)


if __name__ == "__main__":
    main()
