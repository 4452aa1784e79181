"""Does `codex-ml grpo` make a model better at code it was not trained on? Held-out pass@1 before and after.

A verifiable toy task: families of one-line Python functions with a parameter K (``return x + K``,
``return s[:K]``, ``return [v * K for v in xs]``, ...), each a HumanEval-format problem whose docstring
states K and whose tests check the answer. Train and held-out problems differ by their parameters: every
family holds out three values of K (and validates on a fourth), each trained on in other families. The script

1. pre-trains a tiny native model from scratch (`codex-ml train`) on files of the train problems' solutions,
   and starts from its first checkpoint whose pass@1 on validation problems (a fourth K per family, neither
   trained on nor held out) reaches ``--start`` (15%): a model that writes the task's code but does not yet
   generalise it reliably (held-out problems play no part in the choice);
2. samples held-out completions (16 per problem, temperature ``--temperature``) and judges them
   in the sandbox (`codex-ml evaluate-samples`): pass@1 before;
3. runs `codex-ml grpo` with the execution reward on the train problems, and measures held-out pass@1 again;
4. runs `codex-ml dpo` from the same pre-trained model on pairs of its own passing and failing completions
   of the train problems (judged in the sandbox), and measures held-out pass@1 after that too.

Prints a table of held-out pass@1 with seeded bootstrap 95% intervals (resampling held-out problems), the
paired bootstrap of each gain, the DPO run's preference accuracies, the wall and CPU time of each stage,
and last ``ratio: X``, held-out pass@1 after GRPO over before (higher is better).

    python benchmarks/grpo_learning.py            # about 10 minutes on 2 cores
    python benchmarks/grpo_learning.py --smoke    # well under a minute; checks the script runs
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import machine_line

# (entry point, argument, docstring, body): K is the parameter each problem fixes
FAMILIES = [
    ("plus", "x", "Return x plus {k}.", "return x + {k}"),
    ("minus", "x", "Return x minus {k}.", "return x - {k}"),
    ("times", "x", "Return x times {k}.", "return x * {k}"),
    ("modulo", "x", "Return x modulo {k}.", "return x % {k}"),
    ("divide", "x", "Return x divided by {k}, rounded down.", "return x // {k}"),
    ("larger", "x", "Return the larger of x and {k}.", "return max(x, {k})"),
    ("smaller", "x", "Return the smaller of x and {k}.", "return min(x, {k})"),
    ("repeat", "s", "Return s repeated {k} times.", "return s * {k}"),
    ("head", "s", "Return the first {k} characters of s.", "return s[:{k}]"),
    ("drop", "s", "Return s without its first {k} characters.", "return s[{k}:]"),
    ("mirror", "s", "Return s reversed and repeated {k} times.", "return s[::-1] * {k}"),
    ("take", "xs", "Return the first {k} items of xs.", "return xs[:{k}]"),
    ("skip", "xs", "Return xs without its first {k} items.", "return xs[{k}:]"),
    ("shift", "xs", "Return xs with {k} added to every item.", "return [v + {k} for v in xs]"),
    ("scale", "xs", "Return xs with every item multiplied by {k}.", "return [v * {k} for v in xs]"),
    ("above", "xs", "Return the items of xs greater than {k}.", "return [v for v in xs if v > {k}]"),
    ("count", "xs", "Return how many times {k} occurs in xs.", "return xs.count({k})"),
]
# arguments the tests call each function with: chosen so that no other K of the family passes them
INPUTS = {
    "x": [0, 5, 12, 23, 40],
    "s": ["abcdefghijkl", "hello"],
    "xs": [list(range(12)), [v for v in range(1, 10) for _ in range(v)]],
}
KS = range(1, 10)
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # HumanEval's stop sequences, grpo.stop's default
CLI = [sys.executable, "-m", "codex_ml.cli"]


@dataclass
class Settings:
    pretrain_steps: int  # at most: the first checkpoint passing --start of the train problems is the start
    every: int  # pre-training steps between checkpoints
    grpo_steps: int
    dpo_steps: int
    samples: int  # held-out completions per problem
    docs: int  # pre-training documents
    layers: int
    width: int


FULL = Settings(pretrain_steps=600, every=25, grpo_steps=200, dpo_steps=40, samples=16, docs=4000, layers=4, width=128)
SMOKE = Settings(pretrain_steps=4, every=2, grpo_steps=2, dpo_steps=2, samples=2, docs=200, layers=2, width=64)


def problem(family: tuple[str, str, str, str], k: int) -> dict:
    """A HumanEval-format problem with its canonical solution and asserts computed from it."""
    name, arg, doc, body = family
    # the prompt stops after the docstring, not after its newline: the tokenizer trained on the corpus joins a
    # newline with the next line's indent, so a prompt ending in a bare newline is a token the model never saw
    # there
    prompt = f'def {name}({arg}):\n    """{doc.format(k=k)}"""'
    solution = f"\n    {body.format(k=k)}\n"
    scope: dict = {}
    exec(prompt + solution, scope)  # nosec B102  # our own generated one-liner, to compute the expected values
    asserts = "".join(f"    assert candidate({a!r}) == {scope[name](a)!r}\n" for a in INPUTS[arg])
    return {
        "task_id": f"Toy/{name}_{k}",
        "prompt": prompt,
        "canonical_solution": solution,
        "test": f"def check(candidate):\n{asserts}",
        "entry_point": name,
    }


def split_problems() -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, held-out): family i holds out three values of K and validates on a fourth, in rotation,
    so that each K missing from one family is trained on in others."""
    train, validation, held_out = [], [], []
    for i, family in enumerate(FAMILIES):
        unseen = [(3 * i + j) % len(KS) + KS.start for j in range(4)]
        for k in KS:
            split = held_out if k in unseen[:3] else validation if k == unseen[3] else train
            split.append(problem(family, k))
    return train, validation, held_out


