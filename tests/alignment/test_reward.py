"""The reward model: the Bradley-Terry loss by hand, training on the one loop, exact resume, its export as an HF classifier."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignment.preference_helpers import crash_after, events, final_weights, pair_rows, run_config, write_jsonl
from codex_ml.conf.schema import ExportConfig
from codex_ml.models.loss import pairwise_reward_loss
from codex_ml.models.reward import RewardHead
from codex_ml.recipes.export import export_command
from codex_ml.recipes.reward import SCORES_FILE, RewardTask
from codex_ml.recipes.train import train
from helpers import run_cli, save_tiny_hf_models


@pytest.fixture(scope="module")
def models(corpus_dir, tmp_path_factory):
    return save_tiny_hf_models(tmp_path_factory.mktemp("reward_models"), ["llama", "qwen2"], corpus_dir, dropout=False)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("reward_pairs") / "prefs.jsonl", pair_rows(24))


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([1.5, -0.25]), torch.tensor([0.5, 0.75])
    plain = pairwise_reward_loss(chosen, rejected)
    assert plain.tolist() == pytest.approx([math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(1.0))])
    shaped = pairwise_reward_loss(chosen, rejected, margin=0.5, center_coefficient=0.01)
    by_hand = [math.log(1 + math.exp(-(c - r - 0.5))) + 0.01 * (c + r) ** 2 for c, r in ((1.5, 0.5), (-0.25, 0.75))]
    assert shaped.tolist() == pytest.approx(by_hand)


def test_head_pools_the_last_real_token():
    head = RewardHead(4)
    hidden = torch.randn(2, 5, 4)
    scores = head(hidden, torch.tensor([3, 5]))
    expected = torch.stack([hidden[0, 2] @ head.score.weight[0], hidden[1, 4] @ head.score.weight[0]])
    torch.testing.assert_close(scores, expected)


@pytest.mark.parametrize("arch,conversion,lora", [("llama", True, False), ("qwen2", False, False), ("llama", True, True)])
def test_trains_and_exports_a_classifier_with_the_same_scores(models, prefs, tmp_path, arch, conversion, lora):
    """Native decoder (a Llama converted exactly), a Hugging Face module, LoRA (merged on export): the export
    scores as training did."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir = tmp_path / "r"
    cfg = run_config(
        "reward", models / arch, prefs, run_dir, max_steps=8, lr=3e-3, model__native_conversion=conversion, lora__enabled=lora
    )
    train(cfg, task=RewardTask(cfg.reward))
    ev, final = events(run_dir), events(run_dir, "eval")[-1]
    assert ev[-1]["train_loss"] < ev[0]["train_loss"]
    assert 0.0 <= final["val_accuracy"] <= 1.0 and final["val_pairs"] > 0 and math.isfinite(final["val_loss"])
    assert {"rewards/accuracies", "rewards/margins"} <= set(ev[0])

    out = tmp_path / "rm"
    export_command(ExportConfig(run_dir=str(run_dir), out=str(out)))
    tok = AutoTokenizer.from_pretrained(str(out))
    classifier = AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32).eval()
    assert classifier.config.num_labels == 1 and classifier.config.pad_token_id == tok.pad_token_id
    scored = [json.loads(line) for line in (run_dir / SCORES_FILE).read_text().splitlines()]
    assert len(scored) == final["val_pairs"]
    for row in scored:
        for side in ("chosen", "rejected"):
            ids = tok(row["prompt"] + row[side], return_tensors="pt")["input_ids"]
            ids = torch.cat([ids, torch.tensor([[tok.eos_token_id]])], 1)  # the end-of-text every sequence trains with
            with torch.no_grad():
                score = classifier(input_ids=ids).logits[0, 0].item()
            assert score == pytest.approx(row[f"score_{side}"], abs=1e-5)
    # a padded batch pools at each row's last real token, as training does
    texts = [scored[0]["prompt"] + scored[0]["chosen"], "x"]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        padded = classifier(**batch).logits[:, 0]
        alone = classifier(**tok(texts[1:], return_tensors="pt")).logits[0, 0]
    assert padded[1].item() == pytest.approx(alone.item(), abs=1e-5)


def test_gradient_accumulation_and_resume(models, prefs, tmp_path):
    """grad_accum=2 with half batches trains the same model; a run killed after a checkpoint resumes bit-identically."""
    whole = run_config("reward", models / "llama", prefs, tmp_path / "whole", max_steps=4)
    split = run_config("reward", models / "llama", prefs, tmp_path / "split", max_steps=4, batch_size=2, grad_accum=2)
    for cfg in (whole, split):
        train(cfg, task=RewardTask(cfg.reward))
    assert [e["train_loss"] for e in events(tmp_path / "whole")] == pytest.approx(
        [e["train_loss"] for e in events(tmp_path / "split")], abs=1e-6
    )
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "split")
    assert any(k.startswith("reward_head") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)  # Adam rescales rounding-size gradients

    crash_after(tmp_path / "whole", 2)
    train(whole, task=RewardTask(whole.reward))
    resumed = final_weights(tmp_path / "whole")
    assert all(torch.equal(a[k], resumed[k]) for k in a)  # the head is restored with the decoder


def test_cli_refuses_a_missing_chosen_and_a_negative_margin(models, prefs, tmp_path):
    base = ["model=hf", f"model.path={models / 'llama'}", "tracking.mlflow=false", "training.max_steps=1"]
    proc = run_cli("reward", *base, f"data.paths=[{prefs}]", "reward.margin=-1", f"run.dir={tmp_path / 'm'}", check=False)
    assert proc.returncode == 2 and "reward.margin" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("reward", *base, f"run.dir={tmp_path / 'p'}", check=False)
    assert proc.returncode == 2 and "data.paths" in proc.stderr
    rows = pair_rows(4)
    rows[2]["chosen"] = None
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    proc = run_cli("reward", *base, f"data.paths=[{bad}]", f"run.dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 2 and "bad.jsonl:3" in proc.stderr and "chosen" in proc.stderr
    assert not (tmp_path / "r").exists()
