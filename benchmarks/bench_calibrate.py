"""How much of the one-shot conversion loss calibration recovers, and at what CPU time.

Converts the source at each cache budget (kv_lora_rank + rope dim 64, fp32 so that the tables show
approximation error, not rounding; conversion statistics from the first 90% of the text), then runs
`mlakit calibrate` in each mode for each number of calibration tokens. Quality is measured by the
calibrate command itself on its held-out rows (the last tenth of the text): perplexity of the
source and of the student, and KL(source || student) per token. Time is wall-clock seconds of the
calibration on this machine, with the process CPU seconds beside it.

    python benchmarks/bench_calibrate.py                                  # bundled demo model
    python benchmarks/bench_calibrate.py --model PATH --text shakespeare.txt
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from transformers.utils import logging

from mlakit.calibrate.distill import DistillOptions
from mlakit.calibrate.layerwise import LayerwiseOptions
from mlakit.calibrate.run import CalibrateOptions, calibrate
from mlakit.convert.pipeline import ConvertOptions, convert
from mlakit.core.checkpoint import read_json
from mlakit.core.text import DEFAULT_TEXT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--ranks", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--rope-dim", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=["layerwise", "distill"])
    ap.add_argument("--layerwise-tokens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--distill-tokens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=ConvertOptions.calib_tokens, help="the conversion's")
    ap.add_argument("--layer-steps", type=int, default=LayerwiseOptions.steps)
    ap.add_argument("--inputs", default=LayerwiseOptions.inputs)
    ap.add_argument("--lr", type=float, default=DistillOptions.lr)
    ap.add_argument("--teacher-topk", type=int, nargs="+", default=[0],
                    help="distill with the live teacher (0) and/or the cached top-k teacher (k)")
    args = ap.parse_args()
    logging.set_verbosity_error()

    text = args.text.read_text(encoding="utf-8")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        first90 = tmp_path / "calib.txt"
        first90.write_text(text[: int(0.9 * len(text))], encoding="utf-8")
        for rank in args.ranks:
            mla = tmp_path / f"mla-{rank}"
            record = convert(args.model, mla, ConvertOptions(kv_lora_rank=rank, rope_dim=args.rope_dim,
                                                             calib_text=[first90], calib_seq_len=args.seq_len,
                                                             calib_tokens=args.calib_tokens,
                                                             dtype="fp32"),
                             log=lambda _: None)
            cache = record["kv_cache"]
            budget = (f"{rank} + {args.rope_dim} ({cache['converted_elements_per_token_layer']}/"
                      f"{cache['source_elements_per_token_layer']})")
            runs = [(mode, tokens, k) for mode in args.modes
                    for tokens in (args.layerwise_tokens if mode == "layerwise" else args.distill_tokens)
                    for k in (args.teacher_topk if mode == "distill" else [0])]
            for mode, tokens, k in runs:
                out = tmp_path / f"cal-{rank}-{mode}-{tokens}-{k}"
                opts = CalibrateOptions(
                    mode=mode, teacher=args.model, data=[str(args.text)], tokens=tokens,
                    eval_tokens=10 * len(text), seq_len=args.seq_len,
                    layerwise=LayerwiseOptions(steps=args.layer_steps, inputs=args.inputs),
                    distill=DistillOptions(lr=args.lr, teacher_topk=k),
                )
                wall, cpu = time.perf_counter(), time.process_time()
                outcome = calibrate(str(mla), out, opts)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                run = read_json(out / "mlakit.json")["calibrate"][-1]
                (_, before), (_, after) = outcome.qualities
                if not any(r[0] == budget and r[1] == "one-shot" for r in rows):
                    rows.append((budget, "one-shot", "-", before, "-", "-", "-"))
                rate = f"{run['tokens_per_second']:.0f}" if "tokens_per_second" in run else "-"
                label = f"{mode}, top-{k} teacher" if k else mode
                rows.append((budget, label, tokens, after, f"{wall:.0f}", f"{cpu:.0f}", rate))
                print(f"{budget} {label} {tokens}: ppl {after.student_ppl:.3f} KL {after.kl:.4f} ({wall:.0f} s)",
                      flush=True)
    teacher = rows[0][3].teacher_ppl
    print(f"\nsource perplexity {teacher:.3f} on {rows[0][3].tokens} held-out tokens of {args.text.name}\n")
    print("| kv_lora_rank + rope (cache elements) | mode | calibration tokens | perplexity | vs source | "
          "KL to source | wall s | CPU s | train tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for budget, mode, tokens, q, wall, cpu, rate in rows:
        print(f"| {budget} | {mode} | {tokens} | {q.student_ppl:.3f} | {100 * (q.student_ppl / teacher - 1):+.2f}% | "
              f"{q.kl:.4f} | {wall} | {cpu} | {rate} |")


if __name__ == "__main__":
    main()
