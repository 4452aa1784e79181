"""benchmarks/grpo_learning.py runs end to end at smoke size: its tables and closing lines are there and parse."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_grpo_learning_benchmark_smoke():
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "grpo_learning.py"), "--smoke"],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = done.stdout
    stages = re.findall(r"^\| (pre-trained|after GRPO|after DPO) \| ([0-9.]+) \| ([0-9.]+)\.\.([0-9.]+) \|", out, re.M)
    assert [s[0] for s in stages] == ["pre-trained", "after GRPO", "after DPO"], out
    assert all(float(lo) <= float(p) <= float(hi) for _, p, lo, hi in stages), out  # each estimate inside its CI
    assert re.search(r"^gain: [+-][0-9.]+ points \(95% CI [+-][0-9.]+\.\.[+-][0-9.]+\)$", out, re.M), out
    last = re.fullmatch(r"ratio: ([0-9.]+)", out.strip().splitlines()[-1])
    assert last, out
