"""API keys in SQLite (SHA-256 hashes only) and the guard in front of every route but ``/health``.

The presented key is hashed and compared with ``hmac.compare_digest`` against every stored hash,
without stopping at a match, so the time taken does not depend on which key, if any, is close. The
guard is deny-by-default: a request is let through without a key only when the app's route table
matches it to one of ``OPEN_PATHS``; every other route, one added later included, and every unknown
path, needs ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.routing import Match, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from codex_ml.errors import CodexError
from codex_ml.serve.errors import error_body

OPEN_PATHS = frozenset({"/health"})
KEY_PREFIX = "cmk-"  # recognisable, so the secret detector (data/secrets.py) masks leaked keys


class KeyStoreError(CodexError):
    """A key operation that cannot be done (a name taken, a name unknown)."""


@dataclass
class KeyInfo:
    name: str
    created: float
    revoked: float | None


def _hash(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyStore:
    """The keys table of ``serve.keys_db``: name, SHA-256 of the key, created, revoked."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS api_keys (name TEXT PRIMARY KEY, sha256 BLOB NOT NULL, "
                "created REAL NOT NULL, revoked REAL)"
            )

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.execute("PRAGMA busy_timeout = 10000")
        return db

    def create(self, name: str) -> str:
        """A new key for ``name``, returned once; only its hash is stored."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._connect() as db:
            row = db.execute("SELECT revoked FROM api_keys WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] is None:
                raise KeyStoreError(f"a key named {name!r} exists; revoke it first (codex-ml keys revoke name={name})")
            db.execute("INSERT OR REPLACE INTO api_keys VALUES (?, ?, ?, NULL)", (name, _hash(key), time.time()))
        return key

    def revoke(self, name: str) -> None:
        with self._connect() as db:
            n = db.execute("UPDATE api_keys SET revoked = ? WHERE name = ? AND revoked IS NULL", (time.time(), name)).rowcount
        if n == 0:
            raise KeyStoreError(f"no active key named {name!r} (codex-ml keys list)")

    def list(self) -> list[KeyInfo]:
        with self._connect() as db:
            rows = db.execute("SELECT name, created, revoked FROM api_keys ORDER BY created").fetchall()
        return [KeyInfo(*r) for r in rows]

    def active_count(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM api_keys WHERE revoked IS NULL").fetchone()[0]

    def verify(self, key: str) -> str | None:
        """The name of the active key ``key`` is, else None. Reads the table on every call, so a revoked
        key stops working at once; compares against every hash, a match or not."""
        presented = _hash(key)
        with self._connect() as db:
            rows = db.execute("SELECT name, sha256 FROM api_keys WHERE revoked IS NULL").fetchall()
        found = None
        for name, digest in rows:
            if hmac.compare_digest(presented, bytes(digest)):
                found = name
        return found


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for k, v in headers:
        if k.lower() == b"authorization":
            scheme, _, token = v.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class AuthGuard:
    """ASGI layer: 401 (no detail) unless the route is open or the bearer key is active; puts the key's
    name in ``scope["state"]["key_name"]`` for limits and the request log."""

    def __init__(self, app: ASGIApp, router: Router, keys: KeyStore | None) -> None:
        self.app, self.router, self.keys = app, router, keys  # keys None: serve.auth=false (loopback only)
        missing = OPEN_PATHS - {getattr(r, "path", None) for r in router.routes}
        if missing:
            raise ValueError(f"open routes {sorted(missing)} are not in the app's route table")

    def _open(self, scope: Scope) -> bool:
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return getattr(route, "path", None) in OPEN_PATHS
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        if self._open(scope):
            state["key_name"] = None
            return await self.app(scope, receive, send)
        if self.keys is None:
            state["key_name"] = "anonymous"
            return await self.app(scope, receive, send)
        token = bearer_token(scope.get("headers", []))
        name = self.keys.verify(token) if token else None
        if name is None:
            return await _reject(send)
        state["key_name"] = name
        await self.app(scope, receive, send)


async def _reject(send: Send) -> None:
    import json

    body = json.dumps(error_body(401, "invalid or missing API key", "invalid_api_key")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
