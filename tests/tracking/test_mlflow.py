"""MLflow, read back through MlflowClient: the embedded store, a real tracking server, a broken store, resume, off."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

import codex_ml
from codex_ml.tracking.mlflow_sink import flatten
from helpers import CLI, run_cli, tiny_train_args

CURVES = ("train_loss", "lr", "grad_norm", "tokens_per_s")


def events(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.ndjson").read_text().splitlines()]
    return [r for r in rows if r.get("event") == kind]


def all_runs(client: MlflowClient) -> list:
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_embedded_store_has_params_metric_histories_tags_and_artifacts(tracked_run, tmp_path):
    client = MlflowClient(tracking_uri=tracked_run.store_uri)
    runs = all_runs(client)
    # the second process resumed the run folder and continued the same MLflow run
    assert [r.info.run_id for r in runs] == [tracked_run.first_run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"

    # params: the flattened resolved config; immutable, so the resume's new max_steps is a tag
    config = yaml.safe_load((tracked_run.path / "config.yaml").read_text())
    params = run.data.params
    assert params["training.lr"] == "0.003" and params["model.n_layer"] == "2" and params["training.max_steps"] == "8"
    assert set(params) == set(flatten(config))
    assert run.data.tags["resumed_with.training.max_steps"] == "12"

    # every point of metrics.ndjson, by step, across both processes
    train = events(tracked_run.path, "train")
    assert [e["step"] for e in train] == list(range(1, 13))  # one event per step
    for key in CURVES:
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(e["step"], pytest.approx(e[key])) for e in train], key
    val = client.get_metric_history(run.info.run_id, "val_loss")
    assert sorted((m.step, m.value) for m in val) == [
        (e["step"], pytest.approx(e["val_loss"])) for e in events(tracked_run.path, "eval")
    ]
    assert [m.step for m in val] and {m.step for m in val} == {8, 12}
    assert client.get_metric_history(run.info.run_id, "system/cpu_percent")

    tags = run.data.tags
    assert tags["codex_ml.version"] == codex_ml.__version__
    assert tags["codex_ml.run_dir"] == str(tracked_run.path)
    env = json.loads((tracked_run.path / "env.json").read_text())
    assert tags["git_commit"] == str(env["git_commit"])

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "env.json", "report.html", "checkpoint"} <= artifacts
    # tracking.log_model=true: each process logged its final checkpoint
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")} == {
        "checkpoint/step_00000008",
        "checkpoint/step_00000012",
    }
    files = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run.info.run_id, "checkpoint/step_00000012")}
    assert {"model.safetensors", "manifest.json", "COMPLETE"} <= files
    local = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert Path(local).read_text() == (tracked_run.path / "config.yaml").read_text()


class MlflowServer:
    """A real `mlflow server` on loopback with its own store, in its own process group."""

    def __init__(self, workdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "server.log"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{workdir / 'server.db'}",
                    "--artifacts-destination",
                    str(workdir / "server-artifacts"),
                ],
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.time() + 90
        while not self._healthy():
            assert self.proc.poll() is None and time.time() < deadline, self.log_path.read_text()[-3000:]
            time.sleep(0.25)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def test_tracking_server_on_loopback_and_gone_mid_run(mlflow_server, corpus_dir, tmp_path):
    run = tmp_path / "runs" / "remote"
    extra = ["tracking.mlflow=true", f"tracking.mlflow_uri={mlflow_server.url}"]
    run_cli("train", *tiny_train_args(corpus_dir, run, steps=6, extra=extra))
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # nothing embedded when a server is named
    client = MlflowClient(tracking_uri=mlflow_server.url)
    runs = all_runs(client)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    r = runs[0]
    assert r.data.params["training.max_steps"] == "6" and r.data.tags["codex_ml.run_dir"] == str(run)
    history = client.get_metric_history(r.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [e["step"] for e in events(run, "train")] == list(range(1, 7))
    assert len(client.get_metric_history(r.info.run_id, "val_loss")) == 1
    assert {"config.yaml", "env.json", "report.html"} <= {a.path for a in client.list_artifacts(r.info.run_id)}

    # The server goes away while a second run trains (its process frozen meanwhile, so the fault lands mid-run):
    # reported once, training goes on until we stop it, and metrics.ndjson is whole.
    gone = tmp_path / "runs" / "server-gone"
    log = tmp_path / "gone.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*CLI, "train", *tiny_train_args(corpus_dir, gone, steps=100_000, extra=extra)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
        )
        try:
            deadline = time.time() + 120
            while not any(r.info.run_name == "server-gone" and r.data.metrics for r in all_runs(client)):
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            proc.send_signal(signal.SIGSTOP)
            mlflow_server.stop()
            proc.send_signal(signal.SIGCONT)
            while "warning: MLflow tracking failed" not in log.read_text():
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            step = max(e["step"] for e in events(gone, "train"))
            while max(e["step"] for e in events(gone, "train")) < step + 10:  # training goes on
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)  # stops at the next step, saving a checkpoint
            code = proc.wait(timeout=120)
    lines = log.read_text().splitlines()
    assert code == 128 + signal.SIGTERM and any(line.startswith("stopped by SIGTERM") for line in lines), lines[-5:]
    reports = [line for line in lines if "mlflow" in line.lower() and "warning" in line.lower()]
    assert len(reports) == 1 and "training goes on" in reports[0], lines
    steps = [e["step"] for e in events(gone, "train")]
    assert steps == list(range(1, steps[-1] + 1)) and events(gone, "interrupted")


def test_broken_store_is_reported_once_and_training_goes_on(corpus_dir, tmp_path):
    (tmp_path / "notadir").write_text("a regular file where the store's folder should be\n")
    run = tmp_path / "runs" / "broken"
    extra = ["tracking.mlflow=true", f"tracking.mlflow_uri=sqlite:///{tmp_path}/notadir/x.db"]
    out = run_cli("train", *tiny_train_args(corpus_dir, run, steps=8, extra=extra))
    lines = (out.stdout + out.stderr).splitlines()
    reports = [line for line in lines if "mlflow" in line.lower() and "warning" in line.lower()]
    assert len(reports) == 1, lines
    assert "notadir" in reports[0] and "training goes on" in reports[0]
    assert not any("Traceback" in line for line in lines)
    # training finished with its metrics intact
    assert [e["step"] for e in events(run, "train")] == list(range(1, 9))
    assert [e["step"] for e in events(run, "eval")] == [8]
    assert events(run, "end") and (run / "report.html").exists()
    assert not (run / "mlflow_run.json").exists()


def test_mlflow_off_writes_no_store(repro_runs):
    for run in repro_runs:  # trained with tracking.mlflow=false
        assert (run / "metrics.ndjson").exists() and not (run / "mlflow_run.json").exists()
        assert not (run.parent / "mlflow.db").exists() and not (run.parent / "mlartifacts").exists()
        assert not (run / "mlflow.db").exists() and not (run / "mlruns").exists()
