"""Fast paths give the same numbers as plain ones: the fused loss, and the compiled model in training."""

import copy

import pytest
import torch

from codex_ml.models.gpt import GPT, GPTConfig
from codex_ml.models.loss import IGNORE_INDEX, linear_cross_entropy, summed_token_loss
from codex_ml.recipes.models import native_loss_sum


def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, d_model=32, d_ff=64, max_seq_len=64))


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_fused_loss_equals_logits_then_cross_entropy(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 20, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 20))
    labels[0, :5] = IGNORE_INDEX  # ignored targets
    fused = linear_cross_entropy(hidden, weight, labels, chunk=chunk)
    fused.backward()
    g_hidden, g_weight = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    plain = summed_token_loss(hidden @ weight.t(), labels)
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_hidden, hidden.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_weight, weight.grad, rtol=1e-5, atol=1e-5)


def test_compiled_training_matches_eager():
    x = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    losses = []
    for compiled in (False, True):
        model = copy.deepcopy(tiny())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loss_sum = native_loss_sum(torch.compile(model) if compiled else model)
        run = []
        for _ in range(3):
            loss = loss_sum(batch) / 128
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
