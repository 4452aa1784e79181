"""Recipe: `codex-ml prepare`, the data of a run (tokenizer and packed shards) without training."""

from __future__ import annotations

from codex_ml.conf.schema import TrainConfig
from codex_ml.recipes.train import log, prepare_for_run, run_dir_of, write_config
from codex_ml.runs import RunLock


def prepare_command(cfg: TrainConfig) -> None:
    run_dir = run_dir_of(cfg)
    with RunLock(run_dir):
        prepared = prepare_for_run(cfg, run_dir)
        write_config(cfg, run_dir)
    splits = prepared.manifest["splits"]
    log(
        f"prepared {splits['train']['tokens']:,} train and {splits['val']['tokens']:,} validation tokens "
        f"in {prepared.directory}; tokenizer in {run_dir / 'tokenizer'}"
    )
