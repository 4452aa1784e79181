"""The stages of preparing a corpus, each streaming through a work folder, so memory does not grow with the corpus.

1. ``scan_shard``: a shard of the source through cleaning and the safety scan (redaction, decontamination,
   MinHash signature), in worker processes, into a spool (``spool.py``);
2. ``decide``: over every spool in order, the decisions that need the whole corpus: exact dedup (first copy
   kept), near-dedup (one global LSH clustering of all signatures), the train/validation split, the counts;
   then, when no tokenizer is given, ``train_tokenizer_on_sample``;
3. ``tokenize_split``: the kept documents of a split, tokenized in worker processes;
4. ``write_split`` (``pack.py``) into shards, and ``write_manifest``.

The single-process engine runs them here on one shard; the datatrove engine (``engine.py``) runs stages 1
and 3 as tasks over shards of the input and 2 and 4 as one task each. Every per-document result depends on
the document alone and every global one is taken over all shards in source order, so both give the same
bytes for any number of shards or workers.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from codex_ml.conf.schema import TokenizerConfig
from codex_ml.data import spool
from codex_ml.data.clean import DUPLICATE, CleaningConfig, CleaningReport, clean_one, text_digest
from codex_ml.data.decontaminate import BenchmarkItem
from codex_ml.data.fim import FimSettings
from codex_ml.data.pack import FORMAT_VERSION, MANIFEST, SplitStats, token_dtype, tokenize_documents
from codex_ml.data.progress import progress_bar
from codex_ml.data.safety import EarlierRuns, SafetyReport, SafetySettings, _Scanner, near_duplicate_keep
from codex_ml.data.sources import RawDocument, ReadFailure
from codex_ml.data.split import hash_fraction, is_validation
from codex_ml.data.workers import ordered_map
from codex_ml.errors import CodexError
from codex_ml.tokenizer.core import CodeTokenizer, SpecialTokens
from codex_ml.tokenizer.train import train_tokenizer

REDACTIONS, CONTAMINATION = "redactions.jsonl", "contamination.jsonl"  # beside the manifest
DECISIONS = "decisions.json"  # in the work folder: what stage 2 found, for the manifest
SCAN_TIME = "scan_seconds.txt"  # in a spool: the wall time of its scan


class DataError(CodexError):
    """Data that cannot be trained on: missing paths, nothing left after cleaning."""


@dataclass(frozen=True)
class ScanSettings:
    cleaning: CleaningConfig
    safety: SafetySettings
    benchmark_items: tuple[BenchmarkItem, ...] = ()


# ---------------------------------------------------------------- 1. scan a shard


_state: tuple[CleaningConfig, _Scanner | None] | None = None


def _init_scan_worker(settings: ScanSettings) -> None:
    global _state
    s = settings.safety
    scanner = _Scanner(s, list(settings.benchmark_items)) if (s.redact or s.near_dedup or s.benchmarks) else None
    _state = (settings.cleaning, scanner)


def _scan_batch(batch: list[RawDocument | ReadFailure]) -> list[tuple[spool.Record, str | None, np.ndarray | None, int]]:
    assert _state is not None, "_init_scan_worker sets the state in every worker"
    cleaning, scanner = _state
    out: list[tuple[spool.Record, str | None, np.ndarray | None, int]] = []
    for doc in batch:
        size = doc.size if isinstance(doc, RawDocument) else 0
        cleaned = clean_one(doc, cleaning)
        if cleaned.text is None:
            out.append((spool.Record(cleaned.id, skip=cleaned.reason, encoding=cleaned.encoding), None, None, size))
            continue
        text = cleaned.text
        record = spool.Record(cleaned.id, encoding=cleaned.encoding, digest=text_digest(text).hex(), chars=len(text))
        signature = None
        if scanner is not None:
            scanned = scanner.scan(text)
            if scanned.failure:
                record.failure = scanned.failure
                out.append((record, None, None, size))
                continue
            assert scanned.text is not None
            text, signature = scanned.text, scanned.signature
            record.findings = [list(f) for f in scanned.findings]
            record.matches = [
                {"benchmark": m.benchmark, "item": m.item, "field": m.field, "method": m.method, "score": m.score}
                for m in scanned.matches
            ]
            if scanner.hasher is not None:
                record.key = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        out.append((record, None if record.matches else text, signature, size))
    return out


def _raw_batches(raw: Iterable[RawDocument | ReadFailure], max_bytes: int = 1 << 20) -> Iterator[list]:
    batch, size = [], 0
    for doc in raw:
        batch.append(doc)
        size += doc.size if isinstance(doc, RawDocument) else 0
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def scan_shard(
    raw: Iterable[RawDocument | ReadFailure],
    settings: ScanSettings,
    num_workers: int,
    spool_dir: Path,
    total_bytes: int | None = None,
) -> None:
    """Stage 1: every document of ``raw`` cleaned and scanned in ``num_workers`` processes, into ``spool_dir``."""
    start = time.perf_counter()
    writer = spool.SpoolWriter(spool_dir)
    bar = progress_bar("scanning (clean, redact, decontaminate, MinHash)", total_bytes)
    docs = 0
    try:
        for results in ordered_map(_scan_batch, _raw_batches(raw), num_workers, _init_scan_worker, (settings,)):
            for record, text, signature, size in results:
                writer.add(record, text, signature)
                bar.update(size)
                docs += 1
            bar.set_postfix(docs=docs, refresh=False)
    finally:
        bar.close()
        writer.close()
    (spool_dir / SCAN_TIME).write_text(f"{time.perf_counter() - start:.3f}\n")


# ---------------------------------------------------------------- 2. decide over all shards


@dataclass
class Decisions:
    cleaning: CleaningReport
    safety: SafetyReport
    content_sha256: str
    bytes: dict  # split -> bytes of redacted text

    def save(self, path: Path) -> None:
        d = {"cleaning": self.cleaning.to_dict(), "safety": self.safety.to_dict(), "content_sha256": self.content_sha256}
        path.write_text(json.dumps({**d, "bytes": self.bytes}, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Decisions:
        d = json.loads(path.read_text())
        return cls(CleaningReport.from_dict(d["cleaning"]), SafetyReport.from_dict(d["safety"]), d["content_sha256"], d["bytes"])


def decide(
    spool_dirs: list[Path],
    settings: ScanSettings,
    val_fraction: float,
    description: str,
    redactions_path: Path,
    index_dir: Path | None = None,
    expected_sha256: str | None = None,
) -> Decisions:
    """Stage 2: exact dedup, the counts, the content hash, near-dedup and the split over the spools in order;
    each spool's ``splits.u8`` says where each of its records goes. Errors (nothing left, a content hash that
    differs from ``expected_sha256``) are ``DataError``s."""
    start = time.perf_counter()
    safety, cleaning = SafetyReport(), CleaningReport()
    s = settings.safety
    safety.redact, safety.near_dedup, safety.benchmarks = s.redact, s.near_dedup, list(s.benchmarks)
    seen: set[bytes] = set()  # first 16 bytes of each kept digest: half the memory of the hex strings
    content = hashlib.sha256()
    keep = [bytearray() for _ in spool_dirs]  # per record: 1 kept so far
    earlier = EarlierRuns(index_dir, s.minhash) if s.near_dedup else None
    candidates = _Candidates()
    redactions_path.parent.mkdir(parents=True, exist_ok=True)
    with open(redactions_path, "w", encoding="utf-8") as redactions:
        for n, directory in enumerate(spool_dirs):
            for i, r in enumerate(spool.records(directory)):
                kept = _count(r, cleaning, safety, seen, content, settings.cleaning.dedup, redactions)
                keep[n].append(kept)
                if kept and earlier is not None:
                    prior = earlier.meet(r.id, r.key)
                    if r.signature >= 0:
                        candidates.add(n, i, r, prior)
    if not cleaning.kept:
        raise DataError(f"no documents left after cleaning {description}: " + "; ".join(cleaning.summary().splitlines()[1:]))
    digest = content.hexdigest()
    if expected_sha256 and digest != expected_sha256:
        raise DataError(f"{description}: content hash {digest} differs from the expected data.expected_sha256={expected_sha256}")
    if earlier is not None:
        for n, i in candidates.near_duplicates(spool_dirs, earlier):
            keep[n][i] = 0
            safety.near_duplicates += 1
    size = _write_splits(spool_dirs, keep, val_fraction)
    if not size:
        raise DataError(f"no documents left after redaction, decontamination and near-dedup of {description}")
    scan_seconds = sum(float((d / SCAN_TIME).read_text()) for d in spool_dirs if (d / SCAN_TIME).exists())
    if s.redact or s.near_dedup or s.benchmarks:
        safety.seconds = scan_seconds + time.perf_counter() - start
    return Decisions(cleaning, safety, digest, size)


def _count(
    r: spool.Record,
    cleaning: CleaningReport,
    safety: SafetyReport,
    seen: set[bytes],
    content: hashlib._Hash,
    dedup: bool,
    redactions: TextIO,
) -> int:
    """One record into the reports; 1 when it is kept (before near-dedup)."""
    if r.encoding:
        cleaning.decoded_from[r.encoding] += 1
    if r.skip:
        cleaning.skip(r.skip, r.id)
        return 0
    if dedup:
        head = bytes.fromhex(r.digest[:32])  # 128 bits of SHA-256: a collision is out of reach
        if head in seen:
            cleaning.skip(DUPLICATE, r.id)
            return 0
        seen.add(head)
    cleaning.kept += 1
    cleaning.kept_chars += r.chars
    content.update(f"{len(r.id)}:{r.id}".encode() + bytes.fromhex(r.digest))
    if r.failure:
        safety.failed[r.failure] += 1
        if len(safety.failed_examples) < 3:
            safety.failed_examples.append(r.id)
        return 0
    if r.findings:
        safety.redacted_documents += 1
        for line, kind, detector in r.findings:
            safety.findings[kind] += 1
            redactions.write(json.dumps({"file": r.id, "line": line, "kind": kind, "detector": detector}) + "\n")
    if r.matches:
        safety.contaminated.append({"document": r.id, "matches": r.matches})
        return 0
    return 1


class _Candidates:
    """Stage 2's near-dedup candidates in flat arrays, a few dozen bytes each: the spool, record and signature row
    of each, where its text is, the SHA-256 of that text, and whether an earlier run kept it as it is."""

    def __init__(self) -> None:
        self.spool, self.record, self.row, self.offset, self.length = (array("q") for _ in range(5))
        self.digests = bytearray()  # 32 bytes each
        self.prior = bytearray()

    def add(self, n: int, i: int, r: spool.Record, prior: bool) -> None:
        """Record ``i`` of spool ``n``, kept so far and signed."""
        self.spool.append(n)
        self.record.append(i)
        self.row.append(r.signature)
        self.offset.append(r.offset)
        self.length.append(r.length)
        self.digests += bytes.fromhex(r.key)  # of the redacted text, which the signature was made from
        self.prior.append(prior)

    def near_duplicates(self, spool_dirs: list[Path], earlier: EarlierRuns) -> Iterator[tuple[int, int]]:
        """(spool, record) of each candidate near-dedup drops, against each other and ``earlier``; the signatures
        are read from the spools as clustering needs them, ids only for ties and the index."""
        spool_of, record, row, offset, length = (
            np.frombuffer(c, dtype=np.int64) for c in (self.spool, self.record, self.row, self.offset, self.length)
        )
        signatures = spool.SpoolSignatures(spool_dirs, spool_of, row, earlier.index.settings.num_perm)
        with spool.SpoolTexts(spool_dirs) as texts:
            keep = near_duplicate_keep(
                signatures,
                np.frombuffer(self.digests, dtype=np.uint8).reshape(-1, 32),
                np.frombuffer(self.prior, dtype=bool),
                lambda positions: _record_ids(spool_dirs, spool_of[positions], record[positions]),
                earlier,
                lambda j: texts.read(int(spool_of[j]), int(offset[j]), int(length[j])),
            )
        for j in np.flatnonzero(~keep):
            yield int(spool_of[j]), int(record[j])


def _record_ids(spool_dirs: list[Path], spool_of: np.ndarray, record: np.ndarray) -> list[str]:
    """The ids of records ``record[k]`` of spools ``spool_of[k]`` (ascending in k), read back from the spools."""
    ids: list[str] = []
    for n in np.unique(spool_of):
        wanted = iter(record[spool_of == n].tolist())
        i_next = next(wanted)
        for i, r in enumerate(spool.records(spool_dirs[n])):
            if i == i_next:
                ids.append(r.id)
                i_next = next(wanted, -1)
                if i_next < 0:
                    break
    return ids


def _write_splits(spool_dirs: list[Path], keep: list[bytearray], val_fraction: float) -> dict:
    """Each kept record to train or validation by the hash of its id (``split.py``); when none falls into
    validation (a tiny corpus), the training document with the smallest hash goes there, so validation loss
    always exists. Returns the bytes of text per split; empty when no document is left."""
    codes = [np.frombuffer(bytes(k), dtype=np.uint8).copy() for k in keep]
    size = {"train": 0, "val": 0}
    count = {"train": 0, "val": 0}
    smallest: tuple[float, int, int, int] | None = None  # (hash, spool, record, bytes) of a training document
    for n, directory in enumerate(spool_dirs):
        for i, r in enumerate(spool.records(directory)):
            if not codes[n][i]:
                continue
            split = "val" if is_validation(r.id, val_fraction) else "train"
            codes[n][i] = spool.VAL if split == "val" else spool.TRAIN
            size[split] += r.length
            count[split] += 1
            if split == "train" and (smallest is None or hash_fraction(r.id) < smallest[0]):
                smallest = (hash_fraction(r.id), n, i, r.length)
    if not count["val"] and count["train"] > 1 and smallest is not None:
        _, n, i, length = smallest
        codes[n][i] = spool.VAL
        size["train"] -= length
        size["val"] += length
    for directory, c in zip(spool_dirs, codes):
        c.tofile(directory / spool.SPLITS)
    return size if count["train"] + count["val"] else {}


def content_sha256(docs: Iterable[tuple[str, str]]) -> str:
    """The dataset's content hash (``data.expected_sha256``): every cleaned document's id and the SHA-256 of its
    text, in order (what ``decide`` computes from the spools)."""
    h = hashlib.sha256()
    for doc_id, text in docs:
        h.update(f"{len(doc_id)}:{doc_id}".encode() + text_digest(text))
    return h.hexdigest()


# ---------------------------------------------------------------- the tokenizer, on a sample


def pick_sample(ids: list[str], sizes: list[int], train_bytes: int) -> list[int]:
    """Positions of about ``train_bytes`` of documents (the last one may cross it), spread over the whole corpus
    rather than its first files: taken by a stable hash of their id, so the same on every run and in any order
    of the files; returned in the corpus's order."""
    if sum(sizes) <= train_bytes:
        return list(range(len(ids)))
    by_hash = sorted(range(len(ids)), key=lambda i: hash_fraction("tokenizer:" + ids[i]))
    picked, budget = [], train_bytes
    for i in by_hash:
        if budget <= 0:
            break
        picked.append(i)
        budget -= sizes[i]
    return sorted(picked)


