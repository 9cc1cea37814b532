"""Peak resident memory of each phase of an mlakit run: runs COMMAND, samples the resident set of
its process tree every --every seconds, and prints a table with one row per line the command writes
(the phase that ends with that line) and the whole run's peak.

    python benchmarks/bench_phase_memory.py -- mlakit calibrate smol-half OUT --mode distill \\
        --tokens 8192 --seq-len 256 --batch-size 4 --teacher-topk 64 --checkpointing on

Sampling misses peaks shorter than --every; `/usr/bin/time -v` gives the exact whole-run peak.
"""

from __future__ import annotations

import argparse
import subprocess
import threading
import time
from pathlib import Path


def tree_rss_kib(pid: int) -> int:
    """Resident set of `pid` and its descendants, in KiB (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        todo += [int(c) for c in children]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=float, default=0.5, help="Seconds between samples.")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="The command, after --.")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]  # the current phase's peak, reset at each line
    overall = [0]

    def sample() -> None:
        while proc.poll() is None:
            rss = tree_rss_kib(proc.pid)
            peak[0], overall[0] = max(peak[0], rss), max(overall[0], rss)
            time.sleep(args.every)

    threading.Thread(target=sample, daemon=True).start()
    start, rows = time.perf_counter(), []
    for line in proc.stdout:
        line = line.rstrip()
        print(line, flush=True)
        if line.strip():
            rows.append((time.perf_counter() - start, peak[0], line.strip()[:70]))
            peak[0] = 0
    proc.wait()
    print("\n| ends at s | phase peak RSS GiB | phase ends with |\n|---:|---:|---|")
    for t, kib, text in rows:
        print(f"| {t:.1f} | {kib / 2**20:.2f} | {text.replace('|', '/')} |")
    print(f"\nwhole run: peak RSS {overall[0] / 2**20:.2f} GiB (sampled every {args.every} s), exit {proc.returncode}")
    raise SystemExit(proc.returncode)


if __name__ == "__main__":
    main()