def corpus(train: list[dict], docs: int, rng: random.Random) -> list[dict]:
    """Source files of six train functions each, in random order: what the model learns the task's code from."""
    return [{"text": "\n\n".join(p["prompt"] + p["canonical_solution"] for p in rng.sample(train, 6))} for _ in range(docs)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Clock:
    """Wall time and CPU time (this process and its children, the sandbox's included) of each stage."""

    def __init__(self) -> None:
        self.stages: dict[str, tuple[float, float]] = {}

    @staticmethod
    def _cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), self._cpu()
        yield
        self.stages[name] = (time.perf_counter() - wall, self._cpu() - cpu)


def codex_ml(*args: str) -> None:
    """Run one codex-ml command; a failure stops the benchmark with its output."""
    out = subprocess.run([*CLI, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"codex-ml {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")


def find_checkpoint(run_dir: Path, which: str = "latest") -> Path:
    from codex_ml.recipes.checkpoints import find_checkpoint

    return find_checkpoint(run_dir, which)


def sample(checkpoint: Path, problems: list[dict], n: int, a: argparse.Namespace, seed: int) -> list[dict]:
    """``n`` completions of each problem from a run's checkpoint (codex-ml's sampler, HumanEval's stop sequences)."""
    import torch

    from codex_ml.eval.generate import SamplingSettings, generate
    from codex_ml.recipes.checkpoints import load_checkpoint_model
    from codex_ml.runs import TOKENIZER_DIR
    from codex_ml.tokenizer.core import CodeTokenizer

    run_dir = checkpoint.parent.parent
    model = load_checkpoint_model(run_dir, checkpoint, torch.device("cpu"))
    tokenizer = CodeTokenizer.load(run_dir / TOKENIZER_DIR)
    settings = SamplingSettings(max_new_tokens=a.max_new_tokens, temperature=a.temperature, n=n, seed=seed, stop=STOP)
    groups = generate(model, tokenizer, [p["prompt"] for p in problems], settings)
    return [{"task_id": p["task_id"], "completion": c.text} for p, group in zip(problems, groups) for c in group]


def judge(samples: list[dict], problems_path: Path, path: Path) -> list[dict]:
    """`codex-ml evaluate-samples` on the samples: each record with its ``passed`` verdict, in order."""
    write_jsonl(path, samples)
    codex_ml("evaluate-samples", f"samples={path}", f"problems={problems_path}", "k=[1]")
    return [json.loads(line) for line in Path(f"{path}_results.jsonl").read_text().splitlines()]


def pass_rates(results: list[dict], problems: list[dict]) -> np.ndarray:
    """Each problem's share of passing samples (its unbiased pass@1), in the problems' order."""
    passed: dict[str, list[bool]] = {p["task_id"]: [] for p in problems}
    for r in results:
        passed[r["task_id"]].append(bool(r["passed"]))
    return np.array([np.mean(v) for v in passed.values()])


def bootstrap(values: np.ndarray, seed: int) -> tuple[float, float]:
    """Seeded percentile bootstrap over problems (rows): a 95% interval of the mean, or of the mean difference
    of the columns (after - before) for paired rows."""
    from codex_ml.eval.metrics import bootstrap_ci

    statistic = (lambda v: float(np.mean(v[:, 1] - v[:, 0]))) if values.ndim == 2 else np.mean
    return bootstrap_ci(values, statistic=statistic, n_resamples=2000, seed=seed)


def preference_pairs(
    results: list[dict], problems: list[dict], rng: random.Random, per_problem: int, canonical: bool = False
) -> list[dict]:
    """Up to ``per_problem`` (passing, failing) pairs of distinct completions of each problem that has both.

    ``canonical``: the canonical solutions join the passing completions (for --smoke, whose untrained model
    passes nothing).
    """
    by_id = {p["task_id"]: p for p in problems}
    good: dict[str, list[str]] = {p["task_id"]: [p["canonical_solution"]] for p in problems} if canonical else {}
    bad: dict[str, list[str]] = {}
    for r in results:
        bucket = (good if r["passed"] else bad).setdefault(r["task_id"], [])
        if r["completion"] not in bucket:
            bucket.append(r["completion"])
    pairs = []
    for task_id in sorted(set(good) & set(bad)):
        chosen, rejected = good[task_id], bad[task_id]
        for i in range(min(per_problem, max(len(chosen), len(rejected)))):
            pairs.append(
                {
                    "task_id": task_id,
                    "prompt": by_id[task_id]["prompt"],
                    "chosen": chosen[i % len(chosen)],
                    "rejected": rejected[i % len(rejected)],
                }
            )
    rng.shuffle(pairs)
    return pairs


def logged(run_dir: Path, key: str) -> list[float]:
    """Every value of ``key`` in the run's metrics.ndjson, in order."""
    events = map(json.loads, (run_dir / "metrics.ndjson").read_text().splitlines())
    return [e[key] for e in events if key in e]


def curve(values: list[float], parts: int = 4) -> str:
    """``values`` averaged over ``parts`` stretches of the run: learning seen from inside it."""
    chunks = [c for c in np.array_split(np.array(values, dtype=float), parts) if len(c)]
    return " -> ".join(f"{c.mean():.2f}" for c in chunks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling, for evaluation and GRPO alike")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--start", type=float, default=0.15, help="validation pass@1 that ends pre-training")
    p.add_argument("--grpo-lr", type=float, default=3e-4)
    p.add_argument("--dpo-lr", type=float, default=3e-5)
    p.add_argument("--workdir", type=Path, help="keep the runs and files here instead of in a temporary folder")
    p.add_argument("--smoke", action="store_true", help="a 2-layer model and a few steps of each stage")
    a = p.parse_args()
    s = SMOKE if a.smoke else FULL
    rng = random.Random(a.seed)
    clock = Clock()
    print(machine_line())

    with tempfile.TemporaryDirectory() as tmp:
        root = a.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        train, validation, held_out = split_problems()
        train_path = write_jsonl(root / "train.jsonl", train)
        validation_path = write_jsonl(root / "validation.jsonl", validation)
        held_path = write_jsonl(root / "held_out.jsonl", held_out)
        corpus_path = write_jsonl(root / "corpus.jsonl", corpus(train, s.docs, rng))
        common = ["tracking.mlflow=false", "model.device=cpu", f"training.seed={a.seed}", "data.num_workers=0"]

        with clock.stage("pre-train (codex-ml train)"):
            codex_ml(
                "train", "data.source=jsonl", f"data.paths=[{corpus_path}]", f"data.cache_dir={root / 'cache'}",
                "data.near_dedup=false", "data.decontaminate=[]", "data.redact=false", "data.seq_len=128",
                "tokenizer.vocab_size=512", f"model.n_layer={s.layers}", f"model.d_model={s.width}", "model.n_head=4",
                "model.n_kv_head=4", f"model.d_ff={s.width * 3}", "training.batch_size=16", "training.lr=3e-3",
                "training.schedule=constant", f"training.warmup_steps={s.every}", f"training.max_steps={s.pretrain_steps}",
                "training.eval_every=0", f"training.checkpoint_every={s.every}", "training.keep_last=1000",
                "training.sample_tokens=0", f"run.dir={root / 'sft'}", *common,
            )  # fmt: skip

        # the starting point: the first checkpoint passing --start of the validation problems (the held-out ones
        # play no part), so that the model is neither blank nor done whatever the machine's arithmetic makes of a seed
        with clock.stage("choose checkpoint (validation)"):
            for step in range(s.every, s.pretrain_steps + 1, s.every):
                start = find_checkpoint(root / "sft", str(step))
                samples = sample(start, validation, s.samples, a, seed=a.seed + 1)
                validation_pass = pass_rates(
                    judge(samples, validation_path, root / f"validation_{step}.jsonl"), validation
                ).mean()
                if validation_pass >= a.start:
                    break

        def held_out_rates(checkpoint: Path, name: str) -> np.ndarray:
            with clock.stage(f"evaluate {name}"):
                samples = sample(checkpoint, held_out, s.samples, a, seed=a.seed)
                return pass_rates(judge(samples, held_path, root / f"{name.replace(' ', '_')}.jsonl"), held_out)

        before = held_out_rates(start, "before")

        with clock.stage("GRPO (codex-ml grpo)"):
            codex_ml(
                "grpo", f"model.path={start}", f"data.paths=[{train_path}]", f"run.dir={root / 'grpo'}",
                "grpo.rewards=[execution]", "grpo.group_size=8", "training.batch_size=64",
                f"grpo.max_new_tokens={a.max_new_tokens}", f"grpo.temperature={a.temperature}",
                f"training.lr={a.grpo_lr}", f"training.max_steps={s.grpo_steps}",
                f"training.checkpoint_every={s.grpo_steps}", *common,
            )  # fmt: skip
        after = held_out_rates(find_checkpoint(root / "grpo"), "after GRPO")

        with clock.stage("DPO pairs (sample + judge train)"):
            own = judge(sample(start, train, 8, a, seed=a.seed + 2), train_path, root / "train_samples.jsonl")
            pairs = preference_pairs(own, train, rng, per_problem=4, canonical=a.smoke)
            pairs_path = write_jsonl(root / "pairs.jsonl", pairs)
        with clock.stage("DPO (codex-ml dpo)"):
            codex_ml(
                "dpo", f"model.path={start}", f"data.paths=[{pairs_path}]", f"run.dir={root / 'dpo'}",
                "data.seq_len=128", "data.val_fraction=0.2", "data.id_field=task_id", f"training.lr={a.dpo_lr}",
                f"training.max_steps={s.dpo_steps}", "training.batch_size=16", "training.warmup_steps=0",
                f"training.eval_every={s.dpo_steps}", f"training.checkpoint_every={s.dpo_steps}",
                "training.sample_tokens=0", *common,
            )  # fmt: skip
        after_dpo = held_out_rates(find_checkpoint(root / "dpo"), "after DPO")

        grpo_reward = curve(logged(root / "grpo", "reward"))
        dpo_accuracy = curve(logged(root / "dpo", "rewards/accuracies"))
        dpo_val_accuracy = logged(root / "dpo", "val_rewards/accuracies")[-1]

    print(
        f"\n{len(FAMILIES)} task families, K in {KS.start}..{KS.stop - 1}: {len(train)} train problems, "
        f"{len(validation)} validation and {len(held_out)} held-out problems (K unseen in their family); "
        f"{s.samples} samples each at temperature {a.temperature}; 95% CI: bootstrap over held-out problems, seeded"
    )
    print(
        f"start: pre-training step {step} of {s.pretrain_steps}, the first to pass {validation_pass:.2f} >= {a.start} "
        "of the validation problems"
    )
    print("| stage | held-out pass@1 | 95% CI | gain (points) | gain 95% CI |")
    print("|---|---|---|---|---|")
    for name, rates in (("pre-trained", before), ("after GRPO", after), ("after DPO", after_dpo)):
        lo, hi = bootstrap(rates, a.seed)
        glo, ghi = bootstrap(np.stack([before, rates], axis=1), a.seed)
        gain = 100 * (rates.mean() - before.mean())
        print(f"| {name} | {rates.mean():.3f} | {lo:.3f}..{hi:.3f} | {gain:+.1f} | {100 * glo:+.1f}..{100 * ghi:+.1f} |")
    print(f"\nGRPO train reward, by quarter of the run: {grpo_reward}")
    print(
        f"DPO: {len(pairs)} pairs (own passing vs failing completions of train problems); preference accuracy by "
        f"quarter of the run: {dpo_accuracy}; on held-out pairs (problems DPO did not train on): {dpo_val_accuracy:.3f}"
    )
    print("\n| stage | wall time (s) | CPU time (s) |")
    print("|---|---|---|")
    for name, (wall, cpu) in clock.stages.items():
        print(f"| {name} | {wall:.1f} | {cpu:.1f} |")
    total_wall, total_cpu = (sum(t) for t in zip(*clock.stages.values()))
    print(f"| total | {total_wall:.1f} | {total_cpu:.1f} |")
    lo, hi = bootstrap(np.stack([before, after], axis=1), a.seed)
    print(f"\ngain: {100 * (after.mean() - before.mean()):+.1f} points (95% CI {100 * lo:+.1f}..{100 * hi:+.1f})")
    print(f"ratio: {after.mean() / max(before.mean(), 1e-9):.2f}")


if __name__ == "__main__":
    main()
