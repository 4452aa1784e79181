"""benchmarks/serve.py --smoke: both servers come up, serve every load level, and the last line is the ratio."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_serve_benchmark_smoke_prints_every_level_and_its_ratio(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--smoke"],
        cwd=ROOT / "benchmarks",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    for level in ("Poisson 4/s", "concurrency 32"):
        for server in ("codex-ml serve", "FastAPI + HF generate"):
            assert any(level in ln and server in ln for ln in lines), (level, server)
    assert re.fullmatch(r"ratio: \d+\.\d\d", lines[-1])
