"""Tracking overhead: training with every sink on vs metrics.ndjson alone, interleaved in one run.

Both variants train the same `tiny` model on the same data through the real CLI, each repeat in its own
process (`python -m codex_ml.cli train ...`):

  all sinks      MLflow (the embedded SQLite store), TensorBoard, system metrics every second
  ndjson only    tracking.mlflow=false, tracking.tensorboard=false, system metrics off (one sample an hour)

Throughput is the steady state read back from each run's metrics.ndjson: for every logging interval
after the warm-up, the tokens trained over the wall-clock time between its two `train` events (so
anything a sink costs the loop, on its thread or another, counts); start-up (imports, MLflow opening
its store) is left out, and a run's figure is the median of its intervals. The variants run in pairs,
one right after the other, alternating which goes first (ABBA...), so that both runs of a pair see the
same load on a shared machine. The last line is the median over the pairs of all sinks / ndjson only:
1.0 means tracking is free. The table also gives each variant's median over all its intervals.

    python benchmarks/tracking_overhead.py            # about five minutes on 2 cores
    python benchmarks/tracking_overhead.py --smoke    # a few seconds a run; checks the script works
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine_line

VARIANTS = {
    "all sinks": ["tracking.mlflow=true", "tracking.tensorboard=true", "tracking.system_every_s=1"],
    "ndjson only": ["tracking.mlflow=false", "tracking.tensorboard=false", "tracking.system_every_s=3600"],
}


def train_args(args, run_dir: Path) -> list[str]:
    return [
        "model=tiny",
        f"data.seq_len={args.seq_len}",
        f"training.batch_size={args.batch_size}",
        f"training.max_steps={args.steps}",
        f"training.log_every={args.log_every}",
        "training.eval_every=0",
        "training.eval_batches=2",
        f"training.checkpoint_every={10**6}",
        "training.sample_tokens=0",
        f"run.dir={run_dir}",
        *(["tokenizer.vocab_size=1024", "data.num_workers=0"] if args.smoke else []),
    ]


def cli(args: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "codex_ml.cli", *args], stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        sys.exit(f"codex-ml {' '.join(args)} failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")


def interval_rates(run_dir: Path, warmup: int, log_every: int) -> list[float]:
    """Tokens/s of each logging interval after ``warmup`` steps, by the wall clock between the events
    that close two intervals (every step has its event, but a whole interval's are written together
    when the loop reads them back, so only each interval's last step marks the clock)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.ndjson").read_text().splitlines()]
    train = [r for r in rows if r.get("event") == "train" and r["step"] >= warmup and r["step"] % log_every == 0]
    if len(train) < 2:
        sys.exit(f"{run_dir}: fewer than two logged steps after the warm-up of {warmup} steps")
    return [(b["tokens"] - a["tokens"]) / (b["time"] - a["time"]) for a, b in zip(train, train[1:])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=15, help="steps left out at the start of each run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5, help="runs of each variant, interleaved")
    p.add_argument("--smoke", action="store_true", help="a few steps of a small batch, one repeat")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.batch_size, args.seq_len, args.log_every, args.repeats = 12, 4, 8, 64, 2, 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with tempfile.TemporaryDirectory(prefix="tracking-overhead-") as tmp:
        work = Path(tmp)
        # build (or find in the cache) the tokenizer and packed data once, outside the timings
        cli(["prepare", *train_args(args, work / "prepare")], work / "prepare.log")
        print(
            f"model: tiny preset; batch {args.batch_size} x {args.seq_len} tokens; {args.steps} steps, the first "
            f"{args.warmup} left out; each run its own process; {args.repeats} interleaved repeat(s) of each variant"
        )
        print(machine_line())
        results: dict[str, list[float]] = {v: [] for v in VARIANTS}
        pair_ratios = []
        names = list(VARIANTS)
        for i in range(args.repeats):
            pair = {}
            for variant in names if i % 2 == 0 else names[::-1]:  # ABBA: drift in machine load cancels out
                run_dir = work / "runs" / f"{variant.replace(' ', '-')}-{i}"
                cli(["train", *train_args(args, run_dir), *VARIANTS[variant]], work / f"{run_dir.name}.log")
                rates = interval_rates(run_dir, args.warmup, args.log_every)
                results[variant] += rates
                pair[variant] = statistics.median(rates)
            pair_ratios.append(pair["all sinks"] / pair["ndjson only"])
            print(
                f"  pair {i + 1}: "
                + ", ".join(f"{v} {pair[v]:.0f} tokens/s" for v in names)
                + f" (medians of {len(rates)} intervals); ratio {pair_ratios[-1]:.3f}",
                flush=True,
            )

    median = {v: statistics.median(r) for v, r in results.items()}
    print(f"\n| {'variant':<12} | tokens/s (median) | intervals | slowest  | fastest  |")
    print(f"|{'-' * 14}|-------------------|-----------|----------|----------|")
    for variant, values in results.items():
        print(f"| {variant:<12} | {median[variant]:17.0f} | {len(values):9d} | {min(values):8.0f} | {max(values):8.0f} |")
    print(f"\nmedians over all intervals: all sinks / ndjson only = {median['all sinks'] / median['ndjson only']:.3f}")
    print(
        f"ratio: {statistics.median(pair_ratios):.3f}  (all sinks over metrics.ndjson only, median of {len(pair_ratios)} "
        "interleaved pairs; 1.0 = no overhead)"
        + (" [--smoke: runs too short to leave MLflow's start-up out]" if args.smoke else "")
    )


if __name__ == "__main__":
    main()
