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
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke"],
        cwd=BENCHMARKS,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def ratio_of(out: str) -> float:
    lines = [line for line in out.splitlines() if line.startswith("ratio:")]
    assert lines, out
    return float(re.match(r"ratio:\s*([0-9.]+)", lines[-1]).group(1))


def table_of(out: str) -> list[dict[str, str]]:
    """The markdown table a benchmark prints: one dict per row, keyed by the header's column names."""
    lines = [line.strip() for line in out.splitlines() if line.startswith("|")]
    assert len(lines) > 2 and lines[1].startswith("|-"), out
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]
    header = cells(lines[0])
    return [dict(zip(header, cells(line))) for line in lines[2:]]


def agrees(printed: float, numerator: float, denominator: float, decimals: int = 2) -> bool:
    """``printed`` equals numerator / denominator, up to the rounding of all three as printed
    (throughputs to whole tokens/s, the ratio to ``decimals`` places)."""
    quotient = numerator / denominator
    slack = 0.5 * 10**-decimals + quotient * (0.5 / numerator + 0.5 / denominator) + 1e-9
    return abs(printed - quotient) <= slack


# script, the rows its table must have, the throughput column, the ratio's numerator row (None: the best
# row other than the anchor), its anchor row, and the column that compares each row with the anchor
SMOKE = [
    (
        "generate.py",
        [
            "HF generate (dynamic cache)",
            "HF generate (static cache)",
            "codex-ml (KV cache, eager)",
            "codex-ml (static cache, compiled)",
        ],
        "tokens/s",
        "codex-ml (static cache, compiled)",
        "HF generate (dynamic cache)",
        "vs HF dynamic",
    ),
    (
        "packed_sft.py",
        ["padded, one example per row", "packed, dense mask (sdpa)"],
        "effective tokens/s",
        None,
        "padded, one example per row",
        "vs padded",
    ),
    (
        "train_gpu.py",
        [
            "HF Trainer, GPT2LMHeadModel, defaults",
            "HF Trainer, torch_compile=True",
            "codex-ml loop, base, compiled",
            "codex-ml loop, + activation checkpointing",
            "codex-ml loop, large preset, batch 8 x 1024",
        ],
        "tokens/s",
        "codex-ml loop, base, compiled",
        "HF Trainer, torch_compile=True",
        "vs compiled HF",
    ),
]


@pytest.mark.parametrize("script, rows, speed, numerator, anchor, versus", SMOKE)
def test_benchmark_smoke_run_prints_every_variant_and_its_ratio(script, rows, speed, numerator, anchor, versus):
    out = run_smoke(script)
    assert "machine:" in out
    table = table_of(out)
    if "batch" in table[0]:  # generate.py: one block of rows per batch size; the ratio is of the first
        table = [r for r in table if r["batch"] == table[0]["batch"]]
    by_name = {r["variant"]: r for r in table}
    assert set(rows) <= set(by_name), out
    tps = {name: float(r[speed]) for name, r in by_name.items()}
    assert all(v > 0 for v in tps.values()), tps
    for name, r in by_name.items():  # each row's comparison column is its throughput over the anchor's
        if r[versus].endswith("x"):
            assert agrees(float(r[versus].rstrip("x")), tps[name], tps[anchor]), (name, r, tps[anchor])
    top = numerator or max((n for n in tps if n != anchor), key=tps.get)
    assert agrees(ratio_of(out), tps[top], tps[anchor]), (ratio_of(out), tps[top], tps[anchor], out)
    if script == "packed_sft.py":
        assert "packed, FlexAttention: GPU only" in out or "packed, FlexAttention block mask" in by_name


def test_packed_rows_hold_far_less_padding_than_one_example_per_row():
    out = run_smoke("packed_sft.py")
    padding = {
        name.strip(): float(share) for name, share in re.findall(r"^\| ([a-zA-Z ,()]+?)\s*\|\s*\d+ \|\s*([0-9.]+)%", out, re.M)
    }
    assert padding["padded, one example per row"] > 3 * padding["packed, dense mask (sdpa)"], out
