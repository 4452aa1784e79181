"""The benchmarks run on CPU at tiny shapes (``--smoke``): each prints its table and a parsable
``ratio:`` line, so they are ready to run on a GPU machine with one command."""

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@functools.cache  # one smoke run per script, however many tests read it
def run_smoke(script: str) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke"], cwd=BENCHMARKS, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def ratio_of(out: str) -> float:
    lines = [line for line in out.splitlines() if line.startswith("ratio:")]
    assert lines, out
    return float(re.match(r"ratio:\s*([0-9.]+)", lines[-1]).group(1))


@pytest.mark.parametrize("script, rows", [
    ("generate.py", ["HF generate (dynamic cache)", "HF generate (static cache)", "codex-ml (KV cache, eager)",
                     "codex-ml (static cache, compiled)"]),
    ("packed_sft.py", ["padded, one example per row", "packed, dense mask (sdpa)", "packed, FlexAttention: GPU only"]),
    ("train_gpu.py", ["HF Trainer, GPT2LMHeadModel, defaults", "HF Trainer, torch_compile=True",
                      "codex-ml loop, base, compiled", "codex-ml loop, + activation checkpointing",
                      "codex-ml loop, large preset, batch 8 x 1024"]),
])
def test_benchmark_smoke_run_prints_every_variant_and_a_ratio(script, rows):
    out = run_smoke(script)
    for row in rows:
        assert row in out, f"{script}: no row for {row!r}\n{out}"
    assert ratio_of(out) > 0
    assert "machine:" in out


def test_packed_rows_hold_far_less_padding_than_one_example_per_row():
    out = run_smoke("packed_sft.py")
    padding = {name.strip(): float(share) for name, share in
               re.findall(r"^\| ([a-zA-Z ,()]+?)\s*\|\s*\d+ \|\s*([0-9.]+)%", out, re.M)}
    assert padding["padded, one example per row"] > 3 * padding["packed, dense mask (sdpa)"], out
