"""Near-duplicate removal: MinHash signatures of word n-gram shingles, clustered by locality-sensitive hashing.

Signatures are computed with numpy alone, a document at a time and with no Python loop over its words:
words are runs of ASCII letters, digits and underscores (any non-ASCII character counts as a letter);
a word's hash is a polynomial over its code points, a shingle's hash mixes ``ngram`` consecutive word
hashes, and each of ``num_perm`` hash functions is a multiply-add-shift of the shingle hash (2-universal),
its minimum over the shingles one signature entry. A signature depends on the text alone, so the
worker that computes it does not matter.

Clustering sees every signature at once: documents that share a band of ``rows`` signature entries
are candidates (bands shaped for ``threshold - 0.2``), a candidate pair whose signatures agree on at
least ``threshold`` of their entries (the estimated Jaccard similarity) is an edge; where the estimate is
within three standard deviations of the threshold and both texts are at hand, their exact shingle
similarity decides instead (the estimate alone loses about half of the pairs just above the threshold).
From each connected component one document is kept: one already kept by an earlier run (the persisted index),
else the one with the smallest content hash. The
result depends on neither the order of the input nor the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_SEED = 0x5EED_C0DE  # fixed: signatures must not change between runs or machines
INDEX_FILE = "near_dedup_index.npz"
CANDIDATE_MARGIN = 0.2  # bands shaped for threshold - 0.2: at 0.7, 42 bands of 6 miss 0.5% of pairs at 0.7
BORDER_SIGMAS = 3.0  # estimates this many standard deviations from the threshold are checked exactly

# ASCII word characters; every code point >= 128 counts as one too (letters in other scripts)
_WORD_ASCII = np.zeros(128, dtype=bool)
for _c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_":
    _WORD_ASCII[_c] = True


@dataclass(frozen=True)
class MinHashSettings:
    ngram: int = 5
    num_perm: int = 256
    threshold: float = 0.7

    def validate(self) -> None:
        if self.ngram < 1:
            raise ValueError(f"near-dedup n-gram size must be >= 1; got {self.ngram}")
        if not 2 <= self.num_perm <= 4096:
            raise ValueError(f"near-dedup permutations must be in [2, 4096]; got {self.num_perm}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"near-dedup threshold must be in (0, 1); got {self.threshold}")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the output (uint64, wrapping)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class MinHasher:
    """Signatures of texts under fixed settings; the same on every machine and in every process."""

    def __init__(self, settings: MinHashSettings) -> None:
        settings.validate()
        self.settings = settings
        rng = np.random.Generator(np.random.PCG64(_SEED))
        self._a = rng.integers(0, 2**63, settings.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self._b = rng.integers(0, 2**63, settings.num_perm, dtype=np.uint64)
        # a word's odd multiplier by its place in the shingle: "a b" and "b a" differ
        self._position = _mix(np.arange(1, settings.ngram + 1, dtype=np.uint64)) | np.uint64(1)

    def word_hashes(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        is_word = np.ones(codes.size, dtype=bool)
        ascii_ = codes < 128
        is_word[ascii_] = _WORD_ASCII[codes[ascii_]]
        if not is_word.any():
            return np.zeros(0, dtype=np.uint64)
        edges = np.diff(np.concatenate(([False], is_word, [False])).astype(np.int8))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        chars = np.flatnonzero(is_word)
        word_of = np.repeat(np.arange(starts.size), ends - starts)
        position = chars - starts[word_of]
        # polynomial over code points: sum(c * P^k), wrapping; P^k for each character's place in its word
        powers = np.cumprod(
            np.concatenate(([1], np.full(int((ends - starts).max()) - 1, 0x100000001B3))).astype(np.uint64), dtype=np.uint64
        )
        terms = (codes[chars].astype(np.uint64) + np.uint64(1)) * powers[position]
        first = np.concatenate(([0], np.cumsum(ends - starts)[:-1]))  # each word's first entry in ``terms``
        return _mix(np.add.reduceat(terms, first))

    def shingle_hashes(self, text: str) -> np.ndarray:
        words = self.word_hashes(text)
        n = self.settings.ngram
        if words.size < n:
            return np.zeros(0, dtype=np.uint64)
        count = words.size - n + 1
        acc = words[:count] * self._position[0]
        for k in range(1, n):  # n is small (5): a loop over positions, not over words
            acc += words[k : k + count] * self._position[k]
        # repeated shingles stay: the minimum over a multiset is the minimum over its set
        return _mix(acc)

    def signature(self, text: str) -> np.ndarray | None:
        """The MinHash signature (``num_perm`` uint32), or None for a text of fewer than ``ngram`` words."""
        shingles = self.shingle_hashes(text)
        if shingles.size == 0:
            return None
        out = np.full(self.settings.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        block = np.empty((min(shingles.size, 4096), self.settings.num_perm), dtype=np.uint64)
        for lo in range(0, shingles.size, 4096):  # bounded memory: 4096 x num_perm at a time
            part = shingles[lo : lo + 4096]
            buf = block[: part.size]
            np.multiply(part[:, None], self._a[None, :], out=buf)
            buf += self._b[None, :]
            np.minimum(out, buf.min(axis=0), out=out)
        # the top 32 bits of (a x + b) mod 2^64 (multiply-add-shift); the shift is monotone, so it can follow the min
        return (out >> np.uint64(32)).astype(np.uint32)


def optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the false-positive plus false-negative area of
    the LSH S-curve around ``threshold`` (the choice datasketch makes)."""
    xs = np.linspace(0.0, 1.0, 1001)
    best, best_cost = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        p = 1.0 - (1.0 - xs**rows) ** bands
        fp = np.trapezoid(np.where(xs < threshold, p, 0.0), xs)
        fn = np.trapezoid(np.where(xs >= threshold, 1.0 - p, 0.0), xs)
        if fp + fn < best_cost:
            best, best_cost = (bands, rows), fp + fn
    return best


