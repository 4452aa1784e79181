"""Programming problems in HumanEval's format (``task_id``, ``prompt``, ``test``, ``entry_point``), read and checked.

The prompts GRPO samples from and the tests that judge its completions. Every record is checked
before any work starts: the first bad one is an error naming its file, line, task id and field.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from codex_ml.data.sources import jsonl_files, jsonl_records
from codex_ml.errors import CodexError

PROBLEM_FIELDS = ("task_id", "prompt", "test", "entry_point")


class ProblemError(CodexError):
    """A problems file that cannot be used: missing, malformed, or a record without a required field."""


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str  # defines check(candidate), as HumanEval's tests do
    entry_point: str  # the function the test is called on
    extra: dict  # the record's other fields, passed to reward functions as columns

    def columns(self) -> dict:
        """What reward functions get besides the prompt and the completion (TRL passes a dataset's columns)."""
        return {**self.extra, "task_id": self.task_id, "test": self.test, "entry_point": self.entry_point}


def read_problems(paths: list[str]) -> list[Problem]:
    """Every problem in the JSONL files (or folders of them) ``paths``, in file order; task ids must be unique."""
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for path in jsonl_files(paths, ProblemError):
        for where, _, record in jsonl_records(path, ProblemError):
            task = record.get("task_id")
            named = f"{where} ({task})" if isinstance(task, str) else where
            for name in PROBLEM_FIELDS:
                if name not in record:
                    raise ProblemError(f"{named}: a problem needs the field {name!r} (fields: {', '.join(PROBLEM_FIELDS)})")
                if not isinstance(record[name], str) or not record[name].strip():
                    raise ProblemError(f"{named}: field {name!r} must be a non-empty string")
            task = record["task_id"]
            if not record["entry_point"].isidentifier():
                raise ProblemError(f"{named}: field 'entry_point' must be a Python identifier; got {record['entry_point']!r}")
            if task in seen:
                raise ProblemError(f"{named}: task_id {task!r} repeats {seen[task]}")
            seen[task] = where
            extra = {k: v for k, v in record.items() if k not in PROBLEM_FIELDS}
            problems.append(Problem(record["task_id"], record["prompt"], record["test"], record["entry_point"], extra))
    if not problems:
        raise ProblemError(f"no problems in {', '.join(paths)}")
    return problems


def problems_record(paths: list[str], problems: list[Problem]) -> dict:
    """What env.json says of the problems: a content hash over every field judged, and where they came from."""
    h = hashlib.sha256()
    for p in problems:
        for part in (p.task_id, p.prompt, p.test, p.entry_point):
            h.update(part.encode("utf-8", "surrogatepass") + b"\0")
    return {
        "sha256": h.hexdigest(),
        "path": [str(Path(p).expanduser()) for p in paths],
        "source": "problems",
        "problems": len(problems),
    }
