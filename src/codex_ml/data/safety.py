"""The safety stage between cleaning and the split: redaction, decontamination, near-duplicate removal.

Each document is scanned once, in ``num_workers`` processes (0: this one): redacted (``redact.py``),
matched against the benchmarks (``decontaminate.py``) and given its MinHash signature (``near_dedup.py``),
all on the document alone, so the worker count changes nothing. Clustering the signatures then needs
them all and runs here. A document the scan fails on is skipped with the reason counted, never the run.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from codex_ml.data.clean import Document
from codex_ml.data.decontaminate import BenchmarkItem, ContaminationIndex
from codex_ml.data.near_dedup import (
    VERIFY_BATCH,
    ArraySignatures,
    DedupIndex,
    MinHasher,
    MinHashSettings,
    SignatureSource,
    StackedSignatures,
    cluster_keep,
    content_ranks,
    jaccard,
    shingle_set,
    text_digest,
    write_index,
)
from codex_ml.data.redact import RedactionError, placeholders_with, redact_document
from codex_ml.data.workers import ordered_map

INDEX_CHUNK = 65536  # kept documents written to the index at a time (their ids are read back once a chunk)
EXACT_CACHE_DOCUMENTS = 4096  # shingle sets kept while borderline pairs are checked: memory stays bounded


@dataclass(frozen=True)
class SafetySettings:
    redact: bool = True
    detectors: tuple[str, ...] = ("secrets", "email", "ip_address")
    placeholders: tuple[tuple[str, str], ...] = ()  # kind -> placeholder overrides
    near_dedup: bool = True
    minhash: MinHashSettings = MinHashSettings()
    benchmarks: tuple[str, ...] = ("humaneval",)
    decontaminate_ngram: int = 10
    decontaminate_overlap: float = 0.5


@dataclass
class SafetyReport:
    redact: bool = True
    near_dedup: bool = True
    benchmarks: list[str] = field(default_factory=list)
    findings: Counter = field(default_factory=Counter)  # kind -> findings redacted
    redacted_documents: int = 0
    failed: Counter = field(default_factory=Counter)  # reason -> documents skipped because the scan failed
    failed_examples: list[str] = field(default_factory=list)
    near_duplicates: int = 0
    contaminated: list[dict] = field(default_factory=list)  # one per dropped document: its id and matches
    seconds: float = 0.0

    def summary(self, redact_report: str | None = None) -> str:
        if self.redact:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.findings.items())) or "none"
            line = f"redaction: {sum(self.findings.values())} findings in {self.redacted_documents} documents ({kinds})"
            lines = [line + (f"; report: {redact_report}" if redact_report else "")]
        else:
            lines = ["redaction: off (data.redact=false): secrets and personal data stay in the data"]
        if self.failed:
            lines.append(
                f"skipped {sum(self.failed.values())} documents the scan failed on: "
                + ", ".join(f"{r} {n}" for r, n in sorted(self.failed.items()))
                + f" (e.g. {', '.join(self.failed_examples[:3])})"
            )
        if self.benchmarks:
            named = "; ".join(
                f"{c['document']} ({', '.join(sorted({m['item'] for m in c['matches']}))})" for c in self.contaminated[:10]
            )
            more = f" and {len(self.contaminated) - 10} more" if len(self.contaminated) > 10 else ""
            lines.append(
                f"decontamination ({', '.join(self.benchmarks)}): dropped {len(self.contaminated)} documents"
                + (f": {named}{more}" if named else "")
            )
        else:
            lines.append("decontamination: off (data.decontaminate=[])")
        lines.append(
            f"near-dedup: dropped {self.near_duplicates} near-duplicates"
            if self.near_dedup
            else "near-dedup: off (data.near_dedup=false)"
        )
        if self.redact or self.near_dedup or self.benchmarks:
            lines[-1] += f" (safety stage {self.seconds:.1f}s)"
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "redaction": {"enabled": self.redact, "findings": dict(self.findings), "documents": self.redacted_documents},
            "scan_failed": dict(self.failed),
            "near_dedup": {"enabled": self.near_dedup, "dropped": self.near_duplicates},
            "decontamination": {"benchmarks": self.benchmarks, "dropped": self.contaminated},
            "seconds": round(self.seconds, 2),
        }

    @classmethod
    def from_dict(cls, d: dict) -> SafetyReport:
        return cls(
            d["redaction"]["enabled"],
            d["near_dedup"]["enabled"],
            d["decontamination"]["benchmarks"],
            Counter(d["redaction"]["findings"]),
            d["redaction"]["documents"],
            Counter(d["scan_failed"]),
            [],
            d["near_dedup"]["dropped"],
            d["decontamination"]["dropped"],
            d["seconds"],
        )


@dataclass
class _Scanned:
    text: str | None  # None: skipped
    findings: list  # (line, kind, detector)
    matches: list  # Contamination
    signature: np.ndarray | None
    failure: str | None = None


class _Scanner:
    def __init__(self, settings: SafetySettings, items: list[BenchmarkItem]) -> None:
        self.settings = settings
        self.placeholders = placeholders_with(dict(settings.placeholders))
        self.contamination = (
            ContaminationIndex(items, settings.decontaminate_ngram, settings.decontaminate_overlap)
            if settings.benchmarks
            else None
        )
        self.hasher = MinHasher(settings.minhash) if settings.near_dedup else None

    def scan(self, text: str) -> _Scanned:
        s = self.settings
        try:
            findings = []
            if s.redact:
                redacted = redact_document(text, s.detectors, self.placeholders)
                text, findings = redacted.text, [(f.line, f.kind, f.detector) for f in redacted.findings]
            matches = self.contamination.matches(text) if self.contamination else []
            signature = self.hasher.signature(text) if self.hasher and not matches else None
        except RedactionError:
            return _Scanned(None, [], [], None, "redaction_breaks_syntax")
        except Exception as e:  # a detector's bug on one document must not stop the corpus: counted, skipped
            return _Scanned(None, [], [], None, f"scan_error:{type(e).__name__}")
        return _Scanned(text, findings, matches, signature)


_worker: _Scanner | None = None


def _init_worker(settings: SafetySettings, items: list[BenchmarkItem]) -> None:
    global _worker
    _worker = _Scanner(settings, items)


def _scan_batch(texts: list[str]) -> list[_Scanned]:
    assert _worker is not None, "_init_worker sets the scanner in every pool worker"
    return [_worker.scan(t) for t in texts]


def _batches(docs: list[Document], max_chars: int = 1 << 19) -> Iterator[list[str]]:
    batch, size = [], 0
    for d in docs:
        batch.append(d.text)
        size += len(d.text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _scan_all(docs: list[Document], settings: SafetySettings, items: list[BenchmarkItem], num_workers: int) -> Iterable[_Scanned]:
    workers = 0 if len(docs) < 2 else num_workers
    for scanned in ordered_map(_scan_batch, _batches(docs), workers, _init_worker, (settings, items)):
        yield from scanned


def make_safe(
    docs: list[Document],
    settings: SafetySettings,
    items: list[BenchmarkItem],
    num_workers: int,
    report: SafetyReport,
    redactions: list[dict],
    index_dir: Path | None = None,
) -> list[Document]:
    """The documents of ``docs`` to train on, redacted, in their order; counts go to ``report``, one row per
    redaction to ``redactions`` (file, line, kind, detector). ``index_dir``: the near-dedup index of earlier
    runs, loaded from and saved back to it."""
    report.redact, report.near_dedup, report.benchmarks = settings.redact, settings.near_dedup, list(settings.benchmarks)
    if not (settings.redact or settings.near_dedup or settings.benchmarks):
        return docs
    start = time.perf_counter()
    kept: list[Document] = []
    signatures: list[np.ndarray | None] = []
    for doc, scanned in zip(docs, _scan_all(docs, settings, items, num_workers)):
        if scanned.failure:
            report.failed[scanned.failure] += 1
            if len(report.failed_examples) < 3:
                report.failed_examples.append(doc.id)
            continue
        if scanned.findings:
            report.redacted_documents += 1
            for line, kind, detector in scanned.findings:
                report.findings[kind] += 1
                redactions.append({"file": doc.id, "line": line, "kind": kind, "detector": detector})
        if scanned.matches:
            report.contaminated.append(
                {
                    "document": doc.id,
                    "matches": [
                        {"benchmark": m.benchmark, "item": m.item, "field": m.field, "method": m.method, "score": m.score}
                        for m in scanned.matches
                    ],
                }
            )
            continue
        assert scanned.text is not None  # None only with a failure, skipped above
        kept.append(Document(doc.id, scanned.text))
        signatures.append(scanned.signature)
    if settings.near_dedup:
        kept = _drop_near_duplicates(kept, signatures, settings.minhash, report, index_dir)
    report.seconds = time.perf_counter() - start
    return kept


def _drop_near_duplicates(
    docs: list[Document],
    signatures: list[np.ndarray | None],
    minhash: MinHashSettings,
    report: SafetyReport,
    index_dir: Path | None,
) -> list[Document]:
    earlier = EarlierRuns(index_dir, minhash)
    digests = [text_digest(d.text) for d in docs]
    prior = [earlier.meet(d.id, digest.hex()) for d, digest in zip(docs, digests)]
    present = [(i, s) for i, s in enumerate(signatures) if s is not None]
    signed = [i for i, _ in present]
    sigs = np.stack([s for _, s in present]) if present else np.zeros((0, minhash.num_perm), dtype=np.uint32)
    keep = near_duplicate_keep(
        ArraySignatures(sigs),
        np.frombuffer(b"".join(digests[i] for i in signed), dtype=np.uint8).reshape(-1, 32),
        np.array([prior[i] for i in signed], dtype=bool),
        lambda js: [docs[signed[j]].id for j in js],
        earlier,
        lambda j: docs[signed[j]].text,
    )
    drop = {signed[j] for j in np.flatnonzero(~keep)}
    report.near_duplicates = len(drop)
    return [d for i, d in enumerate(docs) if i not in drop]


class EarlierRuns:
    """The near-dedup index of earlier runs in ``index_dir`` (none: an empty one), met by every document of this
    corpus as it streams by: an entry for one of them is that document (its current version wins); the others
    are documents an earlier run kept, which this run's documents are deduplicated against."""

    def __init__(self, index_dir: Path | None, minhash: MinHashSettings) -> None:
        self.index_dir = index_dir
        self.index = DedupIndex.load(index_dir, minhash) if index_dir else DedupIndex.empty(minhash)
        self._earlier = set(zip(self.index.ids, self.index.keys))
        self._entry_ids = set(self.index.ids)
        self._met: set[str] = set()  # ids of entries that are documents of this corpus

    def meet(self, doc_id: str, digest_hex: str) -> bool:
        """Notes a document of this corpus (with a signature or not); True when an earlier run kept it with this
        text (its SHA-256), so that it wins its cluster."""
        if doc_id not in self._entry_ids:
            return False
        self._met.add(doc_id)
        return (doc_id, digest_hex + "\0" + doc_id) in self._earlier

    def outside(self) -> np.ndarray:
        """The index entries that are no document of this corpus."""
        return np.array([k for k, doc_id in enumerate(self.index.ids) if doc_id not in self._met], dtype=np.int64)

    def save(self, count: int, chunks: Iterable[tuple[list[str], list[str], np.ndarray]]) -> None:
        """The index for later runs into ``index_dir``: this run's ``count`` kept documents, streamed in ``chunks``
        of (ids, content keys, signatures), then the entries outside this corpus."""
        assert self.index_dir is not None, "an index is saved where it was loaded from"
        outside = self.outside()
        index = self.index
        entries = ([index.ids[k] for k in outside], [index.keys[k] for k in outside], index.signatures[outside])
        write_index(self.index_dir, index.settings, count + len(outside), itertools.chain(chunks, [entries]))


