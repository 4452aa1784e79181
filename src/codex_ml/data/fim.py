"""Fill-in-the-middle: documents rearranged so a left-to-right model learns to infill.

A chosen document is cut at two random character positions into prefix, middle and suffix and
emitted with the FIM special tokens (Bavarian et al., 2022, "Efficient Training of Language Models
to Fill in the Middle"):

    PSM:  <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
    SPM:  <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle

The choice (FIM or not, where to cut, PSM or SPM) depends only on the seed and the document id, so
the same data is produced on every machine and in every worker process.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class FimSettings:
    rate: float  # share of documents transformed
    mode: str  # psm, spm, or mixed
    spm_rate: float  # with mode=mixed, the share of SPM among transformed documents
    prefix_id: int
    middle_id: int
    suffix_id: int
    seed: int = 0


def _rng(settings: FimSettings, doc_id: str) -> random.Random:
    digest = hashlib.sha256(f"{settings.seed}\0{doc_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def fim_encode(text: str, doc_id: str, settings: FimSettings, encode: Callable[[str], list[int]]) -> list[int]:
    """Token ids of the document, FIM-transformed or not (the caller appends end-of-text)."""
    rng = _rng(settings, doc_id)
    if rng.random() >= settings.rate or len(text) < 3:
        return encode(text)
    a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
    prefix, middle, suffix = text[:a], text[a:b], text[b:]
    spm = settings.mode == "spm" or (settings.mode == "mixed" and rng.random() < settings.spm_rate)
    p, s = settings.prefix_id, settings.suffix_id
    if spm:
        return [p, s, *encode(suffix), settings.middle_id, *encode(prefix), *encode(middle)]
    return [p, *encode(prefix), s, *encode(suffix), settings.middle_id, *encode(middle)]


def fim_prompt(prefix_ids: list[int], suffix_ids: list[int], settings_ids: tuple[int, int, int]) -> list[int]:
    """The PSM prompt whose continuation is the middle: infilling at generation time."""
    prefix_id, middle_id, suffix_id = settings_ids
    return [prefix_id, *prefix_ids, suffix_id, *suffix_ids, middle_id]
