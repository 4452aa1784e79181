"""Near-duplicate removal: MinHash signatures of word n-gram shingles, clustered by locality-sensitive hashing.

Signatures are computed with numpy alone, a document at a time and with no Python loop over its words:
words are runs of ASCII letters, digits and underscores (any non-ASCII character counts as a letter);
a word's hash is a polynomial over its code points, a shingle's hash mixes ``ngram`` consecutive word
hashes, and each of ``num_perm`` hash functions is a multiply-add-shift of the shingle hash (2-universal),
its minimum over the shingles one signature entry. A signature depends on the text alone, so the
worker that computes it does not matter.

Clustering covers every signature: documents that share a band of ``rows`` signature entries are
candidates (bands shaped for ``threshold - 0.2``), a candidate pair whose signatures agree on at least
``threshold`` of their entries (the estimated Jaccard similarity) is an edge; where the estimate is
within three standard deviations of the threshold and both texts are at hand, their exact shingle
similarity decides instead (the estimate alone loses about half of the pairs just above the threshold).
It goes band by band into a union-find, verifying only the pairs not yet connected, and reads the
signatures through a ``SignatureSource`` (a spool's file, say), so its memory is a few numbers per
document. From each connected component one document is kept: one already kept by an earlier run (the
persisted index), else the one with the smallest content hash. The result depends on neither the order
of the input nor the number of workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_SEED = 0x5EED_C0DE  # fixed: signatures must not change between runs or machines
INDEX_FILE = "near_dedup_index.npz"
CANDIDATE_MARGIN = 0.2  # bands shaped for threshold - 0.2: at 0.7, 42 bands of 6 miss 0.5% of pairs at 0.7
BORDER_SIGMAS = 3.0  # estimates this many standard deviations from the threshold are checked exactly
VERIFY_BATCH = 8192  # candidate pairs verified at a time: the signatures gathered for them stay a few MB
KEY_CHUNK = 65536  # documents whose band keys are computed at a time

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
    winner: np.ndarray  # per document: the document kept for its cluster (itself when kept)

    @property
    def kept_instead(self) -> dict[int, int]:
        """Dropped document -> the document kept for its cluster."""
        dropped = np.flatnonzero(~self.keep)
        return dict(zip(dropped.tolist(), self.winner[dropped].tolist()))


class SignatureSource(Protocol):
    """MinHash signatures (``shape``: documents x num_perm) read on demand, so that clustering never holds them all."""

    shape: tuple[int, int]

    def band(self, start: int, stop: int) -> np.ndarray:
        """Entries ``start:stop`` of every signature (documents x (stop - start) uint32)."""
        ...

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """The whole signatures of the documents at ``indices`` (len(indices) x num_perm uint32)."""
        ...


class ArraySignatures:
    """A ``SignatureSource`` over signatures held in memory (n x num_perm uint32)."""

    def __init__(self, signatures: np.ndarray) -> None:
        self.signatures = signatures
        self.shape = (signatures.shape[0], signatures.shape[1])

    def band(self, start: int, stop: int) -> np.ndarray:
        return self.signatures[:, start:stop]

    def rows(self, indices: np.ndarray) -> np.ndarray:
        return self.signatures[indices]


class StackedSignatures:
    """A ``SignatureSource`` of several, one after another (this run's documents, then an earlier run's)."""

    def __init__(self, parts: Sequence[SignatureSource]) -> None:
        self.parts = list(parts)
        self._starts = np.cumsum([0] + [p.shape[0] for p in self.parts])
        self.shape = (int(self._starts[-1]), self.parts[0].shape[1])

    def band(self, start: int, stop: int) -> np.ndarray:
        return np.concatenate([p.band(start, stop) for p in self.parts])

    def rows(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        part_of = np.searchsorted(self._starts, indices, side="right") - 1
        out = np.empty((len(indices), self.shape[1]), dtype=np.uint32)
        for k, part in enumerate(self.parts):
            mine = part_of == k
            if mine.any():
                out[mine] = part.rows(indices[mine] - self._starts[k])
        return out


def shingle_set(hasher: MinHasher, text: str) -> np.ndarray:
    """The distinct shingle hashes of ``text``, sorted."""
    return np.unique(hasher.shingle_hashes(text))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """The Jaccard similarity of two shingle sets (``shingle_set``)."""
    common = np.intersect1d(a, b, assume_unique=True).size
    return common / max(a.size + b.size - common, 1)


def cluster_keep(
    signatures: np.ndarray | SignatureSource,
    content_keys: Sequence[str] | np.ndarray,
    threshold: float,
    prior: np.ndarray | None = None,
    exact: Callable[[int, int], float | None] | None = None,
) -> DedupResult:
    """Which of the documents whose ``signatures`` (n x num_perm, in memory or a ``SignatureSource``) are given to
    keep: one per cluster.

    ``content_keys``: a stable key per document (its ``content_key``) that picks the kept one, or an array in the
    same order (``content_ranks``); ``prior``: True for documents an earlier run kept (index entries): they win
    their cluster; ``exact``: the exact Jaccard similarity of two documents, or None where their texts are not at
    hand (index entries); it decides the candidate pairs whose estimate is too close to the threshold to tell.
    """
    source = ArraySignatures(signatures) if isinstance(signatures, np.ndarray) else signatures
    n, num_perm = source.shape
    prior = np.zeros(n, dtype=bool) if prior is None else np.asarray(prior, dtype=bool)
    parent = np.arange(n)  # union-find; a component's root is its smallest member, and between bands every
    # document points straight at it
    if n > 1:
        # candidates from an S-curve rising well below the threshold, so that pairs just above it collide in some
        # band (at the threshold's own S-curve a third of the pairs at 0.73 never would, and 15% of those at 0.7
        # still miss with bands shaped for 0.6); verifying each candidate then keeps the precision
        bands, rows = optimal_bands(max(threshold - CANDIDATE_MARGIN, 0.05), num_perm)
        multipliers = _mix(np.arange(1, rows + 1, dtype=np.uint64))
        border = BORDER_SIGMAS * math.sqrt(threshold * (1.0 - threshold) / num_perm)
        # band by band straight into the union-find: a pair already in one component needs no verifying, and
        # leaving it out cannot change the components, so memory is a few arrays of n whatever the candidates
        for b in range(bands):
            keys = _band_keys(source.band(b * rows, (b + 1) * rows), b, multipliers)
            pairs = _unjoined_candidates(keys, parent)
            del keys
            for lo in range(0, len(pairs), VERIFY_BATCH):
                i, j = np.divmod(pairs[lo : lo + VERIFY_BATCH], n)
                apart = _roots(parent, i) != _roots(parent, j)  # an earlier batch of this band may have joined them
                i, j = i[apart], j[apart]
                if len(i):
                    joined = _verified(source, i, j, threshold, border, exact)
                    _union(parent, i[joined], j[joined])
            _compress(parent)
    return _one_per_cluster(parent, content_keys, prior)


def _band_keys(band: np.ndarray, b: int, multipliers: np.ndarray) -> np.ndarray:
    """Each document's bucket in band ``b``: a hash of its entries there and of ``b``."""
    keys = np.empty(len(band), dtype=np.uint64)
    for lo in range(0, len(band), KEY_CHUNK):  # a chunk at a time: the uint64 products take 8 bytes an entry
        part = band[lo : lo + KEY_CHUNK].astype(np.uint64)
        keys[lo : lo + KEY_CHUNK] = _mix((part * multipliers).sum(axis=1, dtype=np.uint64) ^ np.uint64(b))
    return keys