def near_duplicate_keep(
    signatures: SignatureSource,
    digests: np.ndarray,
    prior: np.ndarray,
    ids_of: Callable[[np.ndarray], Sequence[str]],
    earlier: EarlierRuns,
    text_of: Callable[[int], str] | None = None,
) -> np.ndarray:
    """Which of the documents with MinHash ``signatures`` to keep, against each other and the documents earlier
    runs kept (``earlier``, which every document of this corpus has met; its index is updated).

    ``digests``: the SHA-256 of each one's text (n x 32 uint8), which with its id makes its ``content_key``;
    ``prior``: True for those an earlier run kept as they are (``EarlierRuns.meet``); ``ids_of``: the ids of the
    documents at given ascending positions, asked for equal digests and the kept documents alone; ``text_of``: the
    text the signature of document ``j`` was made from, to check borderline pairs exactly."""
    index, outside = earlier.index, earlier.outside()
    n_cur = len(digests)
    entry_keys = [index.keys[k].partition("\0") for k in outside]  # hex digest, "\0", id
    source = StackedSignatures([signatures, ArraySignatures(index.signatures[outside])]) if len(outside) else signatures
    entry_digests = np.frombuffer(b"".join(bytes.fromhex(h) for h, _, _ in entry_keys), dtype=np.uint8).reshape(-1, 32)

    def all_ids(positions: np.ndarray) -> list[str]:  # this corpus's documents, then the index entries
        mine = positions[positions < n_cur]
        return list(ids_of(mine)) + [entry_keys[k - n_cur][2] for k in positions[positions >= n_cur]]

    ranks = content_ranks(np.concatenate([digests, entry_digests]), all_ids)
    exact = None
    if text_of is not None:
        hasher = MinHasher(index.settings)
        shingles = lru_cache(maxsize=EXACT_CACHE_DOCUMENTS)(lambda j: shingle_set(hasher, text_of(j)))

        def exact(i: int, j: int) -> float | None:
            return jaccard(shingles(i), shingles(j)) if i < n_cur and j < n_cur else None  # index entries: no text

    all_prior = np.concatenate([np.asarray(prior, dtype=bool), np.ones(len(outside), dtype=bool)])
    keep = cluster_keep(source, ranks, index.settings.threshold, all_prior, exact).keep[:n_cur]
    if earlier.index_dir is not None:
        kept = np.flatnonzero(keep)

        def chunks() -> Iterator[tuple[list[str], list[str], np.ndarray]]:  # a few at a time: a corpus that keeps
            for lo in range(0, len(kept), INDEX_CHUNK):  # most documents would hold all their signatures at once
                part = kept[lo : lo + INDEX_CHUNK]
                ids = list(ids_of(part))  # one pass over the records per chunk
                for at in range(0, len(part), VERIFY_BATCH):
                    rows, rows_ids = part[at : at + VERIFY_BATCH], ids[at : at + VERIFY_BATCH]
                    keys = [bytes(digests[j]).hex() + "\0" + doc_id for j, doc_id in zip(rows, rows_ids)]
                    yield rows_ids, keys, signatures.rows(rows)

        earlier.save(len(kept), chunks())
    return keep
