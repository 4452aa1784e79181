"""Reproducibility: two runs of one config and seed with training.deterministic=true log identical values."""

import json

NOT_REPRODUCIBLE = {"time", "tokens_per_s", "mfu", "blocking_s"}  # wall-clock measurements


def logged_values(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.ndjson").read_text().splitlines()]
    # system samples are taken on a clock, not at steps
    return [{k: v for k, v in r.items() if k not in NOT_REPRODUCIBLE} for r in rows if r["event"] != "system"]


def test_deterministic_runs_write_identical_metrics(repro_runs):
    first, second = (logged_values(run) for run in repro_runs)
    assert [r["event"] for r in first].count("train") == 12 and [r["event"] for r in first].count("eval") == 1
    assert first == second  # exact equality of every loss, lr, grad norm and validation metric
    env = [json.loads((run / "env.json").read_text()) for run in repro_runs]
    assert env[0]["seed"] == env[1]["seed"] == 5 and env[0]["deterministic"] is True
    assert env[0]["packages"] == env[1]["packages"] and "torch" in env[0]["packages"]
