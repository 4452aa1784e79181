"""The one entry point: ``codex-ml <command> [key=value ...]``, configured by Hydra.

Each command has a config root in ``conf/`` (a typed schema plus YAML groups). Hydra composes it
from the command line (overrides, ``-m`` sweeps, sweeper plugins); the command then checks the
values and runs its recipe. Mistakes a user can fix end in one line on stderr, never a traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from codex_ml.conf.overrides import VALIDATORS, quote_text_overrides
from codex_ml.errors import CodexError

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from codex_ml.conf.schema import GenerateConfig, TokenizerCommandConfig, TrainConfig


@dataclass
class Command:
    config: str  # the config root in conf/
    summary: str
    run: Callable  # (typed config) -> result; imported lazily so --help stays fast


def _train(cfg: TrainConfig) -> float:
    from codex_ml.recipes.train import final_metric, train
    from codex_ml.sweep import sweep_context

    job_dir, sweep = sweep_context()
    metrics = train(cfg, sweep_job_dir=job_dir, sweep=sweep)
    return final_metric(metrics, cfg.training.best_metric)


def _prepare(cfg: TrainConfig) -> None:
    from codex_ml.recipes.prepare_command import prepare_command

    prepare_command(cfg)


def _config(cfg: TrainConfig) -> None:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")


def _tokenizer(cfg: TokenizerCommandConfig) -> None:
    from pathlib import Path

    from codex_ml.recipes.prepare import train_tokenizer_only

    assert cfg.out is not None  # validate_tokenizer_command requires it
    out = Path(cfg.out).expanduser().resolve()
    tok = train_tokenizer_only(cfg.data, cfg.tokenizer, out)
    print(f"tokenizer: {len(tok)} tokens ({cfg.tokenizer.kind}) saved to {out}")


def _generate(cfg: GenerateConfig) -> None:
    from codex_ml.recipes.generate import generate_command

    generate_command(cfg)


def _recipe(module: str, function: str) -> Callable[[Any], Any]:
    """A command implemented by ``codex_ml.recipes.<module>.<function>(cfg)``, imported when run."""

    def run(cfg: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(f"codex_ml.recipes.{module}"), function)(cfg)

    return run


def _serve(module: str, function: str) -> Callable[[Any], Any]:
    """A command implemented by ``codex_ml.serve.<module>.<function>(cfg)``, imported when run."""

    def run(cfg: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(f"codex_ml.serve.{module}"), function)(cfg)

    return run


COMMANDS: dict[str, Command] = {
    "train": Command("train", "train a model: tokenizer, data, training loop, checkpoints (resumes a run folder)", _train),
    "prepare": Command("train", "clean, split, tokenize and pack the data alone (cached for train)", _prepare),
    "reward": Command(
        "reward",
        "train a reward model on preference pairs: data.paths=[prefs.jsonl] (export writes a sequence classifier)",
        _recipe("reward", "reward_command"),
    ),
    "dpo": Command(
        "dpo", "DPO on preference pairs against a frozen reference: data.paths=[prefs.jsonl]", _recipe("dpo", "dpo_command")
    ),
    "grpo": Command(
        "grpo",
        "GRPO with rewards from running completions in the sandbox: data.paths=[problems.jsonl]",
        _recipe("grpo", "grpo_command"),
    ),
    "tokenizer": Command("tokenizer_command", "train a tokenizer alone and save it to out=DIR", _tokenizer),
    "generate": Command("generate", "sample from a run: run_dir=RUN prompt=... [max_new_tokens=N temperature=T]", _generate),
    "config": Command("train", "print the resolved training config (with your overrides)", _config),
    "evaluate": Command(
        "evaluate",
        "evaluate a run's checkpoint: tasks=[loss,humaneval] (writes RUN/eval/)",
        _recipe("evaluate", "evaluate_command"),
    ),
    "evaluate-samples": Command(
        "evaluate_samples",
        "judge HumanEval-format completions in the sandbox: samples=FILE",
        _recipe("evaluate_samples", "evaluate_samples_command"),
    ),
    "export": Command(
        "export", "write a run as a Hugging Face model directory: run_dir=RUN out=DIR", _recipe("export", "export_command")
    ),
    "merge": Command(
        "export", "merge a LoRA run's adapter into its base model: run_dir=RUN out=DIR", _recipe("export", "merge_command")
    ),
    "report": Command("report", "write RUN/report.html: plots, tables, config, environment", _recipe("report", "report_command")),
    "compare": Command("compare", "compare runs: run_dirs=[A,B] [out=compare.html]", _recipe("report", "compare_command")),
    "serve": Command(
        "serve",
        "an OpenAI-compatible HTTP server: run_dir=RUN [serve.host=127.0.0.1 serve.port=8000]",
        _serve("server", "serve_command"),
    ),
    "keys": Command(
        "keys",
        "the server's API keys: keys create|list|revoke [name=NAME] [serve.keys_db=FILE]",
        _serve("keys_command", "keys_command"),
    ),
    "plan": Command(
        "plan",
        "per-rank memory before booking machines: model=large training.strategy=fsdp world_size=64",
        _recipe("plan", "plan_command"),
    ),
}


def config_groups() -> dict[str, list[str]]:
    """Each config group and its options, read from the YAML tree shipped in the package."""
    conf = resources.files("codex_ml.conf")
    groups = {}
    for entry in sorted(conf.iterdir(), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("_"):
            order = {"tiny": 0, "small": 1, "base": 2, "large": 3, "default": -1}  # by size, not alphabetically
            options = sorted(
                (f.name[:-5] for f in entry.iterdir() if f.name.endswith(".yaml")), key=lambda o: (order.get(o, 9), o)
            )
            if options:
                groups[entry.name] = options
    return groups


def print_help() -> None:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: codex-ml <command> [key=value ...] [-m key=a,b ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "config groups (pick one with group=option; set any key with group.key=value):"]
    lines += [f"  {group:<10} {', '.join(options)}" for group, options in config_groups().items()]
    lines += [
        "",
        "examples:",
        "  codex-ml train                                   # the default job: tiny model on the stdlib",
        "  codex-ml train model=small training.max_steps=2000 run.name=exp1",
        "  codex-ml train -m training.lr=0.001,0.003        # a sweep: one run folder per value",
        "  codex-ml generate run_dir=runs/exp1 prompt='def add(a, b):' temperature=0",
        "  codex-ml config training.lr=0.01                 # show the resolved config",
        "",
        "codex-ml <command> --help shows that command's config tree (Hydra's help).",
    ]
    print("\n".join(lines))


def _task(name: str) -> Callable[[DictConfig], Any]:
    command = COMMANDS[name]

    def task(cfg: DictConfig) -> Any:
        from omegaconf import OmegaConf

        from codex_ml.conf import schema

        try:
            typed = OmegaConf.to_object(cfg)
            getattr(schema, VALIDATORS[command.config])(typed)
            return command.run(typed)
        except CodexError as e:
            # Hydra would print a traceback for any exception escaping the task.
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return task


def _check_overrides(config_name: str, args: list[str]) -> None:
    """Compose once before Hydra's main, so that a bad override is one clear line.

    Sweeps (``-m``) and Hydra's own flags are left to Hydra, which expands them first.
    """
    if any(a.startswith("-") for a in args):
        return
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    from codex_ml.conf.explain import explain

    try:
        with initialize_config_module(config_module="codex_ml.conf", version_base=None):
            compose(config_name=config_name, overrides=args)
    except HydraException as e:
        raise CodexError(explain(e, config_name)) from None


def _run_hydra(name: str, args: list[str]) -> None:
    import hydra

    from codex_ml.conf.store import register_schemas

    register_schemas()
    args = quote_text_overrides(args)
    _check_overrides(COMMANDS[name].config, args)
    sys.argv = [f"codex-ml-{name}", *args]
    main = hydra.main(version_base=None, config_path="pkg://codex_ml.conf", config_name=COMMANDS[name].config)
    main(_task(name))()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        try:
            print_help()
        except BrokenPipeError:  # `codex-ml --help | head`
            pass
        return 0
    name, rest = args[0], args[1:]
    if name == "keys" and rest and "=" not in rest[0] and not rest[0].startswith("-"):
        rest = [f"action={rest[0]}", *rest[1:]]  # `keys create name=x`: the action is a word, not key=value
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; commands: {', '.join(COMMANDS)} (codex-ml --help)", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from codex_ml.runtime import tune_allocator

    tune_allocator()
    try:
        _run_hydra(name, rest)
    except CodexError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        if not (e.args and isinstance(e.args[0], int)):
            print("interrupted", file=sys.stderr)
        return 128 + int(signum)
    return 0


if __name__ == "__main__":
    sys.exit(main())