def sample_texts(spool_dirs: list[Path], train_bytes: int) -> tuple[list[str], int]:
    """The tokenizer's training sample of the training split (``pick_sample``) and the number of documents it
    was drawn from; only the sample is read into memory."""
    where: list[tuple[int, int, int]] = []  # spool, offset, length
    ids: list[str] = []
    for n, directory in enumerate(spool_dirs):
        for r, code in zip(spool.records(directory), spool.split_codes(directory)):
            if code == spool.TRAIN:
                where.append((n, r.offset, r.length))
                ids.append(r.id)
    picked = pick_sample(ids, [w[2] for w in where], train_bytes)
    texts = []
    files = [open(d / spool.TEXTS, "rb") for d in spool_dirs]  # noqa: SIM115 (closed below)
    try:
        for i in picked:
            n, offset, length = where[i]
            files[n].seek(offset)
            texts.append(files[n].read(length).decode("utf-8", "surrogatepass"))
    finally:
        for f in files:
            f.close()
    return texts, len(ids)


def save_tokenizer(tokenizer: CodeTokenizer, directory: Path, tok: TokenizerConfig) -> None:
    extra = [tok.fim_prefix_token, tok.fim_middle_token, tok.fim_suffix_token, tok.fim_pad_token, *tok.extra_special_tokens]
    tokenizer.save(directory, extra, tok.model_max_length, tok.padding_side, tok.truncation_side)


