"""Preference pairs in TRL's format: records checked, tokenized, split, and served as resumable batches.

A record is ``{"prompt": ..., "chosen": ..., "rejected": ...}`` with strings, or with chat message
lists (``prompt`` a conversation, ``chosen``/``rejected`` the assistant turns that answer it; without
``prompt``, the messages ``chosen`` and ``rejected`` share are the prompt, TRL's implicit prompt).
Messages are rendered with the tokenizer's chat template, or, without one, as ``role: content`` lines.

Tokenization follows TRL's DPOTrainer: the prompt, prompt+chosen and prompt+rejected are each
tokenized whole, and the completion starts where their tokens diverge from the prompt's (tokens
may merge across the boundary), and ends with the end-of-text token. Special-token strings inside
the text are text, never control tokens. A batch holds the chosen rows then the rejected rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from codex_ml.data.labels import IGNORE_INDEX
from codex_ml.data.sources import jsonl_files, jsonl_records
from codex_ml.data.split import hash_fraction, is_validation
from codex_ml.errors import CodexError

SIDES = ("chosen", "rejected")


class PreferenceRecordError(CodexError):
    """A preference record without the fields a pair needs, or one that cannot be rendered."""


@dataclass
class PreferenceRecord:
    where: str  # file:line
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    id: str  # what the train/validation split hashes


@dataclass
class Pair:
    """One tokenized pair: the shared prompt and each completion (end-of-text included)."""

    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    text: dict[str, str]  # the rendered prompt, chosen and rejected text: what the scores are of
    truncated: bool = False  # cut to data.seq_len: its scores are of a prefix of ``text``


@dataclass
class PreferenceSplits:
    train: list[Pair]
    val: list[Pair]
    dropped: int  # pairs whose prompt alone fills data.seq_len: nothing left to compare
    truncated: int
    sha256: str  # of the files' bytes, in order

    def record(self, source: str) -> dict:
        """What env.json says of the data."""
        return {
            "sha256": self.sha256,
            "path": source,
            "source": "preferences",
            "splits": {"train": {"pairs": len(self.train)}, "val": {"pairs": len(self.val)}},
            "dropped": self.dropped,
            "truncated": self.truncated,
        }


# ---------------------------------------------------------------- reading and checking


def _check_messages(where: str, field: str, value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise PreferenceRecordError(f"{where}: '{field}' must be a string or a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PreferenceRecordError(f"{where}: {field}[{i}] needs a string 'role' and a string 'content'")
    return value


def check_record(where: str, record: dict, id_field: str | None = None) -> PreferenceRecord:
    """The record as a pair of completions of one prompt; one error naming ``file:line`` and the field otherwise."""
    missing = [k for k in SIDES if k not in record or record[k] is None]
    if missing:
        raise PreferenceRecordError(f"{where}: a preference record needs 'chosen' and 'rejected' (missing: {', '.join(missing)})")
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise PreferenceRecordError(f"{where}: 'chosen' and 'rejected' must both be text or both be message lists")
    doc_id = str(record[id_field]) if id_field and id_field in record else where.rsplit("/", 1)[-1]
    if isinstance(chosen, str):
        prompt = record.get("prompt", "")
        if not isinstance(prompt, str):
            raise PreferenceRecordError(f"{where}: 'prompt' must be text when 'chosen' and 'rejected' are")
        return PreferenceRecord(where, prompt, chosen, rejected, doc_id)
    chosen, rejected = _check_messages(where, "chosen", chosen), _check_messages(where, "rejected", rejected)
    if "prompt" in record:
        return PreferenceRecord(where, _check_messages(where, "prompt", record["prompt"]), chosen, rejected, doc_id)
    shared = 0  # TRL's implicit prompt: the messages both conversations open with
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise PreferenceRecordError(
            f"{where}: no 'prompt', and 'chosen' and 'rejected' share no opening messages to take as the prompt"
        )
    return PreferenceRecord(where, chosen[:shared], chosen[shared:], rejected[shared:], doc_id)


def read_preferences(paths: list[str], id_field: str | None = None) -> tuple[list[PreferenceRecord], str]:
    """Every record of every file, all checked before any is used; and the SHA-256 of the files' bytes."""
    records, digest = [], hashlib.sha256()
    for f in jsonl_files(paths, PreferenceRecordError):
        digest.update(f.read_bytes())
        records += [check_record(where, record, id_field) for where, _, record in jsonl_records(f, PreferenceRecordError)]
    if not records:
        raise PreferenceRecordError(f"no preference records in {', '.join(paths)}")
    return records, digest.hexdigest()