def _unjoined_candidates(keys: np.ndarray, roots: np.ndarray) -> np.ndarray:
    """The candidate pairs of one band (each member of a bucket with its neighbour in sorted order and with the
    bucket's first member) not yet in one component, as sorted distinct codes i * n + j with i < j."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    same = sorted_keys[1:] == sorted_keys[:-1]
    del sorted_keys  # here and below: arrays of n freed as soon as done with, to keep the peak low
    later = np.flatnonzero(same) + 1  # places in ``order`` of every bucket member but the first
    if not len(later):
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], ~same)))  # of the buckets, in ``order``
    del same
    first = order[starts[np.searchsorted(starts, later, side="right") - 1]]
    del starts
    member, neighbour = order[later], order[later - 1]
    del later, order
    codes = np.concatenate([_pair_codes(neighbour, member, roots), _pair_codes(first, member, roots)])
    del neighbour, member, first
    return np.unique(codes)


def _pair_codes(a: np.ndarray, b: np.ndarray, roots: np.ndarray) -> np.ndarray:
    """The pairs (a[k], b[k]) whose documents lie in different components, as i * n + j with i < j."""
    apart = roots[a] != roots[b]
    a, b = a[apart], b[apart]
    codes = np.minimum(a, b)
    codes *= len(roots)
    codes += np.maximum(a, b)
    return codes


def _verified(
    source: SignatureSource,
    i: np.ndarray,
    j: np.ndarray,
    threshold: float,
    border: float,
    exact: Callable[[int, int], float | None] | None,
) -> np.ndarray:
    """Which pairs (i[k], j[k]) are near-duplicates: signatures that agree on at least ``threshold`` of their
    entries, or, for an estimate within ``border`` of it, an exact similarity of at least ``threshold``."""
    agree = (source.rows(i) == source.rows(j)).mean(axis=1)
    edge = agree >= threshold
    if exact is not None:
        for k in np.flatnonzero(np.abs(agree - threshold) < border):
            similarity = exact(int(i[k]), int(j[k]))
            if similarity is not None:
                edge[k] = similarity >= threshold
    return edge


def _roots(parent: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """The root of each of ``nodes`` by pointer jumping; they point straight at it afterwards."""
    roots = parent[nodes]
    while True:
        up = parent[roots]
        if np.array_equal(up, roots):
            break
        roots = up
    parent[nodes] = roots
    return roots


def _union(parent: np.ndarray, i: np.ndarray, j: np.ndarray) -> None:
    """Joins the components of each pair (i[k], j[k]). Every root is hooked under a smaller one, so no cycle can
    form and a component's root stays its smallest member; each round hooks at least one, until all are joined."""
    while len(i):
        ri, rj = _roots(parent, i), _roots(parent, j)
        apart = ri != rj
        i, j, ri, rj = i[apart], j[apart], ri[apart], rj[apart]
        np.minimum.at(parent, np.maximum(ri, rj), np.minimum(ri, rj))


