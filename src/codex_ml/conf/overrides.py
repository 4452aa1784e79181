"""How command-line overrides reach a config: free-text values quoted for Hydra, and each config root's validator.

Shared by the CLI and by the server's jobs, which check a job's overrides exactly as the CLI would
before accepting it.
"""

from __future__ import annotations

import re

# Keys whose values are free text (code prompts): passed to Hydra quoted, so that parentheses,
# commas and ${...} in code are text, not override syntax or interpolations.
TEXT_KEYS = {"prompt", "suffix", "training.sample_prompt"}

VALIDATORS = {
    "train": "validate_train",
    "reward": "validate_reward",
    "dpo": "validate_dpo",
    "grpo": "validate_grpo",
    "tokenizer_command": "validate_tokenizer_command",
    "generate": "validate_generate",
    "evaluate": "validate_evaluate",
    "evaluate_samples": "validate_evaluate_samples",
    "report": "validate_report",
    "compare": "validate_compare",
    "export": "validate_export",
    "serve": "validate_serve",
    "keys": "validate_keys",
    "plan": "validate_plan",
}


def hydra_quote(text: str) -> str:
    """A Hydra quoted string whose value, after OmegaConf resolution, is exactly ``text``."""
    out = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)  # backslashes before a quote, and the quote
    out = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, out)  # backslashes before the closing quote
    out = out.replace("${", "\\${")  # not an interpolation
    return f"'{out}'"


def quote_text_overrides(args: list[str]) -> list[str]:
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        already = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
        out.append(f"{key}={hydra_quote(value)}" if sep and key in TEXT_KEYS and not already else arg)
    return out
