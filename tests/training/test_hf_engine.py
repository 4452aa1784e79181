"""`training.engine=hf` (the Hugging Face Trainer): target tokens counted as the native loop counts
them, and a run killed after a checkpoint resumes with no batch skipped or repeated."""

import json
import signal
import subprocess
import time

import numpy as np
import pytest
import yaml

from codex_ml.data.rows import RowBatches, Rows
from codex_ml.models.loss import IGNORE_INDEX
from helpers import CLI, data_args, run_cli, save_tiny_hf_models
from training.distributed_helpers import complete_checkpoints, events

FAST = [
    "training.engine=hf",
    "training.log_every=1",
    "training.eval_batches=1",
    "training.warmup_steps=2",
    "training.sample_tokens=0",
    "training.deterministic=true",
    "tracking.mlflow=false",
]


@pytest.fixture(scope="module")
def llama_dir(corpus_dir, tmp_path_factory):
    return save_tiny_hf_models(tmp_path_factory.mktemp("hf-engine"), ["llama"], corpus_dir) / "llama"


def test_tokens_are_the_target_tokens_of_each_step(llama_dir, tmp_path):
    """SFT rows hold different numbers of target tokens; the count is theirs, not batch x seq x accumulation."""
    data = tmp_path / "sft.jsonl"
    records = [
        {"prompt": f"def f_{i}(x):\n", "completion": "    x = x + 1\n" * (1 + i % 5) + "    return x\n"} for i in range(48)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = tmp_path / "run"
    run_cli(
        "train",
        "model=hf",
        f"model.path={llama_dir}",
        "data.source=sft",
        f"data.paths=[{data}]",
        "data.seq_len=64",
        "data.pack=false",
        "training.max_steps=3",
        "training.batch_size=4",
        "training.grad_accum=2",
        f"run.dir={run}",
        *FAST,
    )
    # the batches the run trained on, drawn again from its cached rows in its order
    rows_dir = json.loads((run / "env.json").read_text())["dataset"]["path"]
    rows = Rows(*(np.load(f"{rows_dir}/train_{n}.npy") for n in ("input_ids", "labels", "position_ids", "segments")))
    seed = yaml.safe_load((run / "config.yaml").read_text())["training"]["seed"]
    micro = RowBatches(rows, 4, seed, native=False)
    per_step = [sum(int((next(micro)["labels"] != IGNORE_INDEX).sum()) for _ in range(2)) for _ in range(3)]
    assert per_step[0] < 2 * 4 * 64  # the premise: padding and prompts are not targets
    assert [e["tokens"] for e in events(run, "train")] == list(np.cumsum(per_step))


@pytest.mark.slow
def test_killed_after_a_checkpoint_resumes_with_no_batch_skipped_or_repeated(llama_dir, corpus_dir, tmp_path):
    steps = 12
    args = [
        "model=hf",
        f"model.path={llama_dir}",
        *data_args(corpus_dir),
        f"training.max_steps={steps}",
        "training.checkpoint_every=3",
        "training.batch_size=4",
        *FAST,
    ]
    ref = tmp_path / "ref"
    run_cli("train", *args, f"run.dir={ref}")
    run = tmp_path / "killed"
    with open(tmp_path / "log", "w") as log:
        p = subprocess.Popen([*CLI, "train", *args, f"run.dir={run}"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while not complete_checkpoints(run) and time.time() < deadline:
            assert p.poll() is None, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait()
    resumed_from = complete_checkpoints(run)[-1].name
    assert resumed_from != f"step_{steps:08d}", "the run ended before it was killed"
    out = run_cli("train", *args, f"run.dir={run}")
    assert f"resuming from {resumed_from}" in out.stdout
    a = {e["step"]: e for e in events(ref, "train")}
    got = events(run, "train")
    assert [e["step"] for e in got] == list(range(1, steps + 1))  # each step once: none lost, none twice
    for e in got:
        assert abs(e["train_loss"] - a[e["step"]]["train_loss"]) <= 1e-4, (e, a[e["step"]])
        assert e["tokens"] == a[e["step"]]["tokens"]