def _compress(parent: np.ndarray) -> None:
    """Every document pointed straight at its root."""
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return
        parent[:] = up


def _one_per_cluster(roots: np.ndarray, content_keys: Sequence[str] | np.ndarray, prior: np.ndarray) -> DedupResult:
    """Each cluster's winner: an earlier run's document first, then the smallest content key (equal keys: the
    first document)."""
    n = len(roots)
    rank = np.empty(n, dtype=np.int64)
    if isinstance(content_keys, np.ndarray):
        rank[np.argsort(content_keys, kind="stable")] = np.arange(n)
    else:
        rank[np.fromiter(sorted(range(n), key=content_keys.__getitem__), dtype=np.int64, count=n)] = np.arange(n)
    order = np.lexsort((rank, ~prior, roots))  # by cluster, then in the order of preference
    del rank
    first = np.ones(n, dtype=bool)
    first[1:] = roots[order[1:]] != roots[order[:-1]]
    winner_of_root = np.empty(n, dtype=np.int64)
    winner_of_root[roots[order[first]]] = order[first]
    winner = winner_of_root[roots]
    return DedupResult(winner == np.arange(n), winner)


def content_ranks(digests: np.ndarray, ids_of: Callable[[np.ndarray], Sequence[str]]) -> np.ndarray:
    """Each document's place in the order of ``content_key``s, from the SHA-256 digests of their texts (n x 32
    uint8): a hex digest sorts as its bytes do. The ids, which break ties, are asked of ``ids_of`` (the ids of the
    documents at the given ascending positions) only for documents with equal digests."""
    n = len(digests)
    flat = np.ascontiguousarray(digests, dtype=np.uint8).view("S32").ravel()  # compared as bytes; all 32 long
    order = np.argsort(flat, kind="stable")
    head = flat.view(np.uint64)[::4][order]  # equal digests have equal first 8 bytes: all 32 compared only then
    same = head[1:] == head[:-1]
    del head
    maybe = np.flatnonzero(same)
    same[maybe] = flat[order[maybe]] == flat[order[maybe + 1]]
    if same.any():
        tied = np.zeros(n, dtype=bool)
        tied[1:] |= same
        tied[:-1] |= same
        members = np.sort(order[tied])
        id_of = dict(zip(members.tolist(), ids_of(members)))
        order[tied] = sorted(id_of, key=lambda j: (bytes(flat[j]), id_of[j]))  # runs stay in place, sorted by id
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank


