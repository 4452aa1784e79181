"""Supervised fine-tuning records: prompt/completion pairs and chat conversations, as tokens and targets.

A record is either ``{"prompt": ..., "completion": ...}`` (the completion and an end-of-text token
are trained) or ``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered with the
tokenizer's chat template (every assistant turn is trained, its end-of-turn token included, so the
model learns to stop). An example is its token ids plus a flag per token saying whether the model
is trained to predict it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from codex_ml.data.sources import jsonl_files, jsonl_records
from codex_ml.errors import CodexError


class SftRecordError(CodexError):
    """A record without the fields SFT needs, or one the chat template cannot render."""


@dataclass
class Example:
    id: str
    ids: list[int]
    trained: list[bool]  # per token: is it a target (predicted from the tokens before it)


def read_records(paths: list[str]) -> Iterator[tuple[str, dict]]:
    """(``file:line``, record) for every JSON line of every file (folders: their ``*.jsonl``)."""
    for f in jsonl_files(paths, SftRecordError):
        for where, _, record in jsonl_records(f, SftRecordError):
            yield where, record


def check_record(where: str, record: dict) -> str:
    """The record's kind, "chat" or "completion"; a clear error naming the record otherwise."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise SftRecordError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise SftRecordError(f"{where}: messages[{i}] needs a string 'role' and a string 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise SftRecordError(f"{where}: no assistant message, nothing to train on")
        return "chat"
    missing = [k for k in ("prompt", "completion") if not isinstance(record.get(k), str)]
    if missing:
        raise SftRecordError(
            f"{where}: record needs 'messages', or 'prompt' and 'completion' (missing or not text: {', '.join(missing)})"
        )
    return "completion"


class SftEncoder:
    """Turns records into examples with one tokenizer directory (its chat template included)."""

    def __init__(self, tokenizer_dir: Path) -> None:
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)  # nosec B615  # a local tokenizer directory, local_files_only: never the Hub
        raw = tokenizer_dir / "tokenizer.json"
        self.raw = Tokenizer.from_file(str(raw)) if raw.exists() else self.hf.backend_tokenizer
        self.plain = Tokenizer.from_str(self.raw.to_str())
        self.plain.encode_special_tokens = True  # special-token strings in prompts/completions are text
        self.eos_id = self.hf.eos_token_id
        if self.eos_id is None:
            raise SftRecordError(f"{tokenizer_dir}: the tokenizer has no eos_token; SFT needs one to train stopping")

    def fingerprint(self) -> str:
        """SHA-256 of everything this encoder's examples depend on: the tokenizer's vocabulary and rules,
        the chat template as transformers resolved it (``tokenizer_config.json``, ``chat_template.jinja``
        or ``chat_template.json``), and the special tokens the template sees. Equal fingerprints, equal examples."""
        parts = {
            "tokenizer": self.raw.to_str(),
            "chat_template": getattr(self.hf, "chat_template", None),
            "special_tokens": self.hf.special_tokens_map,
            "eos_id": self.eos_id,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def encode(self, where: str, record: dict) -> Example:
        if check_record(where, record) == "completion":
            prompt = self.plain.encode(record["prompt"], add_special_tokens=False).ids
            completion = self.plain.encode(record["completion"], add_special_tokens=False).ids + [self.eos_id]
            return Example(where, prompt + completion, [False] * len(prompt) + [True] * len(completion))
        return self._encode_chat(where, record["messages"])

    def _render(self, where: str, messages: list[dict], generation_prompt: bool) -> str:
        if not getattr(self.hf, "chat_template", None):
            raise SftRecordError(f"{where}: the tokenizer has no chat template to render 'messages' with")
        try:
            # tokenize=False makes it the rendered string; the stubs type the union of all modes
            return cast(str, self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt))
        except Exception as e:  # jinja raises TemplateError and friends; the template is the user's
            raise SftRecordError(
                f"{where}: the chat template failed to render this record ({e.__class__.__name__}: {e})"
            ) from None

    def _encode_chat(self, where: str, messages: list[dict]) -> Example:
        text = self._render(where, messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(where, messages[:i], True) if i else ""
            through = self._render(where, messages[: i + 1], False)
            if not (through.startswith(before) and text.startswith(through)):
                raise SftRecordError(
                    f"{where}: the chat template does not render conversations as prefixes of "
                    "each other, so assistant turns cannot be located for the loss mask"
                )
            spans.append((len(before), len(through)))
        enc = self.raw.encode(text, add_special_tokens=False)
        trained = [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]
        return Example(where, list(enc.ids), trained)
