"""Recipe: from a data source to a tokenizer and packed shards, cached by what they depend on.

Cache keys: the cleaned corpus is keyed by the source's fingerprint and the cleaning and split
settings; the tokenizer by that plus the tokenizer settings; the shards by the corpus key plus
the tokenizer's SHA-256; fine-tuning rows by the record files, the SFT encoder's fingerprint (tokenizer and
chat template) and the row settings. Each cache entry is built in a work folder and renamed into place,
so an interrupted run never leaves a half entry behind.

The stages themselves (``data/stages.py``) stream through that work folder: here in this process and
``data.num_workers`` workers (``data.engine=local``), or as datatrove tasks over shards of the input
(``data.engine=datatrove`` / ``datatrove_slurm``, ``data/engine.py``); both give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from codex_ml.conf.schema import DataConfig, TokenizerConfig
from codex_ml.data.clean import CleaningConfig, CleaningReport
from codex_ml.data.decontaminate import BenchmarkError, load_benchmarks
from codex_ml.data.near_dedup import MinHashSettings
from codex_ml.data.pack import FORMAT_VERSION, MANIFEST, read_manifest, write_split
from codex_ml.data.redact import placeholders_with
from codex_ml.data.rows import Rows, pack_examples, truncate
from codex_ml.data.safety import SafetyReport, SafetySettings
from codex_ml.data.sources import open_source, source_bytes
from codex_ml.data.split import is_validation
from codex_ml.data.stages import (
    DECISIONS,
    OUTPUT_DIR,
    REDACTIONS,
    SCAN_DIR,
    TOKENIZER_DIR,
    DataError,
    Decisions,
    PipelineSpec,
    ScanSettings,
    decide_stage,
    fim_settings,
    output_stage,
    pick_sample,
    save_tokenizer,
    scan_shard,
    token_dtype_of,
    tokenize_split,
    work_tokenizer,
)
from codex_ml.models.loss import IGNORE_INDEX
from codex_ml.tokenizer.core import TOKENIZER_FILE, CodeTokenizer

if TYPE_CHECKING:
    from codex_ml.data.clean import Document
    from codex_ml.data.sft import Example

__all__ = ["DataError", "PreparedData", "PreparedRows", "cache_root", "prepare_data", "prepare_sft", "tokenizer_sample"]


@dataclass
class PreparedData:
    directory: Path  # the shards and their manifest
    tokenizer: CodeTokenizer
    tokenizer_dir: Path
    manifest: dict

    @property
    def report(self) -> CleaningReport:
        return CleaningReport.from_dict(self.manifest["cleaning"])


def cache_root(data: DataConfig) -> Path:
    if data.cache_dir:
        return Path(data.cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "codex-ml"


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _cleaning_config(data: DataConfig) -> CleaningConfig:
    return CleaningConfig(data.max_file_bytes, data.max_line_length, data.min_chars, data.dedup, data.skip_generated)


def _safety_settings(data: DataConfig) -> SafetySettings:
    return SafetySettings(
        data.redact,
        tuple(data.redact_detectors),
        tuple(sorted(dict(data.redact_placeholders).items())),
        data.near_dedup,
        MinHashSettings(data.near_dedup_ngram, data.near_dedup_num_perm, data.near_dedup_threshold),
        tuple(data.decontaminate),
        data.decontaminate_ngram,
        data.decontaminate_threshold,
    )


def tokenizer_sample(docs: list[Document], train_bytes: int) -> list[str]:
    """About ``train_bytes`` of UTF-8 text from ``docs``, the sample the tokenizer trains on (``stages.pick_sample``)."""
    sizes = [len(d.text.encode("utf-8", "surrogatepass")) for d in docs]
    return [docs[i].text for i in pick_sample([d.id for d in docs], sizes, train_bytes)]


class _Corpus:
    """The source and every setting its prepared data depends on, checked (and the benchmarks read) up front."""

    def __init__(self, data: DataConfig, log: Callable[[str], None]) -> None:
        try:
            self.source = open_source(data.source, list(data.paths), list(data.patterns), data.text_field, data.id_field)
        except ValueError as e:
            raise DataError(str(e)) from None
        self.data, self.log = data, log
        # every safety input is checked (and the benchmarks read) now, before any document is
        self.safety = _safety_settings(data)
        try:
            placeholders_with(dict(self.safety.placeholders))
            self.benchmark_items = load_benchmarks(
                self.safety.benchmarks, list(data.decontaminate_fields), data.decontaminate_id_field
            )
        except (BenchmarkError, ValueError) as e:
            raise DataError(str(e)) from None
        benchmarks = [(b.benchmark, b.item, b.field, b.text) for b in self.benchmark_items]
        self.key = _key(
            FORMAT_VERSION,
            self.source.fingerprint(),
            asdict(_cleaning_config(data)),
            data.val_fraction,
            asdict(self.safety),
            hashlib.sha256(json.dumps(benchmarks).encode()).hexdigest(),
            data.expected_sha256,
        )

    def index_dir(self) -> Path:
        """The near-dedup index of this source (its paths, not their content): later runs over the same folders
        deduplicate new files against the documents kept before."""
        d = self.data
        return (
            cache_root(d)
            / "near_dedup"
            / _key(d.source, list(d.paths), list(d.patterns), d.text_field, d.id_field, asdict(self.safety.minhash))
        )

    def spec(self, tokenizer_dir: Path | None, tok: TokenizerConfig) -> PipelineSpec:
        d = self.data
        return PipelineSpec(
            (d.source, list(d.paths), list(d.patterns), d.text_field, d.id_field),
            ScanSettings(_cleaning_config(d), self.safety, tuple(self.benchmark_items)),
            d.val_fraction,
            self.source.description,
            self.source.fingerprint(),
            self.index_dir() if self.safety.near_dedup else None,
            d.expected_sha256,
            tokenizer_dir,
            tok,
            (d.fim_rate, d.fim_mode, d.fim_spm_rate),
            d.num_workers,
        )


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished cache entry into place; another process may have won the race."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenizer_settings(tok: TokenizerConfig) -> dict:
    return {k: v for k, v in asdict(tok).items() if k not in ("path", "padding_side", "truncation_side", "model_max_length")}


def _known_tokenizer(corpus: _Corpus, tok: TokenizerConfig, root: Path, given: Path | None) -> Path | None:
    """The tokenizer to use without training one: the given one, ``tokenizer.path``, or the cached one."""
    if given is not None:
        return Path(given)
    if tok.path:
        return Path(tok.path)
    cached = root / "tokenizers" / _key(corpus.key, _tokenizer_settings(tok))
    return cached if (cached / TOKENIZER_FILE).exists() else None


def _entry(root: Path, corpus: _Corpus, tokenizer: CodeTokenizer) -> Path:
    d = corpus.data
    return root / "data" / _key(corpus.key, tokenizer.sha256(), fim_settings(d.fim_rate, d.fim_mode, d.fim_spm_rate, tokenizer))


def _work_dir(root: Path, corpus: _Corpus, tok: TokenizerConfig, tokenizer_dir: Path | None) -> Path:
    d = corpus.data
    tokenizer = CodeTokenizer.load(tokenizer_dir).sha256() if tokenizer_dir else _tokenizer_settings(tok)
    engine = (d.engine, d.engine_workers if d.engine != "local" else 0)
    return root / "work" / _key(corpus.key, tokenizer, d.fim_rate, d.fim_mode, d.fim_spm_rate, engine)


def _log_decisions(decisions: Decisions | dict, data: DataConfig, log: Callable[[str], None]) -> None:
    cleaning, safety = (
        (decisions.cleaning, decisions.safety)
        if isinstance(decisions, Decisions)
        else (CleaningReport.from_dict(decisions["cleaning"]), SafetyReport.from_dict(decisions["safety"]))
    )
    log(cleaning.summary())
    log(safety.summary(data.redact_report))


def _run_local(work: Path, corpus: _Corpus, spec: PipelineSpec, log: Callable[[str], None], tokenizer_only: bool = False) -> None:
    """Every stage in this process (and ``data.num_workers`` workers), on the whole source as one shard."""
    shutil.rmtree(work, ignore_errors=True)  # a local run never resumes a half-done work folder
    spool = work / SCAN_DIR / "00000"
    scan_shard(corpus.source, spec.scan, spec.num_workers, spool, source_bytes(corpus.source))
    decisions = decide_stage(work, spec, log)
    _log_decisions(decisions, corpus.data, log)
    if tokenizer_only:
        return
    tokenizer, directory, fim = work_tokenizer(work, spec)
    dtype = token_dtype_of(tokenizer)
    splits = {
        split: write_split(
            tokenize_split([spool], split, directory / TOKENIZER_FILE, spec.num_workers, fim, decisions.bytes[split]),
            work / OUTPUT_DIR,
            split,
            tokenizer.eos_id,
            dtype,
        )
        for split in ("train", "val")
    }
    output_stage(work, spec, splits)


def _publish_tokenizer(work: Path, corpus: _Corpus, tok: TokenizerConfig, root: Path) -> Path:
    final = root / "tokenizers" / _key(corpus.key, _tokenizer_settings(tok))
    final.parent.mkdir(parents=True, exist_ok=True)
    _publish(work / TOKENIZER_DIR, final)
    return final


def train_tokenizer_only(data: DataConfig, tok: TokenizerConfig, out: Path, log: Callable[[str], None] = print) -> CodeTokenizer:
    """`codex-ml tokenizer`: train (or reuse from the cache) and save into ``out``."""
    corpus = _Corpus(data, log)
    root = cache_root(data)
    cached = _known_tokenizer(corpus, tok, root, None)
    if cached is not None:
        log(f"tokenizer: reusing {cached}")
    else:
        work = _work_dir(root, corpus, tok, None).with_suffix(".tokenizer")
        log(f"reading {corpus.source.description}")
        _run_local(work, corpus, corpus.spec(None, tok), log, tokenizer_only=True)
        cached = _publish_tokenizer(work, corpus, tok, root)
        shutil.rmtree(work, ignore_errors=True)
    tokenizer = CodeTokenizer.load(cached)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(cached, out)
    # padding and truncation settings are not part of the cache key: write them as asked
    save_tokenizer(tokenizer, out, tok)
    return tokenizer


def prepare_data(
    data: DataConfig, tok: TokenizerConfig, tokenizer_dir: Path | None = None, log: Callable[[str], None] = print
) -> PreparedData:
    """Tokenizer plus packed train/validation shards for ``data``; reuses the cache when nothing changed.

    ``tokenizer_dir``: use this tokenizer (a resumed run's, or a Hugging Face model's) instead of
    training or loading one from ``tok``.
    """
    root = cache_root(data)
    if data.engine != "local":
        from codex_ml.data.engine import check_available

        check_available()
    corpus = _Corpus(data, log)
    known = _known_tokenizer(corpus, tok, root, tokenizer_dir)
    if known is not None:
        tokenizer = CodeTokenizer.load(known)
        final = _entry(root, corpus, tokenizer)
        if (final / MANIFEST).exists():
            return _reused(final, tokenizer, known, data, log)
        if tokenizer_dir is None and not tok.path:
            log(f"tokenizer: reusing {known}")
    work = _work_dir(root, corpus, tok, known)
    spec = corpus.spec(known, tok)
    start = time.time()
    if not (work / OUTPUT_DIR / MANIFEST).exists():  # a Slurm run's jobs may have finished it since
        log(f"reading {corpus.source.description}")
        if data.engine == "local":
            _run_local(work, corpus, spec, log)
        else:
            from codex_ml.data.engine import run_datatrove

            run_datatrove(work, spec, data, log)
            if not (work / OUTPUT_DIR / MANIFEST).exists():
                raise DataError(
                    f"data.engine={data.engine}: the jobs are submitted (logs in {work / 'logs'}); "
                    "run the same command again once they have finished, and it picks up their output"
                )
            _log_decisions(json.loads((work / DECISIONS).read_text()), data, log)
    if known is None:
        known = _publish_tokenizer(work, corpus, tok, root)
    tokenizer = CodeTokenizer.load(known)
    final = _entry(root, corpus, tokenizer)
    final.parent.mkdir(parents=True, exist_ok=True)
    _publish(work / OUTPUT_DIR, final)
    shutil.rmtree(work, ignore_errors=True)
    manifest = read_manifest(final)
    if data.redact_report:
        shutil.copyfile(final / REDACTIONS, Path(data.redact_report).expanduser())
    splits = manifest["splits"]
    log(
        f"data: {splits['train']['tokens']:,} train and {splits['val']['tokens']:,} validation tokens "
        f"({splits['train']['documents']} / {splits['val']['documents']} documents, {manifest['dtype']}) "
        f"in {time.time() - start:.1f}s -> {final}"
    )
    return PreparedData(final, tokenizer, known, manifest)


def _reused(
    final: Path, tokenizer: CodeTokenizer, tokenizer_dir: Path, data: DataConfig, log: Callable[[str], None]
) -> PreparedData:
    manifest = read_manifest(final)
    log(f"data: reusing {final}")
    _log_decisions(manifest, data, log)
    if data.redact_report:  # the findings of the run that made the entry
        shutil.copyfile(final / REDACTIONS, Path(data.redact_report).expanduser())
    return PreparedData(final, tokenizer, tokenizer_dir, manifest)


# ---------------------------------------------------------------- supervised fine-tuning rows


@dataclass
class PreparedRows:
    directory: Path
    train: Rows
    val: Rows
    manifest: dict


def _save_rows(rows: Rows, directory: Path, split: str) -> None:
    for name in ("input_ids", "labels", "position_ids", "segments"):
        np.save(directory / f"{split}_{name}.npy", getattr(rows, name))


def _rows_sha256(rows: Rows) -> str:
    """SHA-256 of a split's rows themselves (every array, its dtype and shape), not of their counts."""
    h = hashlib.sha256()
    for name in ("input_ids", "labels", "position_ids", "segments"):
        array = np.ascontiguousarray(getattr(rows, name))
        h.update(f"{name} {array.dtype.str} {array.shape}\n".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def _load_rows(directory: Path, split: str) -> Rows:
    arrays = {
        name: np.load(directory / f"{split}_{name}.npy", mmap_mode="r")
        for name in ("input_ids", "labels", "position_ids", "segments")
    }
    return Rows(**arrays)


def prepare_sft(
    data: DataConfig,
    tokenizer: CodeTokenizer,
    tokenizer_dir: Path,
    seq_len: int,
    truncation_side: str = "right",
    log: Callable[[str], None] = print,
) -> PreparedRows:
    """Fine-tuning examples from JSONL records, split by record id, packed into rows; cached.

    The cache key covers every input the rows depend on: the files (path, size, modification time),
    the encoder's fingerprint (tokenizer, chat template, special tokens), the padding id, the row
    length, packing, the split and the truncation side.
    """
    from codex_ml.data.sft import SftEncoder, read_records
    from codex_ml.data.sources import _stat_fingerprint

    files = []
    for given in data.paths:
        p = Path(given).expanduser()
        if not p.exists():
            raise DataError(f"data path {given} does not exist")
        files += [(f.name, f) for f in ([p] if p.is_file() else sorted(p.rglob("*.jsonl")))]
    encoder = SftEncoder(tokenizer_dir)
    key = _key(
        FORMAT_VERSION,
        "sft",
        _stat_fingerprint(files),
        encoder.fingerprint(),
        tokenizer.pad_id,
        seq_len,
        data.pack,
        data.val_fraction,
        data.id_field,
        truncation_side,
    )
    final = cache_root(data) / "sft" / key
    if (final / MANIFEST).exists():
        log(f"data: reusing {final}")
        return PreparedRows(final, _load_rows(final, "train"), _load_rows(final, "val"), read_manifest(final))
    train: list[Example] = []
    val: list[Example] = []
    truncated = 0
    for where, record in read_records(list(data.paths)):
        example = encoder.encode(where, record)
        example, cut = truncate(example, seq_len + 1, truncation_side)
        truncated += cut
        doc_id = str(record[data.id_field]) if data.id_field and data.id_field in record else where.rsplit("/", 1)[-1]
        (val if is_validation(doc_id, data.val_fraction) else train).append(example)
    if not train:
        raise DataError(f"no training examples in {', '.join(data.paths)}")
    if not val:
        val.append(train.pop())
    pad = tokenizer.pad_id
    train_rows, val_rows = pack_examples(train, seq_len, pad, data.pack), pack_examples(val, seq_len, pad, data.pack)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_rows(train_rows, tmp, "train")
    _save_rows(val_rows, tmp, "val")
    trained = lambda rows: int((rows.labels != IGNORE_INDEX).sum())
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "kind": "sft",
        "seq_len": seq_len,
        "pack": data.pack,
        "tokenizer_sha256": tokenizer.sha256(),
        "truncated": truncated,
        "splits": {
            name: {"examples": len(examples), "rows": len(rows), "target_tokens": trained(rows), "sha256": _rows_sha256(rows)}
            for name, examples, rows in (("train", train, train_rows), ("val", val, val_rows))
        },
        "source": ", ".join(data.paths),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # the dataset's hash: the rows' own hashes are part of what it covers, so different data differs
    manifest["sha256"] = hashlib.sha256(json.dumps(manifest["splits"], sort_keys=True).encode()).hexdigest()
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    final.parent.mkdir(parents=True, exist_ok=True)
    _publish(tmp, final)
    s = manifest["splits"]
    log(
        f"data: {s['train']['examples']} training examples in {s['train']['rows']} rows of {seq_len} "
        f"({'packed' if data.pack else 'one per row'}), {s['val']['examples']} validation; {truncated} truncated"
    )
    return PreparedRows(final, _load_rows(final, "train"), _load_rows(final, "val"), read_manifest(final))
