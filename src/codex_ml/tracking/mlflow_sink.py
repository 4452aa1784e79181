"""MLflow as a sink of the event log: params, metric histories, tags and artifacts of a run.

By default the store is embedded: a SQLite file beside the run folders (``runs/mlflow.db``) with
artifacts in ``runs/mlartifacts/``; ``tracking.mlflow_uri`` points it at a tracking server instead.
The client starts on the sink's own thread and metrics are sent in batches, so neither MLflow's
import and database set-up nor a slow server ever holds up training. A resumed run continues the
MLflow run recorded in ``RUN/mlflow_run.json``.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from codex_ml.tracking.events import finite_metrics

RUN_RECORD = "mlflow_run.json"
_BATCH = 500  # MLflow accepts up to 1000 metrics per log_batch call
_GATHER_S = 0.5  # events are sent at most twice a second


def default_uri(runs_root: Path) -> str:
    return f"sqlite:///{runs_root.resolve() / 'mlflow.db'}"


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"training": {"lr": 0.01}}`` -> ``{"training.lr": "0.01"}``; lists as JSON."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


class MlflowSink:
    name = "mlflow"

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_dir: Path,
        config: dict,
        tags: dict[str, str],
        artifacts_root: Path | None,
        log_model: bool,
        warn: Callable[[str], None],
        run_name: str | None = None,
    ) -> None:
        self.uri, self.experiment, self.run_dir = uri, experiment, run_dir
        self.run_name = run_name or run_dir.name
        self.config, self.tags, self.artifacts_root, self.log_model = config, tags, artifacts_root, log_model
        self.warn = warn
        self.run_id: str | None = None
        self.failed = False
        self.fail_lock = threading.Lock()
        self.pending: queue.Queue = queue.Queue()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._work, name="codex-ml-mlflow", daemon=True)
        self.thread.start()

    # -------------------------------------------------- called from the event log's thread

    def write(self, event: dict) -> None:
        if not self.failed:
            self.pending.put(event)

    def flush(self) -> None:
        pass  # metrics go out in the background; finish() drains them

    def close(self) -> None:
        pass

    # -------------------------------------------------- the sink's own thread

    def _fail(self, what: str, error: BaseException) -> None:
        with self.fail_lock:  # the sink's thread and finish() may both get here; one report
            if self.failed:
                return
            self.failed = True
        reason = f"{error.__class__.__name__}: {(str(error).splitlines() or [''])[0][:300]}"
        self.warn(
            f"warning: MLflow tracking failed ({what}: {reason}); "
            "it is off for this run, training goes on and metrics.ndjson is complete"
        )
        self.ready.set()

    def _work(self) -> None:
        try:
            self._start()
        except Exception as e:  # any failure of the store: report once, keep training
            self._fail(f"could not open the store {self.uri}", e)
            return
        finally:
            self.ready.set()
        while not self.failed:
            batch = [self.pending.get()]
            # gather what arrives in the next half second into one request; the end of the run (None) goes at once
            deadline = time.monotonic() + _GATHER_S
            while batch[-1] is not None and len(batch) < _BATCH:
                try:
                    batch.append(self.pending.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            if any(e is None for e in batch):
                self._send([e for e in batch if e is not None])
                self._end_run()
                return
            self._send(batch)

    def _start(self) -> None:
        from mlflow.tracking import MlflowClient

        # after the import, which sets up MLflow's own loggers: its INFO lines are noise here
        for name in ("mlflow", "alembic", "sqlalchemy"):
            logging.getLogger(name).setLevel(logging.ERROR)

        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            location = self.artifacts_root.resolve().as_uri() + f"/{self.experiment}" if self.artifacts_root else None
            exp_id = self.client.create_experiment(self.experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        record_path = self.run_dir / RUN_RECORD
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        params = flatten(self.config)
        if record.get("mlflow_run_id") and record.get("mlflow_uri") == self.uri:
            self.run_id = record["mlflow_run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            # Params are immutable in MLflow: a resumed run may only add new keys.
            existing = self.client.get_run(self.run_id).data.params
            changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
            params = {k: v for k, v in params.items() if k not in existing}
            for key, value in changed.items():
                self.client.set_tag(self.run_id, f"resumed_with.{key}", value[:5000])
        else:
            run = self.client.create_run(exp_id, tags=self.tags, run_name=self.run_name)
            self.run_id = run.info.run_id
            record.update({"mlflow_run_id": self.run_id, "mlflow_uri": self.uri, "mlflow_experiment_id": exp_id})
            record_path.write_text(json.dumps(record, indent=2) + "\n")
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def _send(self, events: list[dict]) -> None:
        from mlflow.entities import Metric

        metrics = []
        for e in events:
            step = int(e.get("step", 0))
            stamp = int(e.get("time", time.time()) * 1000)
            metrics += [Metric(k, v, stamp, step) for k, v in finite_metrics(e).items()]
        assert self.run_id is not None, "start() opens the MLflow run before any metrics are sent"
        try:
            for i in range(0, len(metrics), _BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + _BATCH])
        except Exception as e:  # a server gone mid-run: report once, keep training
            self._fail("could not log metrics", e)

    def _end_run(self) -> None:
        """The run's small artifacts, on this thread, so that a dead server holds up only this thread."""
        if self.failed:
            return
        try:
            for name in ("config.yaml", "env.json", "report.html"):
                if (self.run_dir / name).exists():
                    self.client.log_artifact(self.run_id, str(self.run_dir / name))
        except Exception as e:  # the store went away at the very end: still only a warning
            self._fail("could not log artifacts", e)

    # -------------------------------------------------- at the end of the run

    def finish(self, run_dir: Path, interrupted: bool, final_checkpoint: Path | None, timeout: float = 120.0) -> None:
        """Send what is left (waiting at most ``timeout`` seconds), the checkpoint if asked, and the run's status."""
        self.pending.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():  # e.g. a server that stopped answering: MLflow's client retries for minutes
            self._fail(
                f"the tracking server did not finish within {timeout:.0f} s",
                TimeoutError("the run in MLflow may lack its last metrics, artifacts and status"),
            )
        if self.failed or self.run_id is None:
            return
        try:
            # a large upload may take long: not on a clock, but only to a store that answered until now
            if self.log_model and final_checkpoint is not None and not interrupted:
                self.client.log_artifacts(self.run_id, str(final_checkpoint), artifact_path=f"checkpoint/{final_checkpoint.name}")
            self.client.set_terminated(self.run_id, status="KILLED" if interrupted else "FINISHED")
        except Exception as e:  # the store went away at the very end: still only a warning
            self._fail("could not log the final checkpoint or status", e)
