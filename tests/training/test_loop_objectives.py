"""The one loop trains any objective: the loss of a step is its summed loss over the step's units (``measure``),
however the step is split into micro-batches, and an objective's own figures (``step_metrics``) are logged as
sum / count in the step's ``train`` event."""

from __future__ import annotations

import torch

from codex_ml.training.loop import LoopSettings, Trainer, token_measure


class PairObjective(torch.nn.Module):
    """A toy pairwise objective: one unit per pair, summed; keeps the margin of each pair for step_metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.score = torch.nn.Linear(3, 1, bias=False)
        torch.nn.init.constant_(self.score.weight, 0.1)
        self.margins = torch.zeros(2, dtype=torch.float64)  # (sum, count) over the step so far

    def forward(self, batch: dict) -> torch.Tensor:
        margin = (self.score(batch["chosen"]) - self.score(batch["rejected"]))[:, 0]
        self.margins += torch.stack([margin.detach().double().sum(), torch.tensor(float(len(margin)))])
        return -torch.nn.functional.logsigmoid(margin).sum()

    def step_metrics(self) -> dict[str, torch.Tensor]:
        out, self.margins = {"rewards/margins": self.margins}, torch.zeros(2, dtype=torch.float64)
        return out


def pairs(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"chosen": torch.randn(n, 3, generator=g), "rejected": torch.randn(n, 3, generator=g), "tokens": 5 * n}


def run(batches: list[dict], grad_accum: int) -> tuple[list[dict], torch.Tensor]:
    model = PairObjective()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    events: list[dict] = []
    settings = LoopSettings(max_steps=len(batches) // grad_accum, grad_accum=grad_accum, grad_clip=0, log_every=1)
    trainer = Trainer(
        model,
        model,
        optimizer,
        scheduler,
        iter(batches),
        settings,
        torch.device("cpu"),
        evaluate=lambda whole_split=False: {},
        save=lambda state: None,
        emit=events.append,
        measure=lambda b: (torch.tensor(len(b["chosen"])), torch.tensor(b["tokens"])),
        step_metrics=model.step_metrics,
    )
    trainer.run()
    return [e for e in events if e["event"] == "train"], model.score.weight.detach().clone()


def test_the_loss_is_the_mean_over_units_and_metrics_are_logged_as_means():
    batch = pairs(4, seed=0)
    (event,), _ = run([batch], grad_accum=1)
    w = torch.full((1, 3), 0.1)
    margin = (batch["chosen"] @ w.T - batch["rejected"] @ w.T)[:, 0]
    assert abs(event["train_loss"] - (-torch.nn.functional.logsigmoid(margin).mean().item())) < 1e-6
    assert abs(event["rewards/margins"] - margin.mean().item()) < 1e-6
    assert event["tokens"] == 20  # measure's tokens, not units


def test_unequal_micro_batches_train_like_one_batch():
    """Micro-batches of 1 and 3 pairs: the step divides by all 4 units, so it equals the batch of 4."""
    whole = pairs(4, seed=1)
    first = {k: v[:1] if torch.is_tensor(v) else 5 for k, v in whole.items()}
    rest = {k: v[1:] if torch.is_tensor(v) else 15 for k, v in whole.items()}
    (one,), w_one = run([whole], grad_accum=1)
    (split,), w_split = run([first, rest], grad_accum=2)
    assert abs(one["train_loss"] - split["train_loss"]) < 1e-6
    assert abs(one["rewards/margins"] - split["rewards/margins"]) < 1e-6
    assert torch.allclose(w_one, w_split, atol=1e-7)


def test_language_modelling_counts_target_tokens():
    labels = torch.tensor([[-100, 3, 4], [5, -100, -100]])
    units, tokens = token_measure({"labels": labels})
    assert int(units) == int(tokens) == 3