@dataclass
class DedupResult:
    keep: np.ndarray  # bool per input document
    kept_instead: dict[int, int]  # dropped document -> the document kept for its cluster (-1: an earlier run's)


def shingle_set(hasher: MinHasher, text: str) -> np.ndarray:
    """The distinct shingle hashes of ``text``, sorted."""
    return np.unique(hasher.shingle_hashes(text))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """The Jaccard similarity of two shingle sets (``shingle_set``)."""
    common = np.intersect1d(a, b, assume_unique=True).size
    return common / max(a.size + b.size - common, 1)


def cluster_keep(
    signatures: np.ndarray,
    content_keys: Sequence[str],
    threshold: float,
    prior: np.ndarray | None = None,
    exact: Callable[[int, int], float | None] | None = None,
) -> DedupResult:
    """Which of the documents whose ``signatures`` (n x num_perm) are given to keep: one per cluster.

    ``content_keys``: a stable key per document (its content hash and id) that picks the kept one;
    ``prior``: True for documents an earlier run kept (index entries): they win their cluster;
    ``exact``: the exact Jaccard similarity of two documents, or None where their texts are not at hand
    (index entries); it decides the candidate pairs whose estimate is too close to the threshold to tell.
    """
    n, num_perm = signatures.shape
    prior = np.zeros(n, dtype=bool) if prior is None else prior
    parent = np.arange(n)
    if n > 1:
        # candidates from an S-curve rising well below the threshold, so that pairs just above it collide in some
        # band (at the threshold's own S-curve a third of the pairs at 0.73 never would, and 15% of those at 0.7
        # still miss with bands shaped for 0.6); verifying each candidate then keeps the precision
        bands, rows = optimal_bands(max(threshold - CANDIDATE_MARGIN, 0.05), num_perm)
        multipliers = _mix(np.arange(1, rows + 1, dtype=np.uint64))
        edges = []
        for b in range(bands):
            band = signatures[:, b * rows : (b + 1) * rows].astype(np.uint64)
            keys = _mix((band * multipliers).sum(axis=1, dtype=np.uint64) ^ np.uint64(b))
            order = np.argsort(keys, kind="stable")
            same = keys[order[1:]] == keys[order[:-1]]
            if not same.any():
                continue
            # each member of a bucket to its neighbour in sorted order and to the bucket's first member
            run_start = np.maximum.accumulate(np.where(np.concatenate(([True], ~same)), np.arange(n), 0))
            idx = np.flatnonzero(same) + 1
            edges.append(np.stack([order[idx - 1], order[idx]], axis=1))
            edges.append(np.stack([order[run_start[idx]], order[idx]], axis=1))
        if edges:
            pairs = np.unique(np.sort(np.concatenate(edges), axis=1), axis=0)
            pairs = pairs[pairs[:, 0] != pairs[:, 1]]
            agree = (
                np.concatenate(
                    [
                        (signatures[pairs[lo : lo + 65536, 0]] == signatures[pairs[lo : lo + 65536, 1]]).mean(axis=1)
                        for lo in range(0, len(pairs), 65536)
                    ]
                )
                if len(pairs)
                else np.zeros(0)
            )
            edge = agree >= threshold
            if exact is not None:
                border = BORDER_SIGMAS * math.sqrt(threshold * (1.0 - threshold) / num_perm)
                for k in np.flatnonzero(np.abs(agree - threshold) < border):
                    similarity = exact(int(pairs[k, 0]), int(pairs[k, 1]))
                    if similarity is not None:
                        edge[k] = similarity >= threshold
            for i, j in pairs[edge]:
                ri, rj = _find(parent, int(i)), _find(parent, int(j))
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([_find(parent, i) for i in range(n)])
    winner: dict[int, int] = {}
    for i in range(n):
        r = roots[i]
        w = winner.get(r)
        if w is None or (not prior[i], content_keys[i]) < (not prior[w], content_keys[w]):
            winner[r] = i
    keep = np.zeros(n, dtype=bool)
    kept_instead = {}
    for i in range(n):
        w = winner[roots[i]]
        keep[i] = w == i
        if w != i:
            kept_instead[i] = w
    return DedupResult(keep, kept_instead)


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = int(parent[i])
    return i


