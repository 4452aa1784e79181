"""DPO: TRL's losses and figures on the same batch, ln 2 at the start, the references, gradient accumulation,
exact resume, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from alignment.preference_helpers import crash_after, events, final_weights, pair_rows, run_config, write_jsonl
from codex_ml.data.preferences import PairEncoder, PreferenceRecordError, check_record, pair_batch, read_preferences
from codex_ml.models.loss import dpo_loss, sequence_logps
from codex_ml.recipes.dpo import REF_LOGPS_FILE, DPOTask
from codex_ml.recipes.train import train
from helpers import run_cli, save_tiny_hf_models

TRL_METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]


@pytest.fixture(scope="module")
def models(corpus_dir, tmp_path_factory):
    return save_tiny_hf_models(tmp_path_factory.mktemp("dpo_models"), ["llama"], corpus_dir, dropout=False)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("dpo_pairs") / "prefs.jsonl", pair_rows(24))


# ---------------------------------------------------------------- golden values: TRL's DPOTrainer on the same batch


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_figures_equal_trl(models, tmp_path, loss_type):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(str(models / "llama"))
    policy = AutoModelForCausalLM.from_pretrained(str(models / "llama"), dtype=torch.float32)
    reference = copy.deepcopy(policy)
    torch.manual_seed(1)
    with torch.no_grad():  # a reference apart from the policy: the loss is not ln 2, the margins not 0
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = pair_rows(4)
    beta = 0.1
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], report_to=[], use_cpu=True, max_length=None
    )
    trainer = DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok
    )
    tokenized = [trainer.train_dataset[i] for i in range(len(rows))]
    policy.train()
    trl_loss = trainer.compute_loss(policy, trainer.data_collator(tokenized)).item()
    trl = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # ours: our tokenization (which must be TRL's), our batch, our loss, on the same two models
    encoder = PairEncoder(models / "llama")
    pairs = [encoder.encode(check_record(f"prefs.jsonl:{i + 1}", r)) for i, r in enumerate(rows)]
    for pair, theirs in zip(pairs, tokenized):
        assert pair.prompt_ids == theirs["prompt_ids"]
        assert pair.chosen_ids == theirs["chosen_ids"] and pair.rejected_ids == theirs["rejected_ids"]
    batch = pair_batch(pairs, torch.arange(len(pairs)).numpy(), tok.pad_token_id)
    with torch.no_grad():
        logps, tokens = sequence_logps(policy(input_ids=batch["input_ids"]).logits, batch["labels"])
        ref_logps, _ = sequence_logps(reference(input_ids=batch["input_ids"]).logits, batch["labels"])
    (c, r), (rc, rr), (nc, nr) = logps.chunk(2), ref_logps.chunk(2), tokens.chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(c, r, rc, rr, beta, loss_type, nc, nr)

    assert losses.mean().item() == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    assert (chosen_rewards - rejected_rewards).mean().item() == pytest.approx(trl["rewards/margins"], rel=1e-4, abs=1e-6)
    assert chosen_rewards.mean().item() == pytest.approx(trl["rewards/chosen"], rel=1e-4, abs=1e-6)
    assert rejected_rewards.mean().item() == pytest.approx(trl["rewards/rejected"], rel=1e-4, abs=1e-6)
    assert c.mean().item() == pytest.approx(trl["logps/chosen"], rel=1e-5)
    assert r.mean().item() == pytest.approx(trl["logps/rejected"], rel=1e-5)
    assert abs(trl_loss - math.log(2)) > 1e-3  # the comparison is not the trivial one


def test_sigmoid_loss_by_hand():
    pc, pr, rc, rr = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-3.5]), torch.tensor([-4.0])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    z = 0.5 * ((-3.0 + 3.5) - (-5.0 + 4.0))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-z)))
    assert chosen.item() == pytest.approx(0.25) and rejected.item() == pytest.approx(-0.5)
    same, _, _ = dpo_loss(pc, pr, pc, pr, beta=0.1)
    assert same.item() == pytest.approx(math.log(2))


# ---------------------------------------------------------------- the command on the one loop


def test_starts_at_ln2_logs_trl_figures_and_learns(models, prefs, tmp_path):
    run_dir = tmp_path / "d"
    cfg = run_config("dpo", models / "llama", prefs, run_dir, max_steps=6, lr=3e-3)
    train(cfg, task=DPOTask(cfg.dpo))
    ev = events(run_dir)
    assert ev[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference before its first step
    assert ev[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    for name in TRL_METRICS:
        assert all(math.isfinite(e[name]) for e in ev), name
    assert ev[-1]["rewards/margins"] > ev[0]["rewards/margins"]
    assert ev[-1]["train_loss"] < math.log(2)
    final = events(run_dir, "eval")[-1]
    assert {"val_loss", "val_rewards/accuracies", "val_rewards/margins"} <= set(final)


def test_gradient_accumulation_leaves_the_run_unchanged(models, prefs, tmp_path):
    whole = run_config("dpo", models / "llama", prefs, tmp_path / "whole", batch_size=4, grad_accum=1)
    split = run_config("dpo", models / "llama", prefs, tmp_path / "split", batch_size=2, grad_accum=2)
    for cfg in (whole, split):
        train(cfg, task=DPOTask(cfg.dpo))
    a, b = events(tmp_path / "whole"), events(tmp_path / "split")
    assert [e["train_loss"] for e in a] == pytest.approx([e["train_loss"] for e in b], abs=1e-6)
    assert [e["rewards/margins"] for e in a] == pytest.approx([e["rewards/margins"] for e in b], abs=1e-6)
    wa, wb = final_weights(tmp_path / "whole"), final_weights(tmp_path / "split")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)  # Adam rescales rounding-size gradients


def test_resume_after_a_crash_is_bit_identical(models, prefs, tmp_path):
    cfg = run_config("dpo", models / "llama", prefs, tmp_path / "full", max_steps=6)
    train(cfg, task=DPOTask(cfg.dpo))
    cut = run_config("dpo", models / "llama", prefs, tmp_path / "cut", max_steps=6)
    train(cut, task=DPOTask(cut.dpo))
    crash_after(tmp_path / "cut", 2)  # killed right after its step-2 checkpoint
    train(cut, task=DPOTask(cut.dpo))
    full, resumed = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert [e["train_loss"] for e in events(tmp_path / "full")] == [e["train_loss"] for e in events(tmp_path / "cut")]


def test_precomputed_reference_equals_the_live_one(models, prefs, tmp_path):
    live = run_config("dpo", models / "llama", prefs, tmp_path / "live")
    pre = run_config("dpo", models / "llama", prefs, tmp_path / "pre", dpo__precompute_ref_logps=True)
    for cfg in (live, pre):
        train(cfg, task=DPOTask(cfg.dpo))
    assert (tmp_path / "pre" / REF_LOGPS_FILE).exists()
    a, b = events(tmp_path / "live"), events(tmp_path / "pre")
    assert b[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert [e["train_loss"] for e in a] == pytest.approx([e["train_loss"] for e in b], abs=1e-5)


def test_lora_reference_is_the_base_with_adapters_off_not_a_copy(models, prefs, tmp_path, monkeypatch):
    import codex_ml.recipes.dpo as dpo

    deepcopy = copy.deepcopy

    def no_copy(obj, *args, **kwargs):
        if isinstance(obj, torch.nn.Module):
            raise AssertionError(f"DPO with LoRA copied the model ({type(obj).__name__})")
        return deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(dpo.copy, "deepcopy", no_copy)
    cfg = run_config("dpo", models / "llama", prefs, tmp_path / "lora", lora__enabled=True, lr=1e-2)
    train(cfg, task=DPOTask(cfg.dpo))
    ev = events(tmp_path / "lora")
    assert ev[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA starts as the identity: policy == base
    assert ev[-1]["rewards/margins"] != 0.0  # the adapters moved the policy away from the base


def test_reference_path_is_another_model(models, prefs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other"
    model = AutoModelForCausalLM.from_pretrained(str(models / "llama"))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(other))
    AutoTokenizer.from_pretrained(str(models / "llama")).save_pretrained(str(other))
    cfg = run_config("dpo", models / "llama", prefs, tmp_path / "ref", dpo__reference_path=str(other), max_steps=1)
    train(cfg, task=DPOTask(cfg.dpo))
    assert abs(events(tmp_path / "ref")[0]["train_loss"] - math.log(2)) > 1e-3  # policy and reference differ


# ---------------------------------------------------------------- bad and hostile input


def test_a_record_without_rejected_is_named_by_file_and_line(tmp_path):
    rows = pair_rows(6)
    del rows[3]["rejected"]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PreferenceRecordError, match=r"bad\.jsonl:4: .*missing: rejected"):
        read_preferences([str(bad)])
    write_jsonl(bad, [{"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}])
    with pytest.raises(PreferenceRecordError, match=r"bad\.jsonl:1: .*both be text"):
        read_preferences([str(bad)])


def test_cli_refuses_a_negative_beta_and_a_bad_record_before_any_work(models, prefs, tmp_path):
    base = ["model=hf", f"model.path={models / 'llama'}", "tracking.mlflow=false", "training.max_steps=1"]
    proc = run_cli("dpo", *base, f"data.paths=[{prefs}]", "dpo.beta=-0.1", f"run.dir={tmp_path / 'b'}", check=False)
    assert proc.returncode == 2 and "dpo.beta" in proc.stderr and "Traceback" not in proc.stderr
    rows = pair_rows(6)
    del rows[4]["chosen"]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    proc = run_cli("dpo", *base, f"data.paths=[{bad}]", f"run.dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 2 and "bad.jsonl:5" in proc.stderr and "chosen" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()  # refused before the run folder was written


def test_special_token_text_in_a_completion_is_text(models):
    encoder = PairEncoder(models / "llama")
    pair = encoder.encode(check_record("x:1", {"prompt": "a = ", "chosen": "1<|endoftext|>2", "rejected": "3"}))
    assert pair.chosen_ids.count(encoder.eos_id) == 1 and pair.chosen_ids[-1] == encoder.eos_id  # only the real end


def test_chat_messages_and_the_implicit_prompt(models):
    encoder = PairEncoder(models / "llama")
    user = [{"role": "user", "content": "add one to x"}]
    good, bad = [{"role": "assistant", "content": "x + 1"}], [{"role": "assistant", "content": "x - 1"}]
    explicit = encoder.encode(check_record("x:1", {"prompt": user, "chosen": good, "rejected": bad}))
    implicit = encoder.encode(check_record("x:2", {"chosen": user + good, "rejected": user + bad}))
    assert (explicit.prompt_ids, explicit.chosen_ids, explicit.rejected_ids) == (
        implicit.prompt_ids,
        implicit.chosen_ids,
        implicit.rejected_ids,
    )
    assert explicit.chosen_ids != explicit.rejected_ids and len(explicit.prompt_ids) > 0
