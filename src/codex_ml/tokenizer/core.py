"""One tokenizer interface over both backends, saved in Hugging Face's format.

Whatever trained it (byte-level BPE or SentencePiece), a tokenizer is a ``tokenizers.Tokenizer``
plus the names of its special tokens, saved as ``tokenizer.json`` and ``tokenizer_config.json`` so
that ``transformers.AutoTokenizer.from_pretrained(dir)`` loads it and encodes identically.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from codex_ml.errors import CodexError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"

# ChatML, the convention most open code models use; rendered by transformers' apply_chat_template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TokenizerError(CodexError):
    """A tokenizer directory that cannot be loaded."""


@dataclass
class SpecialTokens:
    eos: str = "<|endoftext|>"
    pad: str = "<|pad|>"
    fim_prefix: str = "<fim_prefix>"
    fim_middle: str = "<fim_middle>"
    fim_suffix: str = "<fim_suffix>"
    fim_pad: str = "<fim_pad>"
    extra: list[str] = field(default_factory=list)

    def all(self) -> list[str]:
        """In id order: end-of-text gets id 0, padding id 1."""
        return [self.eos, self.pad, self.fim_prefix, self.fim_middle, self.fim_suffix, self.fim_pad, *self.extra]


class CodeTokenizer:
    """Encode and decode text; special-token strings inside documents are encoded as plain text."""

    def __init__(self, tokenizer: Tokenizer, eos_token: str, pad_token: str | None, kind: str = "bpe") -> None:
        self.backend = tokenizer
        self.kind = kind
        self.eos_token, self.pad_token = eos_token, pad_token or eos_token
        self.eos_id = self._id_of(self.eos_token)
        self.pad_id = self._id_of(self.pad_token)
        # Documents that mention "<|endoftext|>" must not inject a real end-of-text token.
        self.backend.encode_special_tokens = True
        added = self.backend.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special}
        names = {t.content: i for i, t in added.items()}
        self.fim_ids = {
            role: next((i for n, i in names.items() if f"fim_{role}" in n.lower()), None)
            for role in ("prefix", "middle", "suffix", "pad")
        }

    def _id_of(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise TokenizerError(f"special token {token!r} is not in the vocabulary")
        return i

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def sha256(self) -> str:
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()

    # ------------------------------------------------------------------ files

    def save(
        self,
        directory: str | Path,
        extra_special_tokens: list[str],
        model_max_length: int | None = None,
        padding_side: str = "right",
        truncation_side: str = "right",
        chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    ) -> None:
        """Write the files AutoTokenizer reads: tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.encode_special_tokens = False  # the saved file behaves like any HF tokenizer
        try:
            self.backend.save(str(directory / TOKENIZER_FILE))
        finally:
            self.backend.encode_special_tokens = True
        added = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "rstrip": t.rstrip,
                "normalized": t.normalized,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": added,
            "bos_token": None,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": None,
            "extra_special_tokens": list(extra_special_tokens),
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length or 1_000_000_000,
            "padding_side": padding_side,
            "truncation_side": truncation_side,
            "codex_ml_kind": self.kind,
        }
        if chat_template:
            config["chat_template"] = chat_template
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        special_map = {
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "additional_special_tokens": list(extra_special_tokens),
        }
        (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> CodeTokenizer:
        """Our own tokenizers, and any Hugging Face tokenizer directory with a fast tokenizer."""
        directory = Path(directory)
        if not directory.is_dir():
            raise TokenizerError(f"tokenizer directory {directory} does not exist")
        config_path = directory / CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        if (directory / TOKENIZER_FILE).exists():
            try:
                backend = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
            except Exception as e:  # tokenizers raises a bare Exception for malformed files
                raise TokenizerError(f"{directory / TOKENIZER_FILE}: cannot be read ({e})") from None
        else:
            backend = _converted_backend(directory)
        eos = _token_name(config.get("eos_token"))
        pad = _token_name(config.get("pad_token"))
        if eos is None:
            generation = directory / "generation_config.json"
            raise TokenizerError(
                f"{config_path}: no eos_token; codex-ml needs an end-of-text token"
                + (f" (see {generation})" if generation.exists() else "")
            )
        return cls(backend, eos, pad, kind=config.get("codex_ml_kind", "hf"))


def _token_name(value: str | dict | None) -> str | None:
    if isinstance(value, dict):  # older files store AddedToken dicts
        return value.get("content")
    return value


def _converted_backend(directory: Path) -> Tokenizer:
    """A fast tokenizer for a directory that only has slow-tokenizer files (e.g. tokenizer.model)."""
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)  # nosec B615  # a local directory, local_files_only: never the Hub
    except Exception as e:  # transformers raises many types for unreadable directories
        raise TokenizerError(f"{directory}: no tokenizer.json, and transformers could not load a tokenizer ({e})") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(f"{directory}: the tokenizer has no fast (tokenizers) version")
    return backend
