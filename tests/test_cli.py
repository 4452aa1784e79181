"""The CLI: help, config printing, and bad input refused before any work in one line naming the key."""

import pytest

from helpers import run_cli


def test_help_lists_commands_and_groups():
    out = run_cli("--help").stdout
    for word in (
        "train",
        "tokenizer",
        "prepare",
        "generate",
        "config",
        "evaluate",
        "evaluate-samples",
        "export",
        "merge",
        "report",
        "compare",
        "model",
        "data",
        "training",
        "tiny, small",
    ):
        assert word in out


def test_config_prints_the_resolved_config_with_overrides():
    out = run_cli("config", "training.lr=0.01", "model=small").stdout
    assert "lr: 0.01" in out and "preset: small" in out and "n_layer: 8" in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["training.lr=-1"], "training.lr: must be > 0"),
        (["training.lr=abc"], "training.lr: 'abc' is not a valid float"),
        (["training.batch_size=0"], "training.batch_size"),
        (["training.keep_last=0"], "training.keep_last"),
        (["data.seq_len=100000"], "data.seq_len"),
        (["training.no_such_key=3"], "training.no_such_key: unknown key; allowed keys in training"),
        (["model=no_such_model"], "allowed: base, hf, large, small, tiny"),
        (["data.source=nope"], "data.source: must be one of"),
        (["tokenizer.kind=wordpiece"], "tokenizer.kind"),
        (["model.attention=flex", "model.device=cpu"], "model.attention: flex trains on CUDA GPUs only"),
    ],
)
def test_bad_values_fail_fast_with_one_line(args, needle, tmp_path):
    out = run_cli("train", *args, check=False, cwd=tmp_path, timeout=60)
    assert out.returncode == 2
    assert needle in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "runs").exists()


def test_unknown_command():
    out = run_cli("trian", check=False)
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_prompts_with_code_syntax_are_text(tmp_path):
    out = run_cli("generate", "run_dir=/no/such/run", "prompt=def f(a, b): return ${x}", check=False)
    assert out.returncode == 2 and "/no/such/run does not exist" in out.stderr
