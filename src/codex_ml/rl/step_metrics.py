"""Built-in metrics of a GRPO step's completions (``grpo.metrics``), in the ``codex_ml.metrics`` interface."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from codex_ml.eval.metrics import distinct_n


def distinct_1(*, completions: Sequence[str], **_: Any) -> float:
    """Share of distinct code tokens among a step's completions: a policy collapsing onto one answer drives it down."""
    return float(distinct_n(list(completions), 1))


def distinct_2(*, completions: Sequence[str], **_: Any) -> float:
    """Share of distinct code-token bigrams among a step's completions."""
    return float(distinct_n(list(completions), 2))
