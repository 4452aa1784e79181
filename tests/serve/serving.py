"""Test helpers: a real uvicorn server on loopback, in a thread of the test process."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A uvicorn server in a thread of this process, bound to 127.0.0.1."""

    def __init__(self, cfg, quiet: bool = True) -> None:
        import uvicorn

        from codex_ml.serve.server import build

        cfg.serve.host, cfg.serve.port = "127.0.0.1", free_port()
        self.cfg = cfg
        self.asgi, self.app, self.model_id = build(cfg, quiet=quiet)
        self.url = f"http://127.0.0.1:{cfg.serve.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.asgi, host="127.0.0.1", port=cfg.serve.port, log_level="warning", access_log=False, lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)

    @property
    def scheduler(self):
        return self.app.state.services.served.scheduler

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def serve_config(run: Path, state: Path, **serve):
    from codex_ml.conf.schema import ServeCommandConfig, ServeConfig

    settings = ServeConfig(keys_db=str(state / "keys.db"), runs_root=str(state / "runs"), **serve)
    return ServeCommandConfig(run_dir=str(run), device="cpu", serve=settings)