def content_key(doc_id: str, text: str) -> str:
    """What picks the kept document of a cluster: its content's SHA-256, then its id (for equal texts)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest() + "\0" + doc_id


# ---------------------------------------------------------------- the index kept beside the prepared data


@dataclass
class DedupIndex:
    """Signatures of the documents earlier runs kept: later files are deduplicated against them."""

    ids: list[str]
    keys: list[str]  # content_key of each
    signatures: np.ndarray  # n x num_perm uint32
    settings: MinHashSettings

    @classmethod
    def empty(cls, settings: MinHashSettings) -> DedupIndex:
        return cls([], [], np.zeros((0, settings.num_perm), dtype=np.uint32), settings)

    @classmethod
    def load(cls, directory: Path, settings: MinHashSettings) -> DedupIndex:
        path = directory / INDEX_FILE
        if not path.exists():
            return cls.empty(settings)
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta["settings"] != [settings.ngram, settings.num_perm, settings.threshold]:
                return cls.empty(settings)  # other settings: other signatures; the file is replaced on save
            return cls(list(z["ids"]), list(z["keys"]), z["signatures"], settings)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".tmp-{os.getpid()}-{INDEX_FILE}"
        meta = json.dumps({"settings": [self.settings.ngram, self.settings.num_perm, self.settings.threshold]})
        with open(tmp, "wb") as f:
            np.savez(
                f,
                ids=np.array(self.ids, dtype=str),
                keys=np.array(self.keys, dtype=str),
                signatures=self.signatures,
                meta=np.array(meta),
            )
        os.replace(tmp, directory / INDEX_FILE)