def train_tokenizer_on_sample(spool_dirs: list[Path], tok: TokenizerConfig, directory: Path, log: Callable[[str], None]) -> None:
    """The tokenizer of ``tok``'s settings trained on a sample of at most ``tok.train_bytes``, saved in ``directory``."""
    texts, total = sample_texts(spool_dirs, tok.train_bytes)
    start = time.time()
    log(
        f"tokenizer: training {tok.kind} with {tok.vocab_size} tokens on {len(texts)} documents"
        + (f" (a sample of {total}, tokenizer.train_bytes={tok.train_bytes:,})" if len(texts) < total else "")
    )
    specials = SpecialTokens(
        tok.eos_token,
        tok.pad_token,
        tok.fim_prefix_token,
        tok.fim_middle_token,
        tok.fim_suffix_token,
        tok.fim_pad_token,
        list(tok.extra_special_tokens),
    )
    trained = train_tokenizer(tok.kind, texts, tok.vocab_size, specials, tok.min_frequency)
    save_tokenizer(trained, directory, tok)
    log(f"tokenizer: {len(trained)} tokens in {time.time() - start:.1f}s")


def fim_settings(rate: float, mode: str, spm_rate: float, tokenizer: CodeTokenizer) -> FimSettings | None:
    if rate == 0:
        return None
    ids = tokenizer.fim_ids
    missing = [role for role in ("prefix", "middle", "suffix") if ids[role] is None]
    if missing:
        raise DataError(
            f"data.fim_rate={rate} needs fill-in-the-middle tokens; the tokenizer has no "
            f"{', '.join('fim_' + m for m in missing)} token"
        )
    prefix, middle, suffix = ids["prefix"], ids["middle"], ids["suffix"]
    assert prefix is not None and middle is not None and suffix is not None  # checked just above
    return FimSettings(rate, mode, spm_rate, prefix, middle, suffix)


