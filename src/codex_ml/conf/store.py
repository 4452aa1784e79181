"""Registers the typed schemas with Hydra's ConfigStore, so the YAML tree is checked against them."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from codex_ml.conf.schema import (
    CompareConfig,
    DPOCommandConfig,
    EvaluateConfig,
    EvaluateSamplesConfig,
    ExportConfig,
    GenerateConfig,
    GRPOCommandConfig,
    KeysConfig,
    PlanConfig,
    ReportConfig,
    RewardCommandConfig,
    ServeCommandConfig,
    TokenizerCommandConfig,
    TrainConfig,
)

SCHEMAS = {
    "train_schema": TrainConfig,
    "reward_schema": RewardCommandConfig,
    "dpo_schema": DPOCommandConfig,
    "grpo_schema": GRPOCommandConfig,
    "tokenizer_command_schema": TokenizerCommandConfig,
    "generate_schema": GenerateConfig,
    "evaluate_schema": EvaluateConfig,
    "evaluate_samples_schema": EvaluateSamplesConfig,
    "report_schema": ReportConfig,
    "compare_schema": CompareConfig,
    "export_schema": ExportConfig,
    "serve_schema": ServeCommandConfig,
    "keys_schema": KeysConfig,
    "plan_schema": PlanConfig,
}


def register_schemas() -> None:
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=name, node=node)
