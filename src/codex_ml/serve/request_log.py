"""The request log (``serve.log_requests=true``): one SQLite row per request, texts with secrets masked."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from codex_ml.data.secrets import mask_secrets

REQUEST_LOG_FILE = "requests.db"  # beside the keys database


class RequestLog:
    """Rows of (time, key name, route, status, prompt and completion tokens, latency, prompt, completion)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS requests (time REAL, key_name TEXT, route TEXT, status INTEGER, "
                "prompt_tokens INTEGER, completion_tokens INTEGER, latency_s REAL, prompt TEXT, "
                "completion TEXT)"
            )

    def write(
        self,
        key_name: str | None,
        route: str,
        status: int,
        latency_s: float,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        prompt: str | None = None,
        completion: str | None = None,
    ) -> None:
        prompt = mask_secrets(prompt)[0] if prompt else prompt
        completion = mask_secrets(completion)[0] if completion else completion
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), key_name, route, status, prompt_tokens, completion_tokens, latency_s, prompt, completion),
            )

    def rows(self) -> list[dict]:
        with self._lock:
            cur = self._db.execute("SELECT * FROM requests ORDER BY time")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def close(self) -> None:
        with self._lock:
            self._db.close()