# ---------------------------------------------------------------- tokenizing


def plain_chat(messages: list[dict], generation_prompt: bool) -> str:
    """The rendering of a conversation for a tokenizer without a chat template: ``role: content`` lines."""
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if generation_prompt else "")


class PairEncoder:
    """Renders and tokenizes records with one tokenizer directory (its chat template, if any)."""

    def __init__(self, tokenizer_dir: Path) -> None:
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)  # nosec B615  # a local tokenizer directory, local_files_only: never the Hub
        # AutoTokenizer's own backend, not tokenizer.json as written: transformers may configure it (a Qwen2
        # folder gets Qwen2's pre-tokenizer), and the exported classifier's users tokenize with AutoTokenizer
        self.plain = Tokenizer.from_str(self.hf.backend_tokenizer.to_str())
        self.plain.encode_special_tokens = True  # "<|endoftext|>" inside a completion is text, not a stop
        self.eos_id = self.hf.eos_token_id
        if self.eos_id is None:
            raise PreferenceRecordError(f"{tokenizer_dir}: the tokenizer has no eos_token; a completion must end with one")

    def _render(self, where: str, messages: list[dict], generation_prompt: bool) -> str:
        if not getattr(self.hf, "chat_template", None):
            return plain_chat(messages, generation_prompt)
        try:
            rendered = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja raises TemplateError and friends; the template is the user's
            raise PreferenceRecordError(
                f"{where}: the chat template failed to render this record ({type(e).__name__}: {e})"
            ) from None
        return cast(str, rendered)  # tokenize=False: the rendered string

    def texts(self, r: PreferenceRecord) -> dict[str, str]:
        """The prompt and the two full texts (prompt + completion) as the model reads them."""
        if isinstance(r.chosen, str):
            assert isinstance(r.prompt, str) and isinstance(r.rejected, str)  # check_record keeps the kinds together
            return {"prompt": r.prompt, "chosen": r.prompt + r.chosen, "rejected": r.prompt + r.rejected}
        assert isinstance(r.prompt, list) and isinstance(r.rejected, list)
        return {
            "prompt": self._render(r.where, r.prompt, True),
            "chosen": self._render(r.where, r.prompt + r.chosen, False),
            "rejected": self._render(r.where, r.prompt + r.rejected, False),
        }

    def encode(self, r: PreferenceRecord) -> Pair:
        texts = self.texts(r)
        prompt, chosen, rejected = (self.plain.encode(texts[k], add_special_tokens=False).ids for k in ("prompt", *SIDES))
        start = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
        if not all(texts[k].startswith(texts["prompt"]) for k in SIDES):
            raise PreferenceRecordError(
                f"{r.where}: the chat template does not render the prompt as the start of the conversation"
            )
        text = {"prompt": texts["prompt"], **{k: texts[k][len(texts["prompt"]) :] for k in SIDES}}
        return Pair(r.id, prompt[:start], chosen[start:] + [self.eos_id], rejected[start:] + [self.eos_id], text)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def truncate_pair(pair: Pair, max_len: int, side: str = "right") -> tuple[Pair | None, bool]:
    """The pair with each sequence (prompt + completion) at most ``max_len`` tokens; None when a
    completion would lose every token. ``side="right"`` keeps the start, ``"left"`` the end of the prompt."""
    p, c, r = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
    longest = len(p) + max(len(c), len(r))
    if longest <= max_len:
        return pair, False
    if side == "left":  # drop the prompt's beginning, then the completions' ends
        p = p[max(0, longest - max_len) :]
    room = max_len - len(p)
    if room <= 0:
        return None, True
    return Pair(pair.id, p, c[:room], r[:room], pair.text, truncated=True), True


