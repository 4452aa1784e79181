"""Secrets masked in outputs (and counted), Prometheus metrics, the request log, and a log without secrets."""

from __future__ import annotations

import http.client
import json
import re
import sqlite3

import pytest

from codex_ml.serve.auth import KeyStore
from serve.serving import RunningServer, serve_config

GH = "ghp_" + "Q7w8E9r0T1y2U3i4O5p6" * 2 + "AbCd"


def post(server, path, body, key):
    c = http.client.HTTPConnection("127.0.0.1", server.cfg.serve.port, timeout=60)
    c.request("POST", path, json.dumps(body), {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, r.read().decode()


def metrics(server, key) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", server.cfg.serve.port, timeout=60)
    c.request("GET", "/metrics", headers={"Authorization": f"Bearer {key}"})
    text = c.getresponse().read().decode()
    out = {}
    for m in re.finditer(r"^([a-z_]+)(\{[^}]*\})?\s+(\S+)$", text, re.M):
        out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


@pytest.fixture(scope="module")
def logged(tiny_run, tmp_path_factory):
    state = tmp_path_factory.mktemp("logged")
    key = KeyStore(state / "keys.db").create("logger")
    s = RunningServer(serve_config(tiny_run, state, log_requests=True), quiet=False)
    yield s, key, state
    s.stop()


def test_secrets_in_completions_are_masked_and_counted(server, api_key):
    before = metrics(server, api_key).get('codex_ml_secrets_masked_total{kind="github_token"}', 0)
    prompt = f'TOKEN = "{GH}"\n'
    body = {"model": server.model_id, "prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": True}
    status, text = post(server, "/v1/completions", body, api_key)
    assert status == 200 and GH not in text and "[REDACTED:github_token]" in text
    status, streamed = post(server, "/v1/completions", {**body, "stream": True}, api_key)
    assert status == 200 and GH not in streamed and "ghp_" not in streamed
    after = metrics(server, api_key)
    assert after['codex_ml_secrets_masked_total{kind="github_token"}'] == before + 2


def test_metrics_count_requests_tokens_and_latencies(server, api_key):
    before = metrics(server, api_key)
    body = {"model": server.model_id, "prompt": "def f(x):", "max_tokens": 5, "temperature": 0}
    status, text = post(server, "/v1/completions", body, api_key)
    usage = json.loads(text)["usage"]
    m = metrics(server, api_key)
    key = 'codex_ml_requests_total{route="/v1/completions",status="200"}'
    assert m[key] == before.get(key, 0) + 1
    assert m["codex_ml_prompt_tokens_total"] == before["codex_ml_prompt_tokens_total"] + usage["prompt_tokens"]
    assert m["codex_ml_completion_tokens_total"] == before["codex_ml_completion_tokens_total"] + usage["completion_tokens"]
    assert m["codex_ml_time_to_first_token_seconds_count"] >= 1 and m["codex_ml_time_per_output_token_seconds_count"] >= 1
    assert m["codex_ml_running_requests"] == 0 and m["codex_ml_running_batch_size"] == 0 and m["codex_ml_queue_depth"] == 0


def test_request_log_rows_mask_secrets_and_the_console_holds_no_content(logged, capfd):
    s, key, state = logged
    prompt = f"key = {GH}\n"
    status, _ = post(s, "/v1/completions", {"model": s.model_id, "prompt": prompt, "max_tokens": 3, "temperature": 0}, key)
    assert status == 200
    post(s, "/v1/completions", {"model": s.model_id, "prompt": "x", "max_tokens": 1000}, key)  # a 400
    rows = [
        dict(zip(("key_name", "route", "status", "prompt_tokens", "completion_tokens", "prompt"), r))
        for r in sqlite3.connect(state / "requests.db").execute(
            "SELECT key_name, route, status, prompt_tokens, completion_tokens, prompt FROM requests ORDER BY time"
        )
    ]
    assert [(r["key_name"], r["route"], r["status"]) for r in rows[-2:]] == [
        ("logger", "/v1/completions", 200),
        ("logger", "/v1/completions", 400),
    ]
    assert rows[-2]["completion_tokens"] == 3 and GH not in rows[-2]["prompt"]
    console = capfd.readouterr()
    assert "POST /v1/completions 200" in console.err
    assert key not in console.out + console.err and GH not in console.out + console.err
