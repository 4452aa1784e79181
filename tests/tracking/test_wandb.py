"""Weights & Biases: an optional extra; asking for it without the package is an error before training starts."""

import os

from helpers import run_cli, tiny_train_args


def test_wandb_without_the_package_is_an_error_with_the_install_line(corpus_dir, tmp_path):
    # a wandb that cannot be imported, first on the path: what an environment without the extra sees
    shim = tmp_path / "no-wandb" / "wandb"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
    run = tmp_path / "run"
    env = {"PYTHONPATH": f"{shim.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = run_cli("train", *tiny_train_args(corpus_dir, run, extra=["tracking.wandb=true"]), check=False, env=env)
    assert out.returncode == 2
    install = "pip install 'codex-ml[wandb]'"
    assert out.stderr.strip().splitlines() == [f"error: tracking.wandb=true needs the wandb package: {install}"]
    assert "Traceback" not in out.stderr and "step " not in out.stdout
    assert not run.exists()  # refused before anything was written


def test_wandb_offline_files_under_the_run(corpus_dir, tmp_path):
    run = tmp_path / "run"
    run_cli("train", *tiny_train_args(corpus_dir, run, extra=["tracking.wandb=true"]), env={"WANDB_MODE": "offline"})
    assert list((run / "wandb").glob("offline-run-*"))