def prepare_pairs(
    records: list[PreferenceRecord],
    encoder: PairEncoder,
    seq_len: int,
    val_fraction: float,
    truncation_side: str,
    sha256: str,
) -> PreferenceSplits:
    """Tokenized pairs split by the hash of each record's id (the smallest hash to validation if none falls there)."""
    train: list[Pair] = []
    val: list[Pair] = []
    dropped = truncated = 0
    for record in records:
        pair, cut = truncate_pair(encoder.encode(record), seq_len, truncation_side)
        truncated += cut
        if pair is None:
            dropped += 1
            continue
        (val if is_validation(pair.id, val_fraction) else train).append(pair)
    if not val and len(train) > 1:
        val.append(train.pop(min(range(len(train)), key=lambda i: hash_fraction(train[i].id))))
    if not train:
        raise PreferenceRecordError(
            f"no training pairs: {len(records)} records, {dropped} whose prompt alone fills data.seq_len={seq_len}"
        )
    return PreferenceSplits(train, val, dropped, truncated, sha256)


# ---------------------------------------------------------------- batches


def pair_batch(pairs: list[Pair], index: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows [chosen..., rejected...], right-padded to the longest: ``input_ids``, ``labels`` aligned with
    them (the completion's tokens; IGNORE_INDEX on the prompt and padding), ``lengths``, and ``index``
    (the pairs' positions in their split, for precomputed reference log-probabilities).

    Right padding under causal attention never reaches a real token, so no attention mask is needed.
    """
    chosen = [(pairs[i].prompt_ids, pairs[i].chosen_ids) for i in index]
    rejected = [(pairs[i].prompt_ids, pairs[i].rejected_ids) for i in index]
    rows = chosen + rejected
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    lengths = torch.empty(len(rows), dtype=torch.long)
    for row, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        input_ids[row, :n] = torch.tensor(p + c)
        labels[row, len(p) : n] = torch.tensor(c)
        lengths[row] = n
    return {"input_ids": input_ids, "labels": labels, "lengths": lengths, "index": torch.as_tensor(index, dtype=torch.long)}


class PairBatches:
    """Shuffled batches of pairs, a new order each epoch (seeded by the seed and the epoch alone), each
    rank its own share; the position is the whole state, so a resumed run continues exactly."""

    def __init__(self, pairs: list[Pair], batch_size: int, seed: int, pad_id: int, rank: int = 0, world_size: int = 1) -> None:
        self.pairs, self.batch_size, self.seed, self.pad_id = pairs, batch_size, seed, pad_id
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = len(pairs) // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise CodexError(
                f"the training split has {len(pairs)} pairs: not one batch of {batch_size} per rank "
                f"({world_size} ranks); lower training.batch_size or add pairs"
            )
        self.epoch, self.batch_index = 0, 0
        self._order: np.ndarray | None = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._order is None:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.pairs))
            mine = perm[self.rank :: self.world_size][: self.batches_per_epoch * self.batch_size]
            self._order = mine.reshape(self.batches_per_epoch, self.batch_size)
        index = self._order[self.batch_index]
        self.batch_index += 1
        if self.batch_index == self.batches_per_epoch:
            self.epoch, self.batch_index, self._order = self.epoch + 1, 0, None
        return pair_batch(self.pairs, index, self.pad_id)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "seed": self.seed,
            "num_pairs": len(self.pairs),
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_pairs") != len(self.pairs) or state.get("seed") != self.seed:
            raise CodexError("the checkpoint's data position is for other data: the pairs or data.seq_len changed")
        self.epoch, self.batch_index, self._order = state["epoch"], state["batch_index"], None


def eval_pair_batches(
    pairs: list[Pair], batch_size: int, pad_id: int, rank: int = 0, world_size: int = 1
) -> Iterator[dict[str, torch.Tensor]]:
    """Every pair of a split once, in order; the rank's share of them (ranks never overlap)."""
    mine = np.arange(len(pairs))[rank::world_size]
    for start in range(0, len(mine), batch_size):
        yield pair_batch(pairs, mine[start : start + batch_size], pad_id)
