"""A client that goes away frees its slot within a step, streamed or not (the model slowed down to see it)."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from codex_ml.serve.auth import KeyStore
from serve.serving import RunningServer, serve_config


@pytest.fixture(scope="module")
def slow(tiny_run, tmp_path_factory):
    state = tmp_path_factory.mktemp("slow")
    key = KeyStore(state / "keys.db").create("slow")
    s = RunningServer(serve_config(tiny_run, state, redact_output=False))
    model = s.scheduler.model
    forward = model.forward

    def slowed(*a, **kw):
        time.sleep(0.05)  # 60 tokens take 3 s
        return forward(*a, **kw)

    model.forward = slowed
    yield s, key
    model.forward = forward
    s.stop()


def open_request(s, key, stream: bool):
    c = http.client.HTTPConnection("127.0.0.1", s.cfg.serve.port, timeout=30)
    body = {"model": s.model_id, "prompt": "def", "max_tokens": 60, "temperature": 0, "stream": stream}
    c.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    return c


def freed_within(s, seconds: float) -> float:
    start = time.perf_counter()
    while s.scheduler.running:
        assert time.perf_counter() - start < seconds, "the slot is still taken"
        time.sleep(0.01)
    return time.perf_counter() - start


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_the_slot(slow, stream):
    s, key = slow
    c = open_request(s, key, stream)
    if stream:
        r = c.getresponse()
        while not r.readline().startswith(b"data:"):
            pass
    else:
        end = time.time() + 10
        while not s.scheduler.running:
            assert time.time() < end
            time.sleep(0.01)
    time.sleep(0.2)
    assert s.scheduler.running == 1
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    assert freed_within(s, 1.0) < 1.0  # the whole request would take 3 s
