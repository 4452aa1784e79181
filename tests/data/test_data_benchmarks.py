"""The data benchmarks run at smoke size: their tables, figures and last lines are there and parse."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def smoke(script: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke"], cwd=BENCHMARKS, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_redaction_benchmark_smoke():
    out = smoke("redaction.py")
    rows = re.findall(r"^\| (\w+) \| (\d+) \| (\d+) \| ([0-9.]+) \|$", out, re.M)
    assert len(rows) == 13 and all(int(p) > 0 for _, p, _, _ in rows), out
    last = re.search(r"recall: ([0-9.]+); precision: ([0-9.]+); parse rate: ([0-9.]+); ([0-9.]+) MB/s", out)
    assert last and float(last.group(4)) > 0, out
    assert float(last.group(3)) == 1.0, out  # redaction never breaks a file that parsed


@pytest.mark.slow
def test_near_dedup_benchmark_smoke():
    out = smoke("near_dedup.py")
    rows = dict(re.findall(r"^\| (datatrove[^|]*|codex-ml[^|]*?) +\| ([0-9.]+) \|", out, re.M))
    assert len(rows) == 2 and all(float(v) > 0 for v in rows.values()), out
    assert re.fullmatch(r"ratio: [0-9.]+", out.strip().splitlines()[-1]), out


@pytest.mark.slow
def test_data_scale_benchmark_smoke():
    out = smoke("data_scale.py")
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| (\d+) \| ([0-9.]+) \| (\d+) \|$", out, re.M)
    assert len(rows) == 2, out
    (small_mb, _, small_peak, *_, small_tokens), (big_mb, _, big_peak, *_, big_tokens) = rows
    assert int(small_mb) < int(big_mb) and 0 < int(small_tokens) < int(big_tokens), out  # more corpus, more tokens
    ratio = float(re.fullmatch(r"ratio: ([0-9.]+)", out.strip().splitlines()[-1]).group(1))
    assert abs(ratio - int(small_peak) / int(big_peak)) <= 0.005, out  # the last line is the table's quotient


@pytest.mark.slow
def test_decontamination_benchmark_smoke():
    out = smoke("decontamination.py")
    rows = {
        name: [int(n) for n in counts]
        for name, *counts in re.findall(r"^\| ([^|]+?) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| [0-9.]+ \|$", out, re.M)
    }
    assert set(rows) == {"verbatim", "reformatted", "renamed", "clean stdlib (false positives)"}, out
    planted, exact, _, caught = rows["verbatim"]
    assert planted == 10 and exact == caught == planted, out  # verbatim copies are all caught, by exact
    assert rows["clean stdlib (false positives)"][3] == 0, out
    last = re.fullmatch(
        r"caught: ([0-9.]+) of planted items overall; false positives: (\d+) of (\d+) clean documents",
        out.strip().splitlines()[-1],
    )
    assert last and last.group(2) == "0" and int(last.group(3)) == rows["clean stdlib (false positives)"][0], out
    variants = [v for name, v in rows.items() if not name.startswith("clean")]
    share = sum(v[3] for v in variants) / sum(v[0] for v in variants)
    assert abs(float(last.group(1)) - share) <= 0.0005, out  # the last line is the table's total
