"""Tokenize documents in a pool of worker processes and write packed token shards.

A split is one stream of tokens (each document followed by end-of-text) cut into shards of raw
``uint16`` (``uint32`` for vocabularies over 65,536) that are memory-mapped for training. The
manifest lists every shard with its token count and SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codex_ml.data.fim import FimSettings, fim_encode
from codex_ml.errors import CodexError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHARD_TOKENS = 1 << 26  # 64M tokens: 128 MB at uint16


class ShardIntegrityError(CodexError):
    """A shard whose size or checksum differs from the manifest."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---------------------------------------------------------------- tokenizing in workers

_worker_tokenizer = None
_worker_fim = None


def _init_worker(tokenizer_file: str, fim: FimSettings | None = None) -> None:
    global _worker_tokenizer, _worker_fim
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_file(tokenizer_file)
    _worker_tokenizer.encode_special_tokens = True  # "<|endoftext|>" inside a document is text
    _worker_fim = fim


def _encode_batch(docs: list[tuple[str, str]]) -> list[list[int]]:
    tokenizer = _worker_tokenizer
    assert tokenizer is not None, "_init_worker sets the tokenizer in every pool worker"
    if _worker_fim is None:
        return [e.ids for e in tokenizer.encode_batch([t for _, t in docs], add_special_tokens=False)]
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    return [fim_encode(text, doc_id, _worker_fim, encode) for doc_id, text in docs]


def _batches(docs: Iterable[tuple[str, str]], max_chars: int = 1 << 20) -> Iterator[list[tuple[str, str]]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc[1])
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_documents(
    docs: Iterable[tuple[str, str]], tokenizer_file: Path, num_workers: int, fim: FimSettings | None = None
) -> Iterator[list[int]]:
    """Token ids of each (id, text) document, in order; ``num_workers`` processes (0: this one)."""
    if num_workers == 0:
        _init_worker(str(tokenizer_file), fim)
        for batch in _batches(docs):
            yield from _encode_batch(batch)
        return
    # spawn: forking a process that holds torch's and tokenizers' thread pools is unsafe
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(str(tokenizer_file), fim)) as pool:
        for encoded in pool.imap(_encode_batch, _batches(docs)):
            yield from encoded


# ---------------------------------------------------------------- shards


@dataclass
class SplitStats:
    documents: int
    tokens: int
    shards: list[dict]


def write_split(
    token_lists: Iterable[list[int]], directory: Path, split: str, eos_id: int, dtype: np.dtype, shard_tokens: int = SHARD_TOKENS
) -> SplitStats:
    """Concatenate documents (each followed by ``eos_id``) into shards named ``{split}_NNNNN.bin``."""
    shards: list[dict] = []
    buffer: list[np.ndarray] = []
    buffered = documents = tokens = 0

    def flush() -> None:
        nonlocal buffer, buffered
        if not buffered:
            return
        array = np.concatenate(buffer).astype(dtype, copy=False)
        name = f"{split}_{len(shards):05d}.bin"
        array.tofile(directory / name)
        shards.append({"file": name, "tokens": int(array.size), "sha256": hashlib.sha256(array.tobytes()).hexdigest()})
        buffer, buffered = [], 0

    for ids in token_lists:
        arr = np.empty(len(ids) + 1, dtype=np.int64)
        arr[:-1] = ids
        arr[-1] = eos_id
        buffer.append(arr)
        buffered += arr.size
        documents += 1
        tokens += arr.size
        if buffered >= shard_tokens:
            flush()
    flush()
    return SplitStats(documents, tokens, shards)


def read_manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def open_split(directory: Path, split: str, verify: bool = False) -> list[np.ndarray]:
    """The split's shards, memory-mapped, checked against the manifest's sizes (and SHA-256 if ``verify``)."""
    manifest = read_manifest(directory)
    dtype = np.dtype(manifest["dtype"])
    arrays: list[np.ndarray] = []
    for shard in manifest["splits"][split]["shards"]:
        path = directory / shard["file"]
        expected = shard["tokens"] * dtype.itemsize
        if not path.exists() or path.stat().st_size != expected:
            raise ShardIntegrityError(f"{path}: missing or not {expected} bytes as {directory / MANIFEST} says")
        arr = np.memmap(path, dtype=dtype, mode="r")
        if verify and hashlib.sha256(arr.tobytes()).hexdigest() != shard["sha256"]:
            raise ShardIntegrityError(f"{path}: SHA-256 differs from {directory / MANIFEST}")
        arrays.append(arr)
    return arrays
