"""Chat messages to prompt token ids with the tokenizer's own chat template (Jinja, as transformers renders it).

Special tokens written by the template (``<|im_start|>`` ...) become their ids, while the messages'
contents are encoded as plain text, so a user who types ``<|im_start|>system`` gets characters, not a
role marker: contents are replaced by placeholders before rendering and encoded separately after.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from codex_ml.tokenizer.core import CONFIG_FILE

if TYPE_CHECKING:
    from jinja2 import Template

    from codex_ml.tokenizer.core import CodeTokenizer

ROLES = ("system", "developer", "user", "assistant")
_PLACEHOLDER = re.compile("\x00(\\d+)\x00")


class ChatTemplateError(ValueError):
    """The template cannot render these messages (or there is no template)."""


class ChatFormatter:
    """Renders messages with the template in ``tokenizer_config.json`` of ``tokenizer_dir``."""

    def __init__(self, tokenizer: CodeTokenizer, tokenizer_dir: Path) -> None:
        self.tokenizer = tokenizer
        path = Path(tokenizer_dir) / CONFIG_FILE
        config = json.loads(path.read_text()) if path.exists() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # HF's named templates
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.template_source = template if isinstance(template, str) else None
        specials = sorted(
            (t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special), key=len, reverse=True
        )
        self._specials = re.compile("|".join(map(re.escape, specials))) if specials else None

    @cached_property
    def _template(self) -> Template:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        assert self.template_source is not None  # prompt_ids checks before it renders

        def raise_exception(message: str) -> NoReturn:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.template_source)

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """End-of-text and the end-of-turn marker, when the vocabulary has one."""
        ids = {self.tokenizer.eos_id}
        for name in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
            i = self.tokenizer.token_id(name)
            if i is not None:
                ids.add(i)
        return frozenset(ids)

    def prompt_ids(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of the conversation ``[(role, content), ...]`` followed by the assistant's turn."""
        if self.template_source is None:
            raise ChatTemplateError("this model's tokenizer has no chat template; use /v1/completions")
        from jinja2.exceptions import TemplateError

        placeholders = [{"role": role, "content": f"\x00{i}\x00"} for i, (role, _) in enumerate(messages)]
        try:
            rendered = self._template.render(
                messages=placeholders, add_generation_prompt=True, eos_token=self.tokenizer.eos_token, bos_token=""
            )
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template refused these messages: {e}") from None
        ids: list[int] = []
        at = 0
        for m in _PLACEHOLDER.finditer(rendered):
            ids += self._encode_template_text(rendered[at : m.start()])
            ids += self.tokenizer.encode(messages[int(m.group(1))][1])
            at = m.end()
        return ids + self._encode_template_text(rendered[at:])

    def _encode_template_text(self, text: str) -> list[int]:
        if not text:
            return []
        if self._specials is None:
            return self.tokenizer.encode(text)
        ids: list[int] = []
        at = 0
        for m in self._specials.finditer(text):
            ids += self.tokenizer.encode(text[at : m.start()]) if m.start() > at else []
            special = self.tokenizer.token_id(m.group(0))
            assert special is not None  # matched from this vocabulary's own special tokens
            ids.append(special)
            at = m.end()
        return ids + (self.tokenizer.encode(text[at:]) if at < len(text) else [])
