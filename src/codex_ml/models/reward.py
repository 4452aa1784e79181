"""A reward model's scalar head, and its export as a Hugging Face sequence classifier.

The head reads the decoder's final (normalised) hidden state at each sequence's last real token,
as Hugging Face's ``*ForSequenceClassification`` models pool: a ``Linear(d_model, 1, bias=False)``
named ``score``. A causal LM plus this head is, weight for weight, ``AutoModelForSequenceClassification``
with ``num_labels=1`` (the LM head dropped), so the export is a rename, not an approximation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from codex_ml.errors import CodexError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

HEAD_WEIGHTS = "reward_head.safetensors"  # in a reward run's checkpoints, next to the decoder's weights
SCORE_KEY = "score.weight"


class RewardHead(torch.nn.Module):
    """``score(hidden[last real token])``: one scalar per sequence."""

    def __init__(self, d_model: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.score = torch.nn.Linear(d_model, 1, bias=False)
        torch.nn.init.normal_(self.score.weight, std=init_std)  # Hugging Face's initializer_range

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """hidden: (B, T, D) right-padded; lengths: (B,) real tokens per row -> (B,) fp32 rewards."""
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths.to(hidden.device) - 1]
        return self.score(last.to(self.score.weight.dtype)).squeeze(-1).float()

    def files(self) -> dict[str, bytes]:
        return {
            HEAD_WEIGHTS: save_safetensors({SCORE_KEY: self.score.weight.detach().contiguous().cpu()}, metadata={"format": "pt"})
        }

    def load(self, data: bytes) -> None:
        state = load_safetensors(data)
        if set(state) != {SCORE_KEY} or state[SCORE_KEY].shape != self.score.weight.shape:
            raise CodexError(f"{HEAD_WEIGHTS}: not a reward head of width {self.score.in_features}")
        with torch.no_grad():
            self.score.weight.copy_(state[SCORE_KEY])


def sequence_classifier(causal_lm: PreTrainedModel, score_weight: torch.Tensor, pad_token_id: int | None) -> PreTrainedModel:
    """``AutoModelForSequenceClassification`` (one label) with ``causal_lm``'s decoder and the head's weight."""
    from transformers import AutoModelForSequenceClassification

    config = causal_lm.config.__class__.from_dict(causal_lm.config.to_dict())
    config.num_labels = 1
    config.pad_token_id = pad_token_id  # the classifier pools at the last token that is not padding
    model = cast("PreTrainedModel", AutoModelForSequenceClassification.from_config(config))
    # the decoder's weights keep their names (model.*, transformer.*); the LM head gives way to the score
    state = {k: v for k, v in causal_lm.state_dict().items() if not k.startswith("lm_head.")}
    state[SCORE_KEY] = score_weight.to(next(model.parameters()).dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CodexError(
            f"{type(causal_lm).__name__} does not map onto {type(model).__name__}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.config.architectures = [type(model).__name__]
    return model.to(causal_lm.dtype).eval()  # type: ignore[arg-type]  # transformers types .to() through a decorator that loses self
