"""training.strategy=fsdp: FSDP2 on two gloo ranks trains like one process with the combined batch,
its sharded (DCP) checkpoints complete only when every rank wrote, resume on another number of
ranks at the same global sample, and are read whole by the inference path.

Tolerance: fp32 on CPU, 1e-4 absolute on losses and weights. Two ranks reduce the gradients in
another order than one process sums them, so the runs agree to rounding, not bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import CLI, tiny_train_args
from training.distributed_helpers import TORCHRUN, complete_checkpoints, events

TOL = 1e-4
STEPS = 6
# every step's loss logged, evaluation only at the end, checkpoints at step 3 and 6
COMMON = ["training.deterministic=true", "training.log_every=1", "training.checkpoint_every=3", "training.sample_tokens=0"]


def _run(cmd: list[str], cwd: Path, cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_one(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    return _run([*CLI, "train", *args], cwd, cache)


def train_two(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    return _run([*TORCHRUN, "-m", "codex_ml.cli", "train", *args], cwd, cache)


def losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["train_loss"] for e in events(run_dir, "train")}


def dcp_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model's tensors of a DCP checkpoint, read by torch's own converter (an independent reader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(checkpoint / "sharded", f"{tmp}/full.pt")
        return torch.load(f"{tmp}/full.pt", weights_only=False)["model"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) <= set(b), sorted(set(a) - set(b))[:3]
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(corpus_dir, tmp_path_factory):
    """One process with batch 4, and two fsdp ranks with batch 1 x 2 accumulation steps each (the
    same 4 windows a step), checkpointing asynchronously."""
    root = tmp_path_factory.mktemp("fsdp")
    cache = root / "cache"
    one, two = root / "one", root / "two"
    train_one(tiny_train_args(corpus_dir, one, steps=STEPS, extra=COMMON), root, cache)
    fsdp = ["training.strategy=fsdp", "training.batch_size=1", "training.grad_accum=2", "training.async_checkpoint=true"]
    out = train_two(tiny_train_args(corpus_dir, two, steps=STEPS, extra=[*COMMON, *fsdp]), root, cache)
    return {"root": root, "cache": cache, "one": one, "two": two, "stdout": out.stdout}


def test_two_fsdp_ranks_equal_one_process_with_the_combined_batch(runs):
    a, b = losses(runs["one"]), losses(runs["two"])
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert max(abs(a[s] - b[s]) for s in a) < TOL, (a, b)
    # clipping (training.grad_clip=1) sees the norm over every rank's gradient shards: one process's norm
    norms = [{e["step"]: e["grad_norm"] for e in events(runs[r], "train")} for r in ("one", "two")]
    assert max(abs(norms[0][s] - norms[1][s]) for s in a) < TOL and max(norms[0].values()) > 1, norms
    ref = load_file(str(complete_checkpoints(runs["one"])[-1] / "model.safetensors"))
    final = complete_checkpoints(runs["two"])[-1]
    assert final.name == f"step_{STEPS:08d}"
    assert max_diff(ref, dcp_tensors(final)) < TOL
    # the inference path (export, evaluate, generate, serve) reads the shards whole
    from codex_ml.recipes.checkpoints import load_checkpoint_model

    model = load_checkpoint_model(runs["two"], final, torch.device("cpu"))
    assert max_diff(ref, {k: v for k, v in model.state_dict().items() if k in ref}) < TOL
    env = json.loads((runs["two"] / "env.json").read_text())
    assert env["strategy"] == "fsdp" and env["world_size"] == 2


def test_every_rank_writes_its_shards_and_the_checkpoint_lists_them(runs):
    final = complete_checkpoints(runs["two"])[-1]
    manifest = json.loads((final / "manifest.json").read_text())
    shards = sorted(n for n in manifest["files"] if n.startswith("sharded/"))
    assert shards == ["sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"], shards
    assert "optimizer.pt" not in manifest["files"] and "model.safetensors" not in manifest["files"]
    checkpoints = events(runs["two"], "checkpoint")
    assert [e["step"] for e in checkpoints] == [3, 6]
    assert all(e["async"] and e["host_staging_bytes"] > 0 for e in checkpoints), checkpoints


def test_a_corrupted_shard_is_refused_naming_the_file(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["two"], run)
    shard = complete_checkpoints(run)[-1] / "sharded" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    env = {**os.environ, "XDG_CACHE_HOME": str(runs["cache"])}
    proc = subprocess.run([*CLI, "export", f"run_dir={run}", f"out={tmp_path / 'hf'}"], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "__1_0.distcp" in proc.stdout + proc.stderr and "SHA-256" in proc.stdout + proc.stderr


def test_two_rank_checkpoint_resumes_on_one_process_at_the_same_global_sample(runs, corpus_dir, tmp_path):
    """Steps 4-6 resumed on one process from the two ranks' step 3 equal the one-process run's; a
    half-written later checkpoint (no COMPLETE marker) is never resumed."""
    run = tmp_path / "run"
    shutil.copytree(runs["two"], run)
    last = complete_checkpoints(run)[-1]
    half = run / "checkpoints" / "step_00000005"
    shutil.copytree(last, half)
    (half / "COMPLETE").unlink()
    shutil.rmtree(last)
    out = train_one(
        tiny_train_args(corpus_dir, run, steps=STEPS, extra=[*COMMON, "training.strategy=fsdp"]), tmp_path, runs["cache"]
    )
    assert "resuming from step_00000003" in out.stdout
    assert "written by 2 rank(s), this run has 1" in out.stdout
    a, b = losses(runs["one"]), losses(run)
    assert sorted(b) == list(range(1, STEPS + 1)) and len(events(run, "train")) == STEPS  # each step logged once
    assert max(abs(a[s] - b[s]) for s in range(4, STEPS + 1)) < TOL, (a, b)
    ref = load_file(str(complete_checkpoints(runs["one"])[-1] / "model.safetensors"))
    assert max_diff(ref, dcp_tensors(complete_checkpoints(run)[-1])) < TOL


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_fsdp_ranks(runs, corpus_dir, tmp_path):
    """The reverse: a safetensors checkpoint of one process, sharded onto two ranks at its step 3."""
    run = tmp_path / "run"
    shutil.copytree(runs["one"], run)
    shutil.rmtree(complete_checkpoints(run)[-1])
    args = tiny_train_args(corpus_dir, run, steps=STEPS, extra=[*COMMON, "training.strategy=fsdp", "training.batch_size=2"])
    out = train_two(args, tmp_path, runs["cache"])
    assert "resuming from step_00000003" in out.stdout
    a, b = losses(runs["one"]), losses(run)
    assert max(abs(a[s] - b[s]) for s in range(4, STEPS + 1)) < TOL, (a, b)
    ref = load_file(str(complete_checkpoints(runs["one"])[-1] / "model.safetensors"))
    assert max_diff(ref, dcp_tensors(complete_checkpoints(run)[-1])) < TOL


def test_asynchronous_checkpoints_equal_synchronous_ones(corpus_dir, tmp_path):
    """One process under fsdp writes DCP checkpoints too: in the background or not, the same tensors,
    including the checkpoint that training kept running over while it was written."""
    cache = tmp_path / "cache"
    ends = {}
    for mode in ("true", "false"):
        run = tmp_path / f"async_{mode}"
        extra = [*COMMON, "training.strategy=fsdp", f"training.async_checkpoint={mode}"]
        train_one(tiny_train_args(corpus_dir, run, steps=STEPS, extra=extra), tmp_path, cache)
        ends[mode] = complete_checkpoints(run)
    assert [c.name for c in ends["true"]] == [c.name for c in ends["false"]] == ["step_00000003", "step_00000006"]
    for x, y in zip(ends["true"], ends["false"]):  # step 3 too: training went on while it was written
        a, b = dcp_tensors(x), dcp_tensors(y)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), x.name
    sa = torch.load(ends["true"][-1] / "trainer_state.pt", weights_only=True)
    sb = torch.load(ends["false"][-1] / "trainer_state.pt", weights_only=True)
    assert sa["loader"] == sb["loader"] and sa["trainer"]["loop"]["step"] == sb["trainer"]["loop"]["step"] == STEPS


@pytest.mark.slow
def test_lora_under_fsdp_equals_one_process(corpus_dir, tmp_path):
    """Frozen base and trainable adapters in the same units: two ranks train the adapters like one process."""
    cache = tmp_path / "cache"
    lora = ["lora.enabled=true", "lora.r=4"]
    one, two = tmp_path / "one", tmp_path / "two"
    train_one(tiny_train_args(corpus_dir, one, steps=4, extra=[*COMMON, *lora]), tmp_path, cache)
    extra = [*COMMON, *lora, "training.strategy=fsdp", "training.batch_size=2"]
    train_two(tiny_train_args(corpus_dir, two, steps=4, extra=extra), tmp_path, cache)
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and max(abs(a[s] - b[s]) for s in a) < TOL, (a, b)
    ref = load_file(str(complete_checkpoints(one)[-1] / "adapter_model.safetensors"))
    got = {k.replace(".default", ""): v for k, v in dcp_tensors(complete_checkpoints(two)[-1]).items() if "lora_" in k}
    assert len(ref) == len(got) > 0
    assert max_diff(ref, got) < TOL


def test_units_are_the_native_blocks_or_the_hf_decoder_layers():
    import transformers

    from codex_ml.models.gpt import GPT, GPTConfig
    from codex_ml.training.fsdp import sharding_units

    gpt = GPT(GPTConfig(vocab_size=64, n_layer=3, n_head=2, n_kv_head=1, d_model=16, d_ff=32, max_seq_len=16))
    assert sharding_units(gpt) == list(gpt.layers)
    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
    )
    hf = transformers.Qwen2ForCausalLM(config)
    assert sharding_units(hf) == list(hf.model.layers)


def test_precision_policy_reduces_in_fp32():
    from codex_ml.training.fsdp import mixed_precision_policy

    bf16 = mixed_precision_policy("bf16")
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    fp32 = mixed_precision_policy("fp32")
    assert fp32.param_dtype is None and fp32.reduce_dtype is None  # the parameters' own dtype: fp32


def test_meta_init_equals_the_host_init_bit_for_bit():
    """Materialised from the meta device, the model and the random stream after it equal building it on the host."""
    from codex_ml.models.gpt import GPT, GPTConfig
    from codex_ml.training.fsdp import materialize_native

    config = GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, d_model=16, d_ff=32, max_seq_len=16)
    torch.manual_seed(7)
    host, after_host = GPT(config), torch.rand(4)
    torch.manual_seed(7)
    with torch.device("meta"):
        meta = GPT(config)
    materialize_native(meta, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(host.state_dict().values(), meta.state_dict().values()))
    assert torch.equal(host.rope_cos, meta.rope_cos) and torch.equal(torch.rand(4), after_host)


@pytest.mark.parametrize(
    "overrides, key",
    [({"strategy": "zero"}, "training.strategy"), ({"async_checkpoint": True}, "training.async_checkpoint")],
)
def test_strategy_settings_are_validated(overrides, key):
    from codex_ml.conf.schema import ConfigError, TrainingConfig, validate_training

    with pytest.raises(ConfigError, match=key):
        validate_training(TrainingConfig(**overrides))


@pytest.mark.slow
def test_a_hugging_face_module_shards_per_decoder_layer_and_equals_one_process(corpus_dir, tmp_path):
    from helpers import data_args, save_tiny_hf_models

    hf = save_tiny_hf_models(tmp_path / "models", ["qwen2"], corpus_dir, max_positions=64, dropout=False) / "qwen2"
    cache = tmp_path / "cache"
    common = ["model=hf", f"model.path={hf}", *data_args(corpus_dir), "training.max_steps=3", "training.eval_batches=1"]
    common += ["training.warmup_steps=1", "training.lr=0.01", "tracking.mlflow=false", *COMMON]
    one, two = tmp_path / "one", tmp_path / "two"
    train_one([*common, "training.batch_size=4", f"run.dir={one}"], tmp_path, cache)
    train_two([*common, "training.batch_size=2", "training.strategy=fsdp", f"run.dir={two}"], tmp_path, cache)
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3] and max(abs(a[s] - b[s]) for s in a) < TOL, (a, b)
    ref = load_file(str(complete_checkpoints(one)[-1] / "model.safetensors"))
    assert max_diff(ref, dcp_tensors(complete_checkpoints(two)[-1])) < TOL
