"""Fine-tuning end to end: local HF models, both engines, export, LoRA and merge, SFT, FIM, bad input."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import TINY_MODEL, data_args, run_cli, save_tiny_hf_models, tiny_train_args

FAST = [
    "training.batch_size=4",
    "training.log_every=1",
    "training.checkpoint_every=3",
    "training.eval_batches=2",
    "training.warmup_steps=2",
    "training.sample_tokens=0",
    "tracking.mlflow=false",
]


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.ndjson").read_text().splitlines()]
    return [r["train_loss"] for r in rows if r.get("event") == "train"]


@pytest.fixture(scope="module")
def hf_models(corpus_dir, tmp_path_factory):
    """Small Llama, Qwen2 and GPT-2 models built from config and saved with a tokenizer of ours."""
    return save_tiny_hf_models(tmp_path_factory.mktemp("hf"), ["llama", "qwen2", "gpt2"], corpus_dir)


@pytest.fixture(scope="module")
def other_families(hf_models):
    """GPT-NeoX (fused query_key_value, a PEFT default) and Phi-3 (fused qkv_proj/gate_up_proj, no PEFT default)."""
    return save_tiny_hf_models(hf_models, ["gpt_neox", "phi3"])


@pytest.mark.parametrize("arch,engine", [("llama", "native"), ("qwen2", "native"), ("gpt2", "hf"), ("llama", "hf")])
def test_local_hf_models_fine_tune(hf_models, corpus_dir, tmp_path, arch, engine):
    run = tmp_path / "run"
    out = run_cli(
        "train",
        "model=hf",
        f"model.path={hf_models / arch}",
        f"training.engine={engine}",
        "training.max_steps=4",
        *data_args(corpus_dir),
        f"run.dir={run}",
        *FAST,
    )
    assert "val_loss" in (run / "metrics.ndjson").read_text()
    assert (run / "checkpoints" / "step_00000004" / "COMPLETE").exists()
    if arch == "llama" and engine == "native":
        assert "loaded into the native decoder, exactly" in out.stdout
    source = json.loads((run / "checkpoints" / "step_00000004" / "model_source.json").read_text())
    assert source["kind"] == ("hf-native" if (arch, engine) == ("llama", "native") else "hf")


def test_both_engines_give_the_same_loss_curve(corpus_dir, tmp_path):
    """Same model, batches (our loader), optimizer and schedule objects: agreement within 1e-4 relative."""
    curves = []
    for engine in ("native", "hf"):
        run = tmp_path / engine
        run_cli(
            "train",
            *tiny_train_args(
                corpus_dir,
                run,
                steps=6,
                extra=[
                    f"training.engine={engine}",
                    "training.log_every=1",
                    "training.grad_accum=2",
                    "training.deterministic=true",
                ],
            ),
        )
        curves.append(losses(run))
    assert len(curves[0]) == 6
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)


def test_export_loads_in_transformers_with_equal_logits(corpus_dir, tmp_path):
    run = tmp_path / "run"
    run_cli("train", *tiny_train_args(corpus_dir, run, steps=4))
    out = tmp_path / "hf"
    run_cli("export", f"run_dir={run}", f"out={out}")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (out / "generation_config.json").exists() and (out / "tokenizer.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    from codex_ml.recipes.checkpoints import load_run_model

    native, _, _ = load_run_model(run, None, torch.device("cpu"))
    x = torch.randint(0, len(tok), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (native(x) - hf(x).logits).abs().max() < 1e-5


@pytest.fixture(scope="module")
def exported(corpus_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    run_cli("train", *tiny_train_args(corpus_dir, root / "run", steps=4))
    run_cli("export", f"run_dir={root / 'run'}", f"out={root / 'hf'}")
    return root / "hf"


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 6e-2)])
def test_lora_adapter_loads_in_peft_and_merge_matches(exported, corpus_dir, tmp_path, dtype, tol):
    from peft import PeftModel

    run = tmp_path / "lora"
    out = run_cli(
        "train",
        "model=hf",
        f"model.path={exported}",
        "lora.enabled=true",
        "lora.r=4",
        "lora.alpha=8",
        "training.lr=0.01",
        "training.max_steps=6",
        *data_args(corpus_dir),
        f"run.dir={run}",
        *FAST,
    )
    assert "trainable" in out.stdout
    assert "lora: adapting q_proj, v_proj (4 layers; PEFT's default for llama)" in out.stdout  # in the native decoder
    counts = [json.loads(line) for line in (run / "metrics.ndjson").read_text().splitlines()][0]
    assert 0 < counts["trainable_parameters"] < counts["parameters"] / 5
    adapter = run / "checkpoints" / "step_00000006"
    assert (adapter / "adapter_config.json").exists() and not (adapter / "model.safetensors").exists()
    merged_dir = tmp_path / "merged"
    run_cli("merge", f"run_dir={run}", f"out={merged_dir}", f"dtype={dtype}")
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    base = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch_dtype)
    adapted = PeftModel.from_pretrained(base, str(adapter)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch_dtype).eval()
    x = torch.randint(0, merged.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, m = adapted(x).logits.float(), merged(x).logits.float()
        plain = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch_dtype)(x).logits.float()
    assert (a - m).abs().max() < tol
    assert (plain - m).abs().max() > tol  # the adapter changed something


def test_lora_grad_accumulation_matches_the_large_batch(exported, corpus_dir, tmp_path):
    common = [
        "model=hf",
        f"model.path={exported}",
        "lora.enabled=true",
        "training.max_steps=3",
        "training.deterministic=true",
        *data_args(corpus_dir),
        *FAST,
    ]
    run_cli("train", *common, f"run.dir={tmp_path / 'big'}", "training.batch_size=8")
    run_cli("train", *common, f"run.dir={tmp_path / 'acc'}", "training.batch_size=4", "training.grad_accum=2")
    assert losses(tmp_path / "big") == pytest.approx(losses(tmp_path / "acc"), rel=1e-5)


# the layers each architecture's default adapts (models/lora.py: PEFT's per-architecture list, else all-linear);
# llama's (q_proj, v_proj) is checked by test_lora_adapter_loads_in_peft_and_merge_matches
DEFAULT_TARGETS = {
    "native": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "phi3": ["o_proj", "qkv_proj", "gate_up_proj", "down_proj"],
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(DEFAULT_TARGETS))
def test_lora_default_targets_train_merge_and_reload(other_families, corpus_dir, tmp_path, arch):
    """No lora.target_modules: the architecture's default; `codex-ml merge` equals the adapted model."""
    from peft import PeftModel

    from codex_ml.recipes.checkpoints import load_native_checkpoint
    from codex_ml.recipes.models import BASE_WEIGHTS

    run, merged_dir = tmp_path / "lora", tmp_path / "merged"
    model = [*TINY_MODEL] if arch == "native" else ["model=hf", f"model.path={other_families / arch}"]
    out = run_cli(
        "train",
        *model,
        "lora.enabled=true",
        "lora.r=4",
        "lora.alpha=8",
        "training.lr=0.01",
        "training.max_steps=2",
        *data_args(corpus_dir),
        f"run.dir={run}",
        *FAST,
    )
    line = next(s for s in out.stdout.splitlines() if s.startswith("lora: adapting"))
    assert line.startswith(f"lora: adapting {', '.join(DEFAULT_TARGETS[arch])} ({2 * len(DEFAULT_TARGETS[arch])} layers;")
    adapter = run / "checkpoints" / "step_00000002"
    assert (adapter / "adapter_config.json").exists()
    run_cli("merge", f"run_dir={run}", f"out={merged_dir}")
    if arch == "native":
        base = lambda: load_native_checkpoint(adapter, torch.device("cpu"), weights_name=BASE_WEIGHTS)
        logits = lambda m, x: m(x)
    else:
        base = lambda: AutoModelForCausalLM.from_pretrained(str(other_families / arch), dtype=torch.float32)
        logits = lambda m, x: m(x).logits
    adapted = PeftModel.from_pretrained(base(), str(adapter)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    x = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m = merged(x).logits
        assert (logits(adapted, x) - m).abs().max() < 1e-4
        assert (logits(base().eval(), x) - m).abs().max() > 1e-4  # the adapter trained


@pytest.mark.parametrize("damage", ["missing", "unexpected"])
def test_a_lora_base_that_does_not_fit_is_refused(tmp_path, damage):
    """A native LoRA checkpoint's frozen base must hold every weight (bar the tied head) and nothing else."""
    from safetensors.torch import load, save

    from codex_ml.models.gpt import CONFIG_NAME, GPT, WEIGHTS_NAME, GPTConfig
    from codex_ml.models.lora import adapter_files, apply_lora, resolve_target_modules
    from codex_ml.recipes.checkpoints import load_checkpoint_model
    from codex_ml.recipes.models import BASE_WEIGHTS, SOURCE_FILE, native_weight_files
    from codex_ml.training.checkpoint import CheckpointError, save_checkpoint

    model = GPT(
        GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, d_model=32, d_ff=64, max_seq_len=32, tie_embeddings=True)
    )
    weights = native_weight_files(model)
    lora = apply_lora(model, 2, 4, 0.0, resolve_target_modules(model, [], None).names, causal_lm=False)
    source = json.dumps({"kind": "native", "path": None, "lora": True, "adapter_hf_names": False}).encode()

    def checkpoint(step, base):
        files = {
            **adapter_files(lora, hf_names=False, base_path=None),
            BASE_WEIGHTS: save(base),
            CONFIG_NAME: weights[CONFIG_NAME],
            SOURCE_FILE: source,
        }
        return save_checkpoint(tmp_path / "checkpoints", step, files)

    base = load(weights[WEIGHTS_NAME])
    assert "lm_head.weight" not in base  # tied: stored once, and that is allowed
    load_checkpoint_model(tmp_path, checkpoint(1, base), torch.device("cpu"))
    if damage == "missing":
        del base["layers.1.mlp.down_proj.weight"]
    else:
        base["layers.1.mlp.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=rf"{damage} \['layers\.1\.mlp\.(down_proj|extra)\.weight'\]"):
        load_checkpoint_model(tmp_path, checkpoint(2, base), torch.device("cpu"))


def test_sft_with_packing_on_the_native_decoder(exported, tmp_path):
    data = tmp_path / "sft.jsonl"
    rows = []
    for i in range(40):
        rows.append({"prompt": f"def add_{i}(a, b):\n", "completion": "    return a + b\n"})
        rows.append({"messages": [{"role": "user", "content": f"print {i}"}, {"role": "assistant", "content": f"print({i})"}]})
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = tmp_path / "sft"
    out = run_cli(
        "train",
        "model=hf",
        f"model.path={exported}",
        "data.source=sft",
        f"data.paths=[{data}]",
        "data.seq_len=64",
        "training.max_steps=4",
        f"run.dir={run}",
        *FAST,
    )
    assert "packed" in out.stdout and "val_loss" in (run / "metrics.ndjson").read_text()


def test_fim_training_and_infilling(corpus_dir, tmp_path):
    run = tmp_path / "fim"
    run_cli("train", *tiny_train_args(corpus_dir, run, steps=4, extra=["data.fim_rate=0.5", "data.fim_mode=mixed"]))
    out = run_cli(
        "generate", f"run_dir={run}", "prompt=def f(x):\n    ", "suffix=\n    return y\n", "max_new_tokens=8", "temperature=0"
    )
    assert out.stdout.startswith("def f(x):\n    ") and out.stdout.rstrip("\n").endswith("return y")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["model=hf", "model.path=/no/such/model"], "/no/such/model"),
        (["model=tiny", "lora.enabled=true", "lora.target_modules=[no_such_proj]"], "no_such_proj"),
        (
            ["model=hf", "model.path=HF", "lora.enabled=true", "lora.target_modules=[c_attn,v_proj]"],
            "c_attn match no linear layer",
        ),
        (["data.source=sft", "data.paths=[SFT]", "model=hf", "model.path=HF"], "sft.jsonl:2"),
    ],
)
def test_bad_fine_tuning_input_is_refused_before_training(exported, corpus_dir, tmp_path, args, needle):
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "only"}) + "\n")
    args = [a.replace("SFT", str(sft)).replace("=HF", f"={exported}") for a in args]
    extra = [] if any(a.startswith("data.") for a in args) else data_args(corpus_dir)
    out = run_cli(
        "train",
        *args,
        *extra,
        *TINY_MODEL[1:] if "model=tiny" in args else [],
        f"run.dir={tmp_path / 'r'}",
        "training.max_steps=2",
        "tracking.mlflow=false",
        check=False,
    )
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr
    assert not list(tmp_path.rglob("*.safetensors"))


