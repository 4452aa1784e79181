"""Property-based fuzzing of the OpenAPI schema (schemathesis): no input, valid or not, gets a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from codex_ml.serve.auth import KeyStore
from serve.serving import RunningServer, serve_config


@pytest.fixture(scope="module")
def fuzzed(tiny_run, tmp_path_factory):
    state = tmp_path_factory.mktemp("fuzz")
    key = KeyStore(state / "keys.db").create("fuzz")
    s = RunningServer(
        serve_config(
            tiny_run, state, max_tokens=8, max_n=2, requests_per_minute=10**6, tokens_per_minute=10**9, max_concurrent_per_key=64
        )
    )
    yield s, key
    s.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed):
    s, key = fuzzed
    schema = schemathesis.openapi.from_url(s.url + "/openapi.json", headers={"Authorization": f"Bearer {key}"})
    # jobs would start training runs; their validation is tested in test_jobs.py
    return schema.exclude(path_regex="^/v1/jobs")


def test_no_input_gets_a_5xx(api_schema, fuzzed):
    """Each operation: a bounded number of generated cases (valid and not), each answered below 500, errors in
    OpenAI's shape. (schemathesis' own pytest plugin does not load under this pytest; hypothesis drives it.)"""
    s, key = fuzzed
    headers = {"Authorization": f"Bearer {key}"}
    calls = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize", "/v1/models"}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(
                max_examples=15, deadline=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck), database=None
            )
            def check(case):
                calls.append(case.path)
                response = case.call(base_url=s.url, headers=headers, timeout=30)
                assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
                if response.status_code >= 400 and response.status_code != 404:
                    assert "message" in response.json()["error"]

            try:
                check()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # an operation without inputs has no invalid ones
    assert calls.count("/v1/completions") >= 20 and calls.count("/v1/chat/completions") >= 20
