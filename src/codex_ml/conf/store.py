"""Registers the typed schemas with Hydra's ConfigStore, so the YAML tree is checked against them."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from codex_ml.conf.schema import GenerateConfig, TokenizerCommandConfig, TrainConfig

SCHEMAS = {"train_schema": TrainConfig, "tokenizer_command_schema": TokenizerCommandConfig,
           "generate_schema": GenerateConfig}


def register_schemas() -> None:
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=name, node=node)
