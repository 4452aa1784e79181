"""codex-ml: an offline-first toolkit for code language models."""

__version__ = "0.1.0"
