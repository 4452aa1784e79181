"""GRPO: golden losses, the k3 KL, group advantages, execution rewards under attack, problems, and the command end to end."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.numpy import load_file

from codex_ml.data.problems import ProblemError, read_problems
from codex_ml.eval.sandbox import Outcome, Sandbox, SandboxError
from codex_ml.models.loss import grpo_loss_sum, grpo_token_loss, grpo_units, k3_kl
from codex_ml.recipes.evaluate import run_config
from codex_ml.rl.rewards import ExecutionReward, format_reward, length_reward, split_asserts
from codex_ml.rl.rollout import pack_rollout
from codex_ml.rl.scoring import RewardScorer, group_advantages
from helpers import CLI, run_cli

# ---------------------------------------------------------------- golden losses on a hand-computed example

# two completions: 3 and 1 tokens (the second padded), advantages +1.5 and -0.5
LOGPS = torch.tensor([[-1.0, -2.0, -0.5], [-1.2, 0.0, 0.0]])
OLD = torch.tensor([[-1.4, -1.7, -0.5], [-1.0, 0.0, 0.0]])  # token 0: ratio e^0.4 > 1 + EPS_HIGH, clipped
REF = torch.tensor([[-0.9, -2.0, -0.7], [-1.5, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
ADV = torch.tensor([1.5, -0.5])
EPS, EPS_HIGH, BETA, MAX_NEW = 0.2, 0.28, 0.04, 8


def _by_hand() -> list[list[float]]:
    """The per-token loss written out token by token, with plain floats."""
    rows = []
    for i in range(2):
        row = []
        for t in range(int(MASK[i].sum())):
            r = math.exp(LOGPS[i, t].item() - OLD[i, t].item())
            a = ADV[i].item()
            clipped = min(max(r, 1 - EPS), 1 + EPS_HIGH)
            d = REF[i, t].item() - LOGPS[i, t].item()
            row.append(-min(r * a, clipped * a) + BETA * (math.exp(d) - d - 1))
        rows.append(row)
    return rows


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_each_loss_type_equals_its_formula_by_hand(loss_type):
    token_loss, ratio = grpo_token_loss(LOGPS, OLD, ADV, EPS, EPS_HIGH, BETA, REF)
    summed = grpo_loss_sum(token_loss, MASK, loss_type, MAX_NEW)
    units = grpo_units(MASK, torch.tensor([True, True]), loss_type)
    rows = _by_hand()
    expected = {
        "grpo": (sum(rows[0]) / 3 + sum(rows[1]) / 1) / 2,  # mean over tokens, then over completions
        "dr_grpo": (sum(rows[0]) + sum(rows[1])) / (2 * MAX_NEW),  # constant normaliser B * max_new_tokens
        "dapo": (sum(rows[0]) + sum(rows[1])) / 4,  # token mean over the batch
    }[loss_type]
    assert (summed / units).item() == pytest.approx(expected, rel=1e-6)
    assert ratio[0, 0].item() == pytest.approx(math.exp(0.4))
    assert rows[0][0] == pytest.approx(-(1 + EPS_HIGH) * 1.5 + BETA * (math.exp(0.1) - 0.1 - 1))  # the clipped term


def test_clipping_is_asymmetric_and_stops_the_gradient():
    logps = torch.tensor([[math.log(1.5)], [math.log(0.5)]], requires_grad=True)
    old = torch.zeros(2, 1)
    adv = torch.tensor([1.0, -1.0])
    loss, _ = grpo_token_loss(logps, old, adv, 0.2, 0.28)
    # above 1 + 0.28 with a positive advantage, below 1 - 0.2 with a negative one: the clipped term, no gradient
    assert loss[:, 0].tolist() == pytest.approx([-1.28, 0.8])
    loss.sum().backward()
    assert logps.grad is not None and logps.grad.abs().max().item() == 0.0


def test_k3_kl_estimates_the_exact_kl_on_an_enumerable_vocabulary():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(7, dtype=torch.float64), -1)  # the policy
    q = torch.softmax(torch.randn(7, dtype=torch.float64), -1)  # the reference
    exact = (p * (p.log() - q.log())).sum()
    expected_k3 = (p * k3_kl(p.log(), q.log())).sum()  # E over tokens sampled from the policy, enumerated
    assert expected_k3.item() == pytest.approx(exact.item(), rel=1e-12)
    assert (k3_kl(p.log(), q.log()) >= 0).all() and k3_kl(p.log(), p.log()).abs().max().item() == 0


def test_group_advantages_leave_out_what_was_not_judged():
    rewards = torch.tensor([1.0, 0.0, 0.0, math.nan, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    adv, std = group_advantages(rewards, valid, 4, "none")
    assert adv.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0, 0])  # the mean of 3, not of 4
    assert std[0].item() == pytest.approx(math.sqrt((4 / 9 + 1 / 9 + 1 / 9) / 2)) and std[1].item() == 0
    scaled, _ = group_advantages(rewards, valid, 4, "group")
    assert scaled[0].item() == pytest.approx((2 / 3) / (std[0].item() + 1e-4)) and scaled[4:].abs().max() == 0


def test_packed_rollouts_put_every_completion_after_its_prompt():
    batch = pack_rollout([[5, 6], [7]], [[1, 2, 3], [4]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 1, 2, 3], [0, 7, 4, 0, 0]]
    assert batch["position_ids"].tolist()[1][:3] == [0, 0, 1] and batch["prompt_len"] == 2
    assert batch["completion_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# ---------------------------------------------------------------- execution rewards, attacked

PROMPT = 'def inc(x):\n    """x plus one"""\n'
TEST = "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(2) == 3\n    assert candidate(0) == 5\n"
ATTACKS = {
    "exit 0 before the tests": "    import os\n    os._exit(0)\n",
    "exit 0 at import": "    return x + 1\nimport os\nos._exit(0)\n",
    "forged output": "    return x + 1\nprint('passed')\nimport sys\n"
    "sys.stdout.write('{\"passed\": true}\\n')\nraise SystemExit(0)\n",
    "kill the harness": "    return x + 1\nimport os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
    "os.killpg(0, signal.SIGKILL)\n",
    "kill everything": "    return x + 1\nimport os, signal\nos.kill(-1, signal.SIGKILL)\n",
}


@pytest.fixture(scope="module")
def box():
    with Sandbox(workers=2) as sandbox:
        yield sandbox


def _score(reward, completions, test=TEST):
    n = len(completions)
    return reward(prompts=[PROMPT] * n, completions=completions, test=[test] * n, entry_point=["inc"] * n)


def test_reward_hacking_scores_zero(box):
    reward = ExecutionReward().bind(box, timeout=3.0)
    fraction = ExecutionReward(fraction=True).bind(box, timeout=3.0)
    honest = "    return x + 1\n"
    assert _score(reward, [honest]) == [0.0]  # the third assert fails
    assert _score(fraction, [honest]) == [pytest.approx(2 / 3)]  # two of three asserts, counted by exit status
    easy = TEST.replace("candidate(0) == 5", "candidate(0) == 1")
    assert _score(reward, [honest], easy) == [1.0] and _score(fraction, [honest], easy) == [1.0]
    names = list(ATTACKS)
    assert _score(reward, [ATTACKS[n] for n in names], easy) == [0.0] * len(names), names
    assert _score(fraction, [ATTACKS[n] for n in names], easy) == [0.0] * len(names), names


class _CountingSandbox:
    """The real sandbox, counting the programs it runs; ``broken`` makes every run an infrastructure error."""

    def __init__(self, inner: Sandbox, broken: bool = False, breaks_on: str | None = None) -> None:
        self.inner, self.broken, self.breaks_on, self.runs = inner, broken, breaks_on, 0
        self.workers = inner.workers

    def run(self, program: str, timeout: float) -> Outcome:
        self.runs += 1
        if self.broken or (self.breaks_on is not None and self.breaks_on in program):
            raise SandboxError("sandbox worker lost twice on the same program")
        return self.inner.run(program, timeout)


def test_a_broken_sandbox_excludes_the_completion_but_a_program_that_breaks_it_scores_zero(box):
    broken = ExecutionReward().bind(_CountingSandbox(box, broken=True), timeout=3.0)  # type: ignore[arg-type]
    assert _score(broken, ["    return x + 1\n"]) == [None]
    # the sandbox still runs a known-good program: the loss was the program's doing
    hostile = ExecutionReward().bind(_CountingSandbox(box, breaks_on="MAGIC"), timeout=3.0)  # type: ignore[arg-type]
    assert _score(hostile, ["    return x + 1  # MAGIC\n", "    return x + 1\n"], TEST.replace("== 5", "== 1")) == [0.0, 1.0]
    scorer = RewardScorer({"execution": broken}, [])
    scores = scorer([PROMPT], ["    return 1\n"], {"test": [TEST], "entry_point": ["inc"]})
    assert scores.valid.tolist() == [False] and math.isnan(scores.total[0].item())


def test_identical_completions_are_judged_once_per_run(box):
    counting = _CountingSandbox(box)
    reward = ExecutionReward().bind(counting, timeout=3.0)  # type: ignore[arg-type]
    assert _score(reward, ["    return x + 1\n"] * 4 + ["    return x\n"]) == [0.0] * 5
    assert counting.runs == 2
    _score(reward, ["    return x + 1\n"])
    assert counting.runs == 2


def test_split_asserts_keeps_the_other_statements():
    test = "def check(candidate):\n    y = 2\n    assert candidate(1) == y\n    assert candidate(2) == 3\n"
    parts = split_asserts(test)
    assert len(parts) == 2 and all("y = 2" in p for p in parts)
    assert "candidate(2)" not in parts[0] and "candidate(1)" not in parts[1]
    assert split_asserts("not python (") == ["not python ("]


def test_format_and_length_shaping():
    assert format_reward(prompts=[PROMPT] * 2, completions=["    return x\n", "    return (\n"], entry_point=["inc"] * 2) == [
        1.0,
        0.0,
    ]
    got = length_reward(completions=["a"] * 3, completion_ids=[[1] * 4, [1] * 7, [1] * 8], max_completion_length=[8] * 3)
    assert got == [0.0, -0.5, -1.0]


# ---------------------------------------------------------------- problems


def test_a_problem_without_its_test_is_refused_naming_file_line_task_and_field(tmp_path):
    good = {"task_id": "T/0", "prompt": "def f(x):\n", "test": "def check(c):\n    assert c(1)\n", "entry_point": "f"}
    path = tmp_path / "p.jsonl"
    bad = dict(good, task_id="T/1")
    del bad["entry_point"]
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(ProblemError, match=r"p\.jsonl:3 \(T/1\): .*'entry_point'"):
        read_problems([str(path)])
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(ProblemError, match="repeats"):
        read_problems([str(path)])


# ---------------------------------------------------------------- the command


@pytest.mark.parametrize(
    "override, key",
    [
        ("grpo.group_size=3", "grpo.group_size"),
        ("grpo.beta=-0.1", "grpo.beta"),
        ("grpo.rewards=[nope]", "nope"),
        ("grpo.loss_type=ppo", "grpo.loss_type"),
    ],
)
def test_bad_settings_are_refused_by_name_before_any_work(grpo_args, tmp_path, override, key):
    run = tmp_path / "run"
    proc = run_cli("grpo", *grpo_args(run, override), check=False)
    assert proc.returncode == 2 and key in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not run.exists()


def _weights(run):
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    return last.name, load_file(str(last / "model.safetensors"))


@pytest.mark.slow
def test_grpo_killed_mid_run_resumes_bit_identically(grpo_args, tmp_path, plugin_env):
    # a policy update every step (the plugin's reward varies within groups), the reference kept, two updates
    # per generation batch, so the kill lands between the updates of one batch
    extra = [
        "training.deterministic=true",
        "training.max_steps=5",
        "training.checkpoint_every=1",
        "grpo.beta=0.04",
        "grpo.iterations=2",
        "grpo.rewards=[execution,id_parity]",
        "training.lr=1e-3",
    ]
    ref = tmp_path / "ref"
    run_cli("grpo", *grpo_args(ref, *extra), env=plugin_env)
    rows = [json.loads(line) for line in (ref / "metrics.ndjson").read_text().splitlines()]
    train = [r for r in rows if r.get("event") == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert abs(train[0]["kl"]) < 1e-6 and train[0]["clip_ratio"] == 0  # the policy is the reference at step 1
    assert any(r["grad_norm"] > 0 for r in train)  # it learnt something, so the comparison below means something
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "rewards/execution/mean"):
        assert all(math.isfinite(r[key]) for r in train), key

    run = tmp_path / "killed"
    args = grpo_args(run, *extra)
    with open(tmp_path / "log", "w") as log:
        p = subprocess.Popen([*CLI, "grpo", *args], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **plugin_env})
        deadline = time.time() + 240
        while not (run / "checkpoints" / "step_00000003" / "COMPLETE").exists() and time.time() < deadline:
            assert p.poll() is None, (tmp_path / "log").read_text()[-2000:]
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)  # mid-run, halfway through a generation batch's two updates
        p.wait()
    resumed = run_cli("grpo", *args, env=plugin_env)
    assert "resuming from step_0000000" in resumed.stdout
    name_a, a = _weights(ref)
    name_b, b = _weights(run)
    assert name_a == name_b == "step_00000005"
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    # a GRPO run folder is a training run folder: evaluation reads its config, export writes the model
    assert run_config(run).training.max_steps == 5
    run_cli("export", f"run_dir={run}", f"out={tmp_path / 'hf'}")
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()
