"""DDP vs FSDP2 on two CPU ranks, and how long a checkpoint blocks training, synchronous vs asynchronous.

Every variant is a real `codex-ml train` of the `small` preset under torchrun (two gloo ranks) on
the default standard-library data, for a few steps: its throughput is the median `tokens_per_s`
of its `train` events after the first (warm-up) step, and each checkpoint event records how long
training stood still for it (`blocking_s`). A synchronous fsdp checkpoint blocks while every rank
writes, fsyncs and rank 0 hashes the shards; an asynchronous one only while the state is copied to
the host (the write runs in the background). The ratio printed last is the synchronous blocking
time over the asynchronous one (medians over the checkpoints of each run).

    python benchmarks/distributed.py            # several minutes on 2 cores
    python benchmarks/distributed.py --smoke    # the tiny preset: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from common import machine_line

VARIANTS = {
    "ddp": ("DDP (training.strategy=ddp)", ["training.strategy=ddp"]),
    "fsdp": ("FSDP2, synchronous DCP checkpoints", ["training.strategy=fsdp"]),
    "fsdp-async": ("FSDP2, asynchronous DCP checkpoints", ["training.strategy=fsdp", "training.async_checkpoint=true"]),
}


def corpus(root: Path, n: int = 80) -> Path:
    """Standard-library modules, a fixed sample: enough to train on, and a validation split that the
    run's closing whole-split evaluation gets through quickly."""
    out = root / "corpus"
    out.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(q for q in stdlib.glob("*.py") if 2_000 < q.stat().st_size < 60_000)[:n]:
        (out / p.name).write_bytes(p.read_bytes())
    return out


def run_variant(name: str, args: argparse.Namespace, root: Path, data: Path) -> dict:
    run_dir = root / name
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "codex_ml.cli", "train",
        f"model={args.model}",
        f"run.dir={run_dir}",
        "data.source=files",
        f"data.paths=[{data}]",
        "tokenizer.vocab_size=2048",
        f"data.seq_len={args.seq_len}",
        f"training.batch_size={args.batch_size}",
        f"training.max_steps={args.steps}",
        f"training.checkpoint_every={args.checkpoint_every}",
        "training.keep_last=100",
        "training.keep_best=0",
        "training.log_every=1",
        "training.eval_every=0",
        "training.eval_batches=1",
        "training.warmup_steps=1",
        "training.sample_tokens=0",
        "tracking.mlflow=false",
        *VARIANTS[name][1],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.ndjson").read_text().splitlines() if line.strip()]
    speeds = [e["tokens_per_s"] for e in rows if e.get("event") == "train" and e["step"] > 1]
    blocking = [e["blocking_s"] for e in rows if e.get("event") == "checkpoint"]
    staged = [e.get("host_staging_bytes", 0) for e in rows if e.get("event") == "checkpoint"]
    return {
        "tokens_per_s": statistics.median(speeds),
        "blocking_s": statistics.median(blocking),
        "checkpoints": len(blocking),
        "staged_mb": max(staged) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2, help="per rank")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    parser.add_argument("--smoke", action="store_true", help="the tiny preset, a few steps")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.seq_len, args.steps, args.checkpoint_every = "tiny", 64, 4, 2
    with tempfile.TemporaryDirectory(prefix="codex-ml-bench-dist-") as tmp:
        data = corpus(Path(tmp))
        results = {name: run_variant(name, args, Path(tmp), data) for name in VARIANTS}
    print(machine_line())
    print(f"model={args.model}, 2 gloo ranks x batch {args.batch_size} x {args.seq_len} tokens, {args.steps} steps\n")
    print("| variant | tokens/s | checkpoint blocks training (s, median) | checkpoints | host memory staged (MiB) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {VARIANTS[name][0]} | {r['tokens_per_s']:.0f} | {r['blocking_s']:.3f} | {r['checkpoints']} | "
            f"{r['staged_mb']:.1f} |"
        )
    print(f"\nfsdp / ddp tokens/s: {results['fsdp']['tokens_per_s'] / results['ddp']['tokens_per_s']:.2f}")
    ratio = results["fsdp"]["blocking_s"] / max(results["fsdp-async"]["blocking_s"], 1e-9)
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