def test_a_model_dir_without_weights_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text('{"model_type": "llama"}')
    out = run_cli("train", "model=hf", f"model.path={tmp_path / 'half'}", check=False)
    assert out.returncode == 2 and "no weights" in out.stderr


@pytest.mark.slow
def test_sft_grad_accumulation_with_unequal_targets_matches_the_large_batch(exported, tmp_path):
    """Micro-batches of SFT rows hold different numbers of target tokens: accumulation must weight each
    token alike (sum over all micro-batches / all their targets), not average the micro-batches' means."""
    import numpy as np
    import yaml
    from safetensors.torch import load_file

    from codex_ml.data.rows import RowBatches, Rows

    data = tmp_path / "sft.jsonl"
    # completions from one line to several: rows (one example each) with very different target counts
    records = [
        {"prompt": f"def f_{i}(x):\n", "completion": "    x = x + 1\n" * (1 + i % 5) + "    return x\n"} for i in range(48)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = [
        "model=hf",
        f"model.path={exported}",
        "data.source=sft",
        f"data.paths=[{data}]",
        "data.seq_len=64",
        "data.pack=false",
        "training.max_steps=3",
        "training.deterministic=true",
        "training.lr=0.01",
        *FAST,
    ]
    big, acc = tmp_path / "big", tmp_path / "acc"
    run_cli("train", *common, f"run.dir={big}", "training.batch_size=8")
    run_cli("train", *common, f"run.dir={acc}", "training.batch_size=4", "training.grad_accum=2")

    # the premise: the accumulated run's two micro-batches of a step differ in target tokens
    rows_dir = json.loads((acc / "env.json").read_text())["dataset"]["path"]
    rows = Rows(*(np.load(f"{rows_dir}/train_{n}.npy") for n in ("input_ids", "labels", "position_ids", "segments")))
    seed = yaml.safe_load((acc / "config.yaml").read_text())["training"]["seed"]
    micro = RowBatches(rows, 4, seed, native=True)
    targets = [int((next(micro)["labels"] != -100).sum()) for _ in range(6)]
    assert any(targets[2 * s] != targets[2 * s + 1] for s in range(3)), targets

    assert losses(big) == pytest.approx(losses(acc), rel=1e-5) and len(losses(big)) == 3
    final = lambda run: load_file(str(run / "checkpoints" / "step_00000003" / "model.safetensors"))
    a, b = final(big), final(acc)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
