"""`codex-ml serve` as users run it: a real process on loopback, greedy output equal to `codex-ml generate`,
SIGTERM drains and exits 0, and the log names the URL and the model but holds no key and no prompt."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time

from codex_ml.serve.auth import KeyStore
from helpers import CLI, run_cli
from serve.serving import free_port

PROMPT = "def parse_header_line(line):"


def test_serve_process_end_to_end(tiny_run, tmp_path):
    key = KeyStore(tmp_path / "keys.db").create("cli")
    want = run_cli(
        "generate", f"run_dir={tiny_run}", f"prompt={PROMPT}", "temperature=0", "max_new_tokens=12", "device=cpu"
    ).stdout.removesuffix("\n")[len(PROMPT) :]
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            *CLI,
            "serve",
            f"run_dir={tiny_run}",
            "serve.host=127.0.0.1",
            f"serve.port={port}",
            f"serve.keys_db={tmp_path / 'keys.db'}",
            "device=cpu",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        end = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < end, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.3)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request(
            "POST",
            "/v1/completions",
            json.dumps({"model": tiny_run.name, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}),
            {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read())["choices"][0]["text"] == want
        # a streaming request in flight when SIGTERM comes is finished before the exit
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request(
            "POST",
            "/v1/completions",
            json.dumps({"model": tiny_run.name, "prompt": "def", "max_tokens": 40, "stream": True, "temperature": 0}),
            {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        r = c.getresponse()
        r.readline()
        proc.send_signal(signal.SIGTERM)
        assert r.read().decode().rstrip().endswith("data: [DONE]")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert f"http://127.0.0.1:{port}" in text and f"model {tiny_run.name}" in text
    assert key not in text and "parse_header_line" not in text and "Traceback" not in text
