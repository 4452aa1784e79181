"""Keys, the route guard, limits and hostile input: every refusal a 4xx in OpenAI's error shape, never a 5xx."""

from __future__ import annotations

import hmac
import http.client
import json
import math
import time

import pytest

from codex_ml.serve.auth import KeyStore
from serve.serving import RunningServer, serve_config


def call(server, method, path, body=None, key=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", server.cfg.serve.port, timeout=60)
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    try:
        c.request(method, path, body, h)
    except (BrokenPipeError, ConnectionResetError):
        pass  # answered before the whole body went out
    r = c.getresponse()
    data = r.read()
    c.close()
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    return r.status, r.msg, parsed


def is_error(j) -> bool:
    return isinstance(j, dict) and isinstance(j.get("error"), dict) and {"message", "type", "code"} <= set(j["error"])


@pytest.fixture(scope="module")
def limited(tiny_run, state_dir, api_key):
    s = RunningServer(
        serve_config(
            tiny_run,
            state_dir,
            max_body_bytes=20_000,
            max_tokens=16,
            max_n=2,
            max_stop=2,
            max_stop_chars=10,
            max_logprobs=3,
            requests_per_minute=1000,
            max_concurrent_per_key=2,
        )
    )
    yield s
    s.stop()


def ok(server) -> dict:
    return {"model": server.model_id, "prompt": "def add(a, b):", "max_tokens": 4, "temperature": 0}


def test_keys_missing_wrong_near_miss_and_revoked(server, state_dir, api_key):
    assert call(server, "GET", "/health")[0] == 200
    for path in ("/v1/models", "/metrics", "/v1/jobs", "/no/such/route", "/openapi.json"):
        status, headers, body = call(server, "GET", path)
        assert status == 401 and is_error(body) and headers.get("WWW-Authenticate") == "Bearer", path
    near = api_key[:-1] + ("A" if api_key[-1] != "A" else "B")
    for wrong in (near, api_key + "x", "sk-" + "x" * 48, api_key.upper()):
        assert call(server, "GET", "/v1/models", key=wrong)[0] == 401
    assert call(server, "POST", "/v1/completions", ok(server), key=near)[0] == 401
    assert call(server, "GET", "/v1/models", headers={"Authorization": f"Basic {api_key}"})[0] == 401
    store = KeyStore(state_dir / "keys.db")
    other = store.create("short-lived")
    assert call(server, "GET", "/v1/models", key=other)[0] == 200
    store.revoke("short-lived")
    assert call(server, "GET", "/v1/models", key=other)[0] == 401  # the table is read on every request
    assert call(server, "GET", "/v1/models", key=api_key)[0] == 200


def test_keys_are_stored_as_hashes_and_compared_against_every_one(state_dir, monkeypatch):
    store = KeyStore(state_dir / "other-keys.db")
    keys = [store.create(f"k{i}") for i in range(5)]
    raw = (state_dir / "other-keys.db").read_bytes()
    assert not any(k.encode() in raw for k in keys)
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert store.verify(keys[0]) == "k0" and len(calls) == 5  # a match does not stop the loop
    calls.clear()
    assert store.verify("cmk-nothing") is None and len(calls) == 5


def test_a_route_added_later_is_guarded(server, api_key):
    @server.app.get("/v1/added-later")
    async def added():
        return {"secret": "data"}

    assert call(server, "GET", "/v1/added-later")[0] == 401
    assert call(server, "GET", "/v1/added-later", key=api_key)[0] == 200


def test_keys_cli_prints_the_key_alone_on_the_last_line(tmp_path):
    from helpers import run_cli

    db = tmp_path / "keys.db"
    out = run_cli("keys", "create", "name=ci", f"serve.keys_db={db}").stdout.strip().splitlines()
    key = out[-1]
    assert key.startswith("cmk-") and len(key) > 40 and " " not in key
    assert KeyStore(db).verify(key) == "ci"
    listed = run_cli("keys", "list", f"serve.keys_db={db}").stdout
    assert "ci" in listed and key not in listed
    run_cli("keys", "revoke", "name=ci", f"serve.keys_db={db}")
    assert KeyStore(db).verify(key) is None
    bad = run_cli("keys", "revoke", "name=nobody", f"serve.keys_db={db}", check=False)
    assert bad.returncode == 2 and "nobody" in bad.stderr and "Traceback" not in bad.stderr


def test_limits_answer_4xx_before_any_work(limited, api_key):
    s, C = limited, "/v1/completions"
    base = ok(s)
    big = json.dumps({**base, "prompt": "x" * 50_000}).encode()
    cases = [
        ("body over max_body_bytes", big, {413}),
        ("max_tokens over the cap", {**base, "max_tokens": 17}, {400}),
        ("n over the cap", {**base, "n": 3}, {400}),
        ("too many stop strings", {**base, "stop": ["a", "b", "c"]}, {400}),
        ("a stop string too long", {**base, "stop": ["y" * 11]}, {400}),
        ("logprobs over the cap", {**base, "logprobs": 4}, {400}),
        ("invalid JSON", b'{"model": "m", "prompt": "def f(', {400}),
        ("invalid UTF-8", b'{"model": "' + s.model_id.encode() + b'", "prompt": "def \xff\xfe(a):"}', {400}),
        ("wrong types", {**base, "prompt": {"a": 1}, "max_tokens": "lots"}, {400}),
        ("negative max_tokens", {**base, "max_tokens": -5}, {400}),
        ("NaN temperature", json.dumps({**base, "temperature": math.nan}).encode(), {400}),
        ("infinite top_p", b'{"model": "m", "prompt": "x", "top_p": 1e999}', {400}),
        ("a JSON array", [1, 2, 3], {400}),
        ("an empty body", b"", {400}),
        ("deeply nested JSON", b"[" * 5000 + b"]" * 5000, {400}),
        ("unknown field", {**base, "frobnicate": 1}, {400}),
        ("unsupported penalty", {**base, "presence_penalty": 1.0}, {400}),
        ("token id outside the vocabulary", {**base, "prompt": [10**9]}, {400}),
        ("an empty prompt list", {**base, "prompt": []}, {400}),
        ("echo with suffix", {**base, "echo": True, "suffix": "x"}, {400}),
        ("unknown model", {**base, "model": "no-such-model"}, {404}),
    ]
    for name, body, want in cases:
        status, _, j = call(s, "POST", C, body, key=api_key)
        assert status in want and is_error(j), (name, status, j)
    # the context check names both numbers
    status, _, j = call(s, "POST", C, {**base, "prompt": " ".join(f"v{i}" for i in range(200)), "max_tokens": 16}, key=api_key)
    assert status == 400 and "16" in j["error"]["message"] and str(s.scheduler.context) in j["error"]["message"]
    # chunked upload without Content-Length is cut at the limit too
    chunks = (big[i : i + 4096] for i in range(0, len(big), 4096))
    assert call(s, "POST", C, chunks, key=api_key)[0] == 413
    st, _, j = call(s, "POST", "/v1/chat/completions", {"model": s.model_id, "messages": "hi"}, key=api_key)
    assert st == 400 and is_error(j)
    assert call(s, "POST", C, base, key=api_key)[0] == 200  # still serving


def test_rate_limit_429_with_retry_after(tiny_run, tmp_path, api_key):
    KeyStore(tmp_path / "keys.db").create("burst")
    store = KeyStore(tmp_path / "keys.db")
    key = store.create("rate")
    s = RunningServer(serve_config(tiny_run, tmp_path, requests_per_minute=5, tokens_per_minute=10_000))
    try:
        body = {**ok(s), "max_tokens": 1}
        statuses = [call(s, "POST", "/v1/completions", body, key=key) for _ in range(8)]
        first = next(i for i, r in enumerate(statuses) if r[0] == 429)
        assert first == 5 and all(r[0] == 200 for r in statuses[:5])
        status, headers, j = statuses[first]
        assert is_error(j) and 1 <= int(headers["Retry-After"]) <= 12
        time.sleep(int(headers["Retry-After"]) + 0.2)
        assert call(s, "POST", "/v1/completions", body, key=key)[0] == 200
        # tokens per minute: one request may not need more than the whole bucket
        status, _, j = call(s, "POST", "/v1/completions", {**ok(s), "max_tokens": 16, "n": 8, "prompt": "x" * 40}, key=key)
        assert status in (400, 429) and is_error(j)
    finally:
        s.stop()


def test_concurrency_cap_and_queue_bound(limited, api_key):
    """Deterministic versions of a busy server: the key's requests in flight at the cap, a full queue."""
    s = limited
    svc = s.app.state.services
    for _ in range(svc.concurrency.limit):
        svc.concurrency.acquire("tester")  # as if two requests of this key were in flight
    try:
        status, headers, j = call(s, "POST", "/v1/completions", ok(s), key=api_key)
        assert status == 429 and headers["Retry-After"] and is_error(j)
    finally:
        for _ in range(svc.concurrency.limit):
            svc.concurrency.release("tester")
    queue = s.scheduler.max_queue
    s.scheduler.max_queue = 0
    try:
        status, headers, j = call(s, "POST", "/v1/completions", ok(s), key=api_key)
        assert status == 503 and headers["Retry-After"] and is_error(j)
    finally:
        s.scheduler.max_queue = queue
    assert call(s, "POST", "/v1/completions", ok(s), key=api_key)[0] == 200  # and nothing leaked


def test_no_auth_only_on_loopback(tiny_run, tmp_path):
    from helpers import run_cli

    p = run_cli(
        "serve",
        f"run_dir={tiny_run}",
        "serve.auth=false",
        "serve.host=0.0.0.0",
        f"serve.keys_db={tmp_path / 'k.db'}",
        check=False,
    )
    assert p.returncode == 2 and "serve.auth" in p.stderr and "loopback" in p.stderr
    p = run_cli(
        "serve",
        f"run_dir={tiny_run}",
        "serve.host=0.0.0.0",
        "serve.port=0",
        "device=cpu",
        f"serve.keys_db={tmp_path / 'empty.db'}",
        check=False,
        timeout=120,
    )
    assert p.returncode == 2 and "no active key" in p.stderr
