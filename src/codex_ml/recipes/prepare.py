"""Recipe: from a data source to a tokenizer and packed shards, cached by what they depend on.

Cache keys: the cleaned corpus is keyed by the source's fingerprint and the cleaning and split
settings; the tokenizer by that plus the tokenizer settings; the shards by the corpus key plus
the tokenizer's SHA-256. Each cache entry is written to a temporary folder and renamed into place,
so an interrupted run never leaves a half entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from codex_ml.conf.schema import DataConfig, TokenizerConfig
from codex_ml.data.clean import CleaningConfig, CleaningReport, Document, clean_documents
from codex_ml.data.fim import FimSettings
from codex_ml.data.pack import FORMAT_VERSION, MANIFEST, read_manifest, token_dtype, tokenize_documents, write_split
from codex_ml.data.rows import Rows, pack_examples, truncate
from codex_ml.data.sources import open_source
from codex_ml.data.split import is_validation, split_documents
from codex_ml.errors import CodexError
from codex_ml.tokenizer.core import TOKENIZER_FILE, CodeTokenizer, SpecialTokens
from codex_ml.tokenizer.train import train_tokenizer


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


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _cleaning_config(data: DataConfig) -> CleaningConfig:
    return CleaningConfig(data.max_file_bytes, data.max_line_length, data.min_chars, data.dedup)


class _Corpus:
    """Reads, cleans and splits the source once, on first use."""

    def __init__(self, data: DataConfig, log) -> None:
        try:
            self.source = open_source(data.source, list(data.paths), list(data.patterns), data.text_field, data.id_field)
        except ValueError as e:
            raise DataError(str(e)) from None
        self.data, self.log = data, log
        self.key = _key(FORMAT_VERSION, self.source.fingerprint(), asdict(_cleaning_config(data)), data.val_fraction)
        self._split: tuple[list[Document], list[Document]] | None = None
        self.report = CleaningReport()

    def split(self) -> tuple[list[Document], list[Document]]:
        if self._split is None:
            self.log(f"reading {self.source.description}")
            try:
                docs = list(clean_documents(self.source, _cleaning_config(self.data), self.report))
            except ValueError as e:  # a malformed record in a jsonl file, a dataset without the text column
                raise DataError(str(e)) from None
            self.log(self.report.summary())
            if not docs:
                raise DataError(f"no documents left after cleaning {self.source.description}: " + "; ".join(
                    self.report.summary().splitlines()[1:]))
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


def _tokenizer(corpus: _Corpus, tok: TokenizerConfig, root: Path, log) -> tuple[CodeTokenizer, Path]:
    if tok.path:
        return CodeTokenizer.load(tok.path), Path(tok.path)
    settings = {k: v for k, v in asdict(tok).items() if k not in ("path", "padding_side", "truncation_side", "model_max_length")}
    final = root / "tokenizers" / _key(corpus.key, settings)
    if (final / TOKENIZER_FILE).exists():
        log(f"tokenizer: reusing {final}")
        return CodeTokenizer.load(final), final
    train, _ = corpus.split()
    texts, budget = [], tok.max_train_bytes
    for d in train:
        if budget <= 0:
            break
        texts.append(d.text)
        budget -= len(d.text)
    start = time.time()
    log(f"tokenizer: training {tok.kind} with {tok.vocab_size} tokens on {len(texts)} documents")
    specials = SpecialTokens(tok.eos_token, tok.pad_token, tok.fim_prefix_token, tok.fim_middle_token,
                             tok.fim_suffix_token, tok.fim_pad_token, list(tok.extra_special_tokens))
    trained = train_tokenizer(tok.kind, texts, tok.vocab_size, specials, tok.min_frequency)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_tokenizer(trained, tmp, tok)
    final.parent.mkdir(parents=True, exist_ok=True)
    _publish(tmp, final)
    log(f"tokenizer: {len(trained)} tokens in {time.time() - start:.1f}s")
    return CodeTokenizer.load(final), final


def save_tokenizer(tokenizer: CodeTokenizer, directory: Path, tok: TokenizerConfig) -> None:
    extra = [tok.fim_prefix_token, tok.fim_middle_token, tok.fim_suffix_token, tok.fim_pad_token,
             *tok.extra_special_tokens]
    tokenizer.save(directory, extra, tok.model_max_length, tok.padding_side, tok.truncation_side)


def train_tokenizer_only(data: DataConfig, tok: TokenizerConfig, out: Path, log=print) -> CodeTokenizer:
    """`codex-ml tokenizer`: train (or reuse from the cache) and save into ``out``."""
    corpus = _Corpus(data, log)
    tokenizer, cached = _tokenizer(corpus, tok, cache_root(data), log)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(cached, out)
    # padding and truncation settings are not part of the cache key: write them as asked
    save_tokenizer(tokenizer, out, tok)
    return tokenizer


def prepare_data(data: DataConfig, tok: TokenizerConfig, tokenizer_dir: Path | None = None, log=print) -> PreparedData:
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
        token_lists = _counted(tokenize_documents(((d.id, d.text) for d in docs), tokenizer_dir / TOKENIZER_FILE,
                                                  data.num_workers, fim if name == "train" else None), bar)
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
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    manifest["sha256"] = hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    final.parent.mkdir(parents=True, exist_ok=True)
    _publish(tmp, final)
    log(f"data: {splits['train']['tokens']:,} train and {splits['val']['tokens']:,} validation tokens "
        f"({splits['train']['documents']} / {splits['val']['documents']} documents, {dtype.name}) "
        f"in {time.time() - start:.1f}s -> {final}")
    return PreparedData(final, tokenizer, Path(tokenizer_dir), read_manifest(final))


def fim_settings(data: DataConfig, tokenizer: CodeTokenizer) -> FimSettings | None:
    if data.fim_rate == 0:
        return None
    ids = tokenizer.fim_ids
    missing = [role for role in ("prefix", "middle", "suffix") if ids[role] is None]
    if missing:
        raise DataError(f"data.fim_rate={data.fim_rate} needs fill-in-the-middle tokens; the tokenizer has no "
                        f"{', '.join('fim_' + m for m in missing)} token")
    return FimSettings(data.fim_rate, data.fim_mode, data.fim_spm_rate, ids["prefix"], ids["middle"], ids["suffix"])


def _counted(items, bar):
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


def _load_rows(directory: Path, split: str) -> Rows:
    arrays = {name: np.load(directory / f"{split}_{name}.npy", mmap_mode="r")
              for name in ("input_ids", "labels", "position_ids", "segments")}
    return Rows(**arrays)


def prepare_sft(data: DataConfig, tokenizer: CodeTokenizer, tokenizer_dir: Path, seq_len: int,
                truncation_side: str = "right", log=print) -> PreparedRows:
    """Fine-tuning examples from JSONL records, split by record id, packed into rows; cached."""
    from codex_ml.data.sft import SftEncoder, read_records
    from codex_ml.data.sources import _stat_fingerprint

    files = []
    for given in data.paths:
        p = Path(given).expanduser()
        if not p.exists():
            raise DataError(f"data path {given} does not exist")
        files += [(f.name, f) for f in ([p] if p.is_file() else sorted(p.rglob("*.jsonl")))]
    key = _key(FORMAT_VERSION, "sft", _stat_fingerprint(files), tokenizer.sha256(), seq_len, data.pack,
               data.val_fraction, data.id_field, truncation_side)
    final = cache_root(data) / "sft" / key
    if (final / MANIFEST).exists():
        log(f"data: reusing {final}")
        return PreparedRows(final, _load_rows(final, "train"), _load_rows(final, "val"), read_manifest(final))
    encoder = SftEncoder(tokenizer_dir)
    train, val, truncated = [], [], 0
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
    trained = lambda rows: int((rows.labels != -100).sum())
    manifest = {
        "format": FORMAT_VERSION, "kind": "sft", "seq_len": seq_len, "pack": data.pack,
        "tokenizer_sha256": tokenizer.sha256(), "truncated": truncated,
        "splits": {"train": {"examples": len(train), "rows": len(train_rows), "target_tokens": trained(train_rows)},
                   "val": {"examples": len(val), "rows": len(val_rows), "target_tokens": trained(val_rows)}},
        "source": ", ".join(data.paths), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    manifest["sha256"] = hashlib.sha256(json.dumps(manifest["splits"], sort_keys=True).encode()).hexdigest()
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    final.parent.mkdir(parents=True, exist_ok=True)
    _publish(tmp, final)
    s = manifest["splits"]
    log(f"data: {s['train']['examples']} training examples in {s['train']['rows']} rows of {seq_len} "
        f"({'packed' if data.pack else 'one per row'}), {s['val']['examples']} validation; {truncated} truncated")
    return PreparedRows(final, _load_rows(final, "train"), _load_rows(final, "val"), read_manifest(final))
