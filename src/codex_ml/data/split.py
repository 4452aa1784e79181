"""Deterministic train/validation split by a stable hash of each document's id.

A document's split depends on its id alone, so adding or removing other documents never moves
it from one split to the other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from codex_ml.data.clean import Document


def hash_fraction(doc_id: str) -> float:
    """A number in [0, 1) fixed by the id: the first 8 bytes of its SHA-256."""
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2**64


def is_validation(doc_id: str, val_fraction: float) -> bool:
    return hash_fraction(doc_id) < val_fraction


def split_documents(docs: Iterable[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, validation). When no document falls into validation (a tiny corpus), the one with
    the smallest hash goes there, so that validation loss always exists."""
    train: list[Document] = []
    val: list[Document] = []
    for doc in docs:
        (val if is_validation(doc.id, val_fraction) else train).append(doc)
    if not val and len(train) > 1:
        first = min(range(len(train)), key=lambda i: hash_fraction(train[i].id))
        val.append(train.pop(first))
    return train, val