def text_digest(text: str) -> bytes:
    """The SHA-256 of a text as near-dedup keys it (``content_key``)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def content_key(doc_id: str, text: str) -> str:
    """What picks the kept document of a cluster: its content's SHA-256, then its id (for equal texts)."""
    return text_digest(text).hex() + "\0" + doc_id


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
        with zipfile.ZipFile(path) as z:
            if _INDEX_META not in z.namelist():  # written by an earlier version: members ids, keys, meta as arrays
                return cls._load_arrays(path, settings)
            meta = json.loads(z.read(_INDEX_META))
            if meta["settings"] != [settings.ngram, settings.num_perm, settings.threshold]:
                return cls.empty(settings)  # other settings: other signatures; the file is replaced on save
            ids, keys = [], []
            with z.open(_INDEX_ENTRIES) as f:
                for line in io.TextIOWrapper(f, encoding="utf-8"):
                    doc_id, key = json.loads(line)
                    ids.append(doc_id)
                    keys.append(key)
            with z.open(_INDEX_SIGNATURES) as f:
                signatures = np.lib.format.read_array(f, allow_pickle=False)
        return cls(ids, keys, signatures, settings)

    @classmethod
    def _load_arrays(cls, path: Path, settings: MinHashSettings) -> DedupIndex:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta["settings"] != [settings.ngram, settings.num_perm, settings.threshold]:
                return cls.empty(settings)
            return cls(list(z["ids"]), list(z["keys"]), z["signatures"], settings)

    def save(self, directory: Path) -> None:
        write_index(directory, self.settings, len(self.ids), [(self.ids, self.keys, self.signatures)])


_INDEX_META, _INDEX_ENTRIES, _INDEX_SIGNATURES = "meta.json", "entries.jsonl", "signatures.npy"


def write_index(
    directory: Path, settings: MinHashSettings, count: int, chunks: Iterable[tuple[Sequence[str], Sequence[str], np.ndarray]]
) -> None:
    """The index of ``count`` documents into ``directory``, from ``chunks`` of (ids, content keys, signatures):
    streamed, so that saving the index of a large corpus holds one chunk at a time. A zip file: ``meta.json``,
    ``entries.jsonl`` ([id, key] a line) and ``signatures.npy``; replaced atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-{os.getpid()}-{INDEX_FILE}"
    try:
        _write_index_zip(tmp, settings, count, chunks)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written index must not be left beside the good one
        raise
    os.replace(tmp, directory / INDEX_FILE)


def _write_index_zip(
    path: Path, settings: MinHashSettings, count: int, chunks: Iterable[tuple[Sequence[str], Sequence[str], np.ndarray]]
) -> None:
    written = 0
    with zipfile.ZipFile(path, "w", allowZip64=True) as z, tempfile.TemporaryFile("w+b", dir=path.parent) as entries:
        z.writestr(_INDEX_META, json.dumps({"settings": [settings.ngram, settings.num_perm, settings.threshold]}))
        with z.open(_INDEX_SIGNATURES, "w", force_zip64=True) as f:
            header = {"descr": np.dtype(np.uint32).str, "fortran_order": False, "shape": (count, settings.num_perm)}
            np.lib.format.write_array_header_2_0(f, header)
            for ids, keys, signatures in chunks:
                f.write(np.ascontiguousarray(signatures, dtype=np.uint32).tobytes())
                entries.write("".join(json.dumps([i, k]) + "\n" for i, k in zip(ids, keys)).encode())
                written += len(signatures)
        if written != count:
            raise ValueError(f"the near-dedup index was promised {count} entries and given {written}")
        entries.seek(0)
        with z.open(_INDEX_ENTRIES, "w", force_zip64=True) as f:
            shutil.copyfileobj(entries, f)