# ---------------------------------------------------------------- 3. tokenize, 4. the manifest


def tokenize_split(
    spool_dirs: list[Path], split: str, tokenizer_file: Path, num_workers: int, fim: FimSettings | None, total_bytes: int
) -> Iterator[list[int]]:
    """Stage 3: token ids of the split's documents of ``spool_dirs``, in order; fill-in-the-middle for training
    documents only (validation measures plain loss)."""
    code = spool.TRAIN if split == "train" else spool.VAL
    bar = progress_bar(f"tokenizing {split}", total_bytes)

    def docs() -> Iterator[tuple[str, str]]:
        count = 0
        for directory in spool_dirs:
            for doc_id, text in spool.documents(directory, code):
                bar.update(len(text))  # characters: close enough to bytes for the ETA of code
                count += 1
                if count % 256 == 0:
                    bar.set_postfix(docs=count, refresh=False)
                yield doc_id, text

    try:
        yield from tokenize_documents(docs(), tokenizer_file, num_workers, fim if split == "train" else None)
    finally:
        bar.close()


def write_manifest(
    directory: Path,
    splits: dict[str, SplitStats],
    tokenizer: CodeTokenizer,
    dtype: np.dtype,
    decisions: Decisions,
    source: str,
    fingerprint: str,
) -> dict:
    """Stage 4's end: ``manifest.json`` and ``contamination.jsonl`` beside the shards (``redactions.jsonl`` is
    already there, from ``decide``)."""
    as_dicts = {name: asdict(stats) for name, stats in splits.items()}
    manifest = {
        "format": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": len(tokenizer),
        "eos_id": tokenizer.eos_id,
        "tokenizer_sha256": tokenizer.sha256(),
        "source": source,
        "source_fingerprint": fingerprint,
        "splits": as_dicts,
        "cleaning": decisions.cleaning.to_dict(),
        "safety": decisions.safety.to_dict(),
        "content_sha256": decisions.content_sha256,  # what data.expected_sha256 of a named dataset pins
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (directory / CONTAMINATION).write_text("".join(json.dumps(r) + "\n" for r in decisions.safety.contaminated))
    manifest["sha256"] = hashlib.sha256(json.dumps(as_dicts, sort_keys=True).encode()).hexdigest()
    tmp = directory / f".tmp-{os.getpid()}-{MANIFEST}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, directory / MANIFEST)  # written last: a folder with a manifest is complete
    return manifest


# ---------------------------------------------------------------- the stages as both engines run them


@dataclass(frozen=True)
class PipelineSpec:
    """Everything a stage needs, as plain data: what a datatrove task receives (pickled) on another machine."""

    source: tuple  # (data.source, paths, patterns, text_field, id_field): reopened by each task
    scan: ScanSettings
    val_fraction: float
    description: str
    fingerprint: str
    index_dir: Path | None  # the near-dedup index of earlier runs
    expected_sha256: str | None
    tokenizer_dir: Path | None  # None: train one (``tok``) on a sample, into WORK/tokenizer
    tok: TokenizerConfig
    fim: tuple[float, str, float]  # data.fim_rate, fim_mode, fim_spm_rate
    num_workers: int  # worker processes of a stage run in-process (a datatrove task is itself the parallelism)


SCAN_DIR, TOKENS_DIR, OUTPUT_DIR, TOKENIZER_DIR = "scan", "tokens", "output", "tokenizer"  # inside the work folder


def spool_dirs(work: Path) -> list[Path]:
    """The spools of every shard, in shard order (= source order)."""
    return sorted(p for p in (work / SCAN_DIR).iterdir() if p.is_dir())


def decide_stage(work: Path, spec: PipelineSpec, log: Callable[[str], None]) -> Decisions:
    """Stage 2 over the work folder's spools, its findings written beside the output; then the tokenizer
    trained on a sample when none is given."""
    out = work / OUTPUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    dirs = spool_dirs(work)
    args = (dirs, spec.scan, spec.val_fraction, spec.description, out / REDACTIONS, spec.index_dir, spec.expected_sha256)
    if spec.num_workers > 0:
        # a process of its own: what stage 2 allocated (a few hundred bytes a document, and the heap it leaves
        # behind) goes back to the system when it exits, before the tokenization workers start beside this one
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            decisions = pool.submit(decide, *args).result()
    else:
        decisions = decide(*args)
    decisions.save(work / DECISIONS)
    if spec.tokenizer_dir is None and not (work / TOKENIZER_DIR / "tokenizer.json").exists():
        tmp = work / f".tmp-{TOKENIZER_DIR}"
        train_tokenizer_on_sample(dirs, spec.tok, tmp, log)
        os.replace(tmp, work / TOKENIZER_DIR)
    return decisions


def work_tokenizer(work: Path, spec: PipelineSpec) -> tuple[CodeTokenizer, Path, FimSettings | None]:
    directory = spec.tokenizer_dir or work / TOKENIZER_DIR
    tokenizer = CodeTokenizer.load(directory)
    return tokenizer, directory, fim_settings(*spec.fim, tokenizer)


def token_dtype_of(tokenizer: CodeTokenizer) -> np.dtype:
    return token_dtype(len(tokenizer))


def output_stage(work: Path, spec: PipelineSpec, splits: dict[str, SplitStats]) -> dict:
    """Stage 4's end: the manifest of WORK/output, from the decisions of stage 2."""
    tokenizer, _, _ = work_tokenizer(work, spec)
    decisions = Decisions.load(work / DECISIONS)
    dtype = token_dtype_of(tokenizer)
    return write_manifest(work / OUTPUT_DIR, splits, tokenizer, dtype, decisions, spec.description, spec.fingerprint)
