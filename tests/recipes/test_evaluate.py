"""`codex-ml evaluate`: loss and HumanEval on a run's checkpoint, written to RUN/eval and metrics.ndjson."""

import csv
import json

from helpers import run_cli, tiny_train_args


def test_evaluate_loss_and_humaneval(corpus_dir, tmp_path):
    run = tmp_path / "run"
    run_cli("train", *tiny_train_args(corpus_dir, run, steps=4, extra=["training.eval_every=2"]))
    out = run_cli(
        "evaluate",
        f"run_dir={run}",
        "tasks=[loss,humaneval]",
        "limit=3",
        "n=2",
        "temperature=0.8",
        "max_new_tokens=16",
        "checkpoint=best",
        "batch_size=4",
    )
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["checkpoint"].endswith("step_00000004") or results["checkpoint"].endswith("step_00000002")
    loss = results["tasks"]["loss"]
    train_val = [json.loads(line) for line in (run / "metrics.ndjson").read_text().splitlines() if '"event": "eval"' in line][-1]
    # training's final validation covers the whole split, as evaluate does: the same figure (when it picked that step)
    if results["step"] == 4:
        assert abs(loss["val_loss"] - train_val["val_loss"]) < 1e-6 and loss["val_tokens"] == train_val["val_tokens"]
    he = results["tasks"]["humaneval"]
    assert he["problems"] == 3 and he["samples_per_problem"] == 2 and 0.0 <= he["pass@1"] <= 1.0
    assert "pass@10" not in he  # k > n is not reported, and that is said
    assert "pass@k not computed for k=10, 100: HumanEval/0 has only n=2 samples" in out.stderr
    assert set(he["per_problem"]) == {"HumanEval/0", "HumanEval/1", "HumanEval/2"}
    samples = [json.loads(line) for line in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all({"task_id", "completion", "passed", "result"} <= set(s) for s in samples)
    rows = list(csv.DictReader((run / "eval" / "summary.csv").open()))
    assert {("loss", "val_loss"), ("humaneval", "pass@1")} <= {(r["task"], r["metric"]) for r in rows}
    last = json.loads((run / "metrics.ndjson").read_text().splitlines()[-1])
    assert last["event"] == "evaluate" and "val_loss" in last and "humaneval/pass@1" in last
    assert "humaneval: pass@1" in out.stdout


def test_evaluate_refuses_a_folder_that_is_not_a_run(tmp_path):
    out = run_cli("evaluate", f"run_dir={tmp_path}", check=False)
    assert out.returncode == 2 and "not a run folder" in out.stderr and "Traceback" not in out.stderr
