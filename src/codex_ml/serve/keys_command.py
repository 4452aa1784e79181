"""`codex-ml keys create|list|revoke`: manage the server's API keys in ``serve.keys_db``."""

from __future__ import annotations

import time

from codex_ml.conf.schema import KeysConfig
from codex_ml.serve.auth import KeyStore


def keys_command(cfg: KeysConfig) -> None:
    store = KeyStore(cfg.serve.keys_db)
    if cfg.action == "create":
        assert cfg.name is not None  # validate_keys requires it for create and revoke
        key = store.create(cfg.name)
        print(f"created key {cfg.name!r} in {store.path}; it is shown once, here, and stored only as a SHA-256 hash:")
        print(key)  # alone on the last line, for scripts
    elif cfg.action == "revoke":
        assert cfg.name is not None
        store.revoke(cfg.name)
        print(f"revoked key {cfg.name!r}")
    else:
        keys = store.list()
        if not keys:
            print(f"no keys in {store.path} (codex-ml keys create name=NAME)")
        for k in keys:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(k.created))
            state = "revoked " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(k.revoked)) if k.revoked else "active"
            print(f"{k.name}\tcreated {created}\t{state}")
