"""GRPO's built-in rewards: execution in the sandbox, the share of asserts passed, format and length shaping.

Each follows TRL's reward-function convention, ``fn(prompts=[...], completions=[...], **columns) ->
list[float | None]``, so ``codex_ml.plugins.rewards`` serves them by name beside any plugin's.

Execution rewards are decided by the sandbox (``eval/sandbox.py``) from the exit status of the
program alone: a completion that exits before the tests, prints a forged "passed" or tries to kill
the harness fails like any other wrong program and scores 0. ``None`` is kept for the one case where
nothing was learnt about the program: the sandbox itself broke down (its worker was lost twice and
a known-good program no longer passes). Such a completion is left out of its group, never scored 0.
"""

from __future__ import annotations

import ast
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from codex_ml.eval.humaneval import check_program
from codex_ml.eval.sandbox import Sandbox, SandboxError

CACHE_ENTRIES = 100_000  # verdicts kept per run (a few hundred bytes each)
HEALTH_PROGRAM = "assert 1 + 1 == 2\n"  # passes in any working sandbox: tells a broken sandbox from a hostile program


@dataclass
class ExecutionReward:
    """1 if the completion passes the problem's test in the sandbox, 0 if not, ``None`` on a sandbox breakdown.

    ``fraction=True``: the share of the test's asserts passed instead. The harness counts them without
    trusting the program's output: each top-level ``assert`` of ``check`` becomes a program of its own
    (the other statements of ``check`` kept), and each is judged by its exit status.

    Unbound (``sandbox=None``) it starts a sandbox for each call; a run binds one shared, warm sandbox
    with :meth:`bind`. Verdicts are cached by a hash of the program within one bound instance (a run).
    """

    fraction: bool = False
    sandbox: Sandbox | None = None
    timeout: float = 3.0
    workers: int = 0  # programs judged at once; 0: the sandbox's worker count
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def bind(self, sandbox: Sandbox, timeout: float, workers: int = 0) -> ExecutionReward:
        """A copy judging in ``sandbox`` with a verdict cache of its own."""
        return replace(self, sandbox=sandbox, timeout=timeout, workers=workers, _cache=OrderedDict(), _lock=threading.Lock())

    def __call__(
        self, *, prompts: Sequence[str], completions: Sequence[str], test: Sequence[str], entry_point: Sequence[str], **_: Any
    ) -> list[float | None]:
        if self.sandbox is None:
            with Sandbox(workers=min(len(completions), 4) or 1) as box:
                return self.bind(box, self.timeout)(prompts=prompts, completions=completions, test=test, entry_point=entry_point)
        units = [
            split_asserts(t) if self.fraction else [t] for t in test
        ]  # per completion: the tests whose verdicts it is scored on
        programs = [
            check_program({"prompt": p, "test": u, "entry_point": e}, c)
            for p, c, tests, e in zip(prompts, completions, units, entry_point)
            for u in tests
        ]
        verdicts = self._judge(programs)
        rewards: list[float | None] = []
        start = 0
        for tests in units:
            mine = verdicts[start : start + len(tests)]
            start += len(tests)
            rewards.append(None if any(v is None for v in mine) else sum(bool(v) for v in mine) / len(mine))
        return rewards

    def _judge(self, programs: list[str]) -> list[bool | None]:
        """The verdict on each program: cached ones from the cache, the rest in parallel in the sandbox."""
        keys = [hashlib.sha256(f"{self.timeout}\0{p}".encode("utf-8", "surrogatepass")).hexdigest() for p in programs]
        with self._lock:
            known = {k: self._cache[k] for k in keys if k in self._cache}
        todo = list(dict.fromkeys(k for k in keys if k not in known))  # identical programs are judged once
        if todo:
            source = dict(zip(keys, programs))
            box = self.sandbox
            assert box is not None  # bound in __call__
            # the sandbox's worker pool bounds how many run at once; run() is thread-safe
            with ThreadPoolExecutor(max_workers=self.workers or box.workers, thread_name_prefix="reward") as pool:
                found = dict(zip(todo, pool.map(lambda k: self._judge_one(source[k]), todo)))
            with self._lock:
                for k, v in found.items():
                    if v is not None:  # a breakdown is not a verdict: judge the program again next time
                        self._cache[k] = v
                while len(self._cache) > CACHE_ENTRIES:
                    self._cache.popitem(last=False)
            known.update(found)
        return [known[k] for k in keys]

    def _judge_one(self, program: str) -> bool | None:
        box = self.sandbox
        assert box is not None
        try:
            return box.run(program, self.timeout).passed
        except SandboxError:
            # the worker was lost twice on this program: the program's doing if the sandbox still works
            try:
                healthy = box.run(HEALTH_PROGRAM, self.timeout).passed
            except SandboxError:
                healthy = False
            return False if healthy else None


def split_asserts(test: str) -> list[str]:
    """``test`` as one test per top-level ``assert`` in its ``check`` function (its other statements kept in each).

    A test with no ``check`` function, no top-level assert, or that does not parse is one test, itself.
    """
    try:
        tree = ast.parse(test)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return [test]
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if len(checks) != 1:
        return [test]
    check = checks[0]
    asserts = [i for i, s in enumerate(check.body) if isinstance(s, ast.Assert)]
    if not asserts:
        return [test]
    body, dropped = check.body, set(asserts)
    out = []
    for keep in asserts:
        check.body = [s for i, s in enumerate(body) if i == keep or i not in dropped]
        out.append(ast.unparse(tree))
    check.body = body
    return out


def format_reward(*, prompts: Sequence[str], completions: Sequence[str], entry_point: Sequence[str], **_: Any) -> list[float]:
    """1 when the prompt and completion parse as Python and still define the entry point, else 0 (never executed)."""
    out = []
    for prompt, completion, name in zip(prompts, completions, entry_point):
        try:
            tree = ast.parse(prompt + completion)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            out.append(0.0)
            continue
        defined = any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name for n in ast.walk(tree))
        out.append(1.0 if defined else 0.0)
    return out


def length_reward(
    *, completions: Sequence[str], completion_ids: Sequence[Sequence[int]], max_completion_length: Sequence[int], **_: Any
) -> list[float]:
    """DAPO's soft overlong penalty: 0 up to the last quarter of ``max_completion_length`` tokens, then
    falling linearly to -1 at the limit (a completion cut off there is penalised most)."""
    out = []
    for ids, limit in zip(completion_ids, max_completion_length):
        buffer = max(1, limit // 4)
        over = len(ids) - (limit - buffer)
        out.append(0.0 if over <= 0 else -min(1.0, over / buffer))
    return out


execution = ExecutionReward()
execution_fraction = ExecutionReward(fraction=True)
