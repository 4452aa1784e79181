"""Recipe: from a data source to a tokenizer and packed shards, cached by what they depend on.

Cache keys: the cleaned corpus is keyed by the source's fingerprint and the cleaning and split
settings; the tokenizer by that plus the tokenizer settings; the shards by the corpus key plus
the tokenizer's SHA-256; fine-tuning rows by the record files, the SFT encoder's fingerprint (tokenizer and
chat template) and the row settings. Each cache entry is written to a temporary folder and renamed into place,
so an interrupted run never leaves a half entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from tqdm import tqdm

from codex_ml.conf.schema import DataConfig, TokenizerConfig
from codex_ml.data.clean import CleaningConfig, CleaningReport, Document, clean_documents
from codex_ml.data.decontaminate import BenchmarkError, load_benchmarks
from codex_ml.data.fim import FimSettings
from codex_ml.data.near_dedup import MinHashSettings
from codex_ml.data.pack import FORMAT_VERSION, MANIFEST, read_manifest, token_dtype, tokenize_documents, write_split
from codex_ml.data.redact import placeholders_with
from codex_ml.data.rows import Rows, pack_examples, truncate
from codex_ml.data.safety import SafetyReport, SafetySettings, make_safe
from codex_ml.data.sources import open_source
from codex_ml.data.split import hash_fraction, is_validation, split_documents
from codex_ml.errors import CodexError
from codex_ml.models.loss import IGNORE_INDEX
from codex_ml.tokenizer.core import TOKENIZER_FILE, CodeTokenizer, SpecialTokens
from codex_ml.tokenizer.train import train_tokenizer

if TYPE_CHECKING:
    from codex_ml.data.sft import Example

_T = TypeVar("_T")


class DataError(CodexError):
    """Data that cannot be trained on: missing paths, nothing left after cleaning."""


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


REDACTIONS, CONTAMINATION = "redactions.jsonl", "contamination.jsonl"  # beside the manifest


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def content_sha256(docs: list[Document]) -> str:
    """The dataset's content hash (``data.expected_sha256``): every cleaned document's id and text, in order."""
    h = hashlib.sha256()
    for d in docs:
        h.update(f"{len(d.id)}:{d.id}{len(d.text)}:".encode())
        h.update(d.text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


class _Corpus:
    """Reads, cleans and splits the source once, on first use."""

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
        self._split: tuple[list[Document], list[Document]] | None = None
        self.report = CleaningReport()
        self.safety_report = SafetyReport()
        self.redactions: list[dict] = []

    def index_dir(self) -> Path:
        """The near-dedup index of this source (its paths, not their content): later runs over the same folders
        deduplicate new files against the documents kept before."""
        d = self.data
        return (
            cache_root(d)
            / "near_dedup"
            / _key(d.source, list(d.paths), list(d.patterns), d.text_field, d.id_field, asdict(self.safety.minhash))
        )

    def split(self) -> tuple[list[Document], list[Document]]:
        if self._split is None:
            self.log(f"reading {self.source.description}")
            try:
                docs = list(clean_documents(self.source, _cleaning_config(self.data), self.report))
            except ValueError as e:  # a malformed record in a jsonl file, a dataset without the text column
                raise DataError(str(e)) from None
            self.log(self.report.summary())
            if not docs:
                raise DataError(
                    f"no documents left after cleaning {self.source.description}: "
                    + "; ".join(self.report.summary().splitlines()[1:])
                )
            self.content_sha256 = content_sha256(docs)
            if self.data.expected_sha256 and self.content_sha256 != self.data.expected_sha256:
                raise DataError(
                    f"{self.source.description}: content hash {self.content_sha256} differs from the "
                    f"expected data.expected_sha256={self.data.expected_sha256}"
                )
            docs = make_safe(
                docs,
                self.safety,
                self.benchmark_items,
                self.data.num_workers,
                self.safety_report,
                self.redactions,
                self.index_dir() if self.safety.near_dedup else None,
            )
            self.log(self.safety_report.summary(self.data.redact_report))
            if self.data.redact_report:
                _write_jsonl(Path(self.data.redact_report).expanduser(), self.redactions)
            if not docs:
                raise DataError(f"no documents left after redaction, decontamination and near-dedup of {self.source.description}")
            self._split = split_documents(docs, self.data.val_fraction)
        return self._split


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished cache entry into place; another process may have won the race."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenizer(corpus: _Corpus, tok: TokenizerConfig, root: Path, log: Callable[[str], None]) -> tuple[CodeTokenizer, Path]:
    if tok.path:
        return CodeTokenizer.load(tok.path), Path(tok.path)
    settings = {k: v for k, v in asdict(tok).items() if k not in ("path", "padding_side", "truncation_side", "model_max_length")}
    final = root / "tokenizers" / _key(corpus.key, settings)
    if (final / TOKENIZER_FILE).exists():
        log(f"tokenizer: reusing {final}")
        return CodeTokenizer.load(final), final
    train, _ = corpus.split()
    texts = tokenizer_sample(train, tok.train_bytes)
    start = time.time()
    log(
        f"tokenizer: training {tok.kind} with {tok.vocab_size} tokens on {len(texts)} documents"
        + (f" (a sample of {len(train)}, tokenizer.train_bytes={tok.train_bytes:,})" if len(texts) < len(train) else "")
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
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_tokenizer(trained, tmp, tok)
    final.parent.mkdir(parents=True, exist_ok=True)
    _publish(tmp, final)
    log(f"tokenizer: {len(trained)} tokens in {time.time() - start:.1f}s")
    return CodeTokenizer.load(final), final


def tokenizer_sample(docs: list[Document], train_bytes: int) -> list[str]:
    """About ``train_bytes`` of UTF-8 text from ``docs`` (the last document may cross it), a sample spread over the
    whole corpus rather than its first files: documents taken by a stable hash of their id, so the sample is the
    same on every run and does not depend on the order of the files."""
    sizes = [len(d.text.encode("utf-8", "surrogatepass")) for d in docs]
    if sum(sizes) <= train_bytes:
        return [d.text for d in docs]
    # the documents in the order of their hash, up to the budget; then back in the corpus's order
    by_hash = sorted(range(len(docs)), key=lambda i: hash_fraction("tokenizer:" + docs[i].id))
    picked, budget = [], train_bytes
    for i in by_hash:
        if budget <= 0:
            break
        picked.append(i)
        budget -= sizes[i]
    return [docs[i].text for i in sorted(picked)]


def save_tokenizer(tokenizer: CodeTokenizer, directory: Path, tok: TokenizerConfig) -> None:
    extra = [tok.fim_prefix_token, tok.fim_middle_token, tok.fim_suffix_token, tok.fim_pad_token, *tok.extra_special_tokens]
    tokenizer.save(directory, extra, tok.model_max_length, tok.padding_side, tok.truncation_side)


def train_tokenizer_only(data: DataConfig, tok: TokenizerConfig, out: Path, log: Callable[[str], None] = print) -> CodeTokenizer:
    """`codex-ml tokenizer`: train (or reuse from the cache) and save into ``out``."""
    corpus = _Corpus(data, log)
    tokenizer, cached = _tokenizer(corpus, tok, cache_root(data), log)
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
    corpus = _Corpus(data, log)
    if tokenizer_dir is not None:
        tokenizer = CodeTokenizer.load(tokenizer_dir)
    else:
        tokenizer, tokenizer_dir = _tokenizer(corpus, tok, root, log)
    fim = fim_settings(data, tokenizer)
    final = root / "data" / _key(corpus.key, tokenizer.sha256(), fim)
    if (final / MANIFEST).exists():
        manifest = read_manifest(final)
        log(f"data: reusing {final}")
        log(CleaningReport.from_dict(manifest["cleaning"]).summary())
        log(SafetyReport.from_dict(manifest["safety"]).summary(data.redact_report))
        if data.redact_report:  # the findings of the run that made the entry
            shutil.copyfile(final / REDACTIONS, Path(data.redact_report).expanduser())
        return PreparedData(final, tokenizer, Path(tokenizer_dir), manifest)

    train, val = corpus.split()
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = token_dtype(len(tokenizer))
    splits = {}
    start = time.time()
    for name, docs in (("train", train), ("val", val)):
        bar = tqdm(total=len(docs), desc=f"tokenizing {name}", unit="doc", disable=None, file=sys.stderr)
        # fill-in-the-middle applies to training documents only: validation measures plain loss
        token_lists = _counted(
            tokenize_documents(
                ((d.id, d.text) for d in docs), tokenizer_dir / TOKENIZER_FILE, data.num_workers, fim if name == "train" else None
            ),
            bar,
        )
        stats = write_split(token_lists, tmp, name, tokenizer.eos_id, dtype)
        bar.close()
        splits[name] = asdict(stats)
    manifest = {
        "format": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": len(tokenizer),
        "eos_id": tokenizer.eos_id,
        "tokenizer_sha256": tokenizer.sha256(),
        "source": corpus.source.description,
        "source_fingerprint": corpus.source.fingerprint(),
        "splits": splits,
        "cleaning": corpus.report.to_dict(),
        "safety": corpus.safety_report.to_dict(),
        "content_sha256": corpus.content_sha256,  # what data.expected_sha256 of a named dataset pins
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_jsonl(tmp / REDACTIONS, corpus.redactions)
    _write_jsonl(tmp / CONTAMINATION, corpus.safety_report.contaminated)
    manifest["sha256"] = hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    final.parent.mkdir(parents=True, exist_ok=True)
    _publish(tmp, final)
    log(
        f"data: {splits['train']['tokens']:,} train and {splits['val']['tokens']:,} validation tokens "
        f"({splits['train']['documents']} / {splits['val']['documents']} documents, {dtype.name}) "
        f"in {time.time() - start:.1f}s -> {final}"
    )
    return PreparedData(final, tokenizer, Path(tokenizer_dir), read_manifest(final))


def fim_settings(data: DataConfig, tokenizer: CodeTokenizer) -> FimSettings | None:
    if data.fim_rate == 0:
        return None
    ids = tokenizer.fim_ids
    missing = [role for role in ("prefix", "middle", "suffix") if ids[role] is None]
    if missing:
        raise DataError(
            f"data.fim_rate={data.fim_rate} needs fill-in-the-middle tokens; the tokenizer has no "
            f"{', '.join('fim_' + m for m in missing)} token"
        )
    prefix, middle, suffix = ids["prefix"], ids["middle"], ids["suffix"]
    assert prefix is not None and middle is not None and suffix is not None  # checked just above
    return FimSettings(data.fim_rate, data.fim_mode, data.fim_spm_rate, prefix, middle, suffix)


def _counted(items: Iterable[_T], bar: tqdm) -> Iterator[_T]:
    for item in items:
        bar.update(1)
        yield item


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
