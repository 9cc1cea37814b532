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
"""

from __future__ import annotations

import argparse
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
                      kv_lora_rank=int(sys.argv[5]) or None)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--model", default=None, help="a real model folder instead of random weights of --shape")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--calib-tokens", type=int, nargs="+", default=[8192])
    ap.add_argument("--kv-lora-rank", type=int, default=0, help="0: the default for the source")
    ap.add_argument("--rope-strategy", default="fold", help="fixed, so the table times one conversion pass")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build checkpoints (needs disk)")
    args = ap.parse_args()
    what = args.model or f"shape {args.shape} ({SHAPES[args.shape]})"
    print(f"{what}, --rope-strategy {args.rope_strategy}, torch threads {torch.get_num_threads()}")
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
                res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), str(tokens),
                                      args.rope_strategy, str(args.kv_lora_rank)],
                                     capture_output=True, text=True, check=False)
                if res.returncode:
                    sys.exit(res.stderr)
                got = json.loads(res.stdout.splitlines()[-1])
                parts = " | ".join(f"{got['parts'].get(p, 0.0):.2f}" for p in PARTS)
                print(f"| {n} | {tokens} | {size:.1f} | {got['seconds']:.0f} | {got['cpu']:.0f} | "
                      f"{got['est_seconds']:.0f} | {got['est_seconds'] / got['seconds']:.2f} | {got['seconds'] / n:.1f} | {parts} | {got['rss']:.2f} | "
                      f"{got['est_rss']:.2f} | "
                      f"{got['est_rss'] / got['rss']:.2f} |", flush=True)
                shutil.rmtree(out)
            if not args.model:
                shutil.rmtree(src)


if __name__ == "__main__":
    main()
