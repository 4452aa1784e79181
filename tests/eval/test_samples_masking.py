"""eval/samples.jsonl never holds a secret a model wrote: masked by the shared detector, judged unmasked."""

import json

from codex_ml.eval.humaneval import judge_samples, samples_jsonl

AWS_KEY = "AKIA" + "Z7QW3ERT5YUI8OPA"
PROBLEMS = {
    "T/0": {
        "task_id": "T/0",
        "prompt": "def key():\n",
        "test": "def check(f):\n    assert f().startswith('AKIA')\n",
        "entry_point": "key",
    }
}


def test_a_planted_aws_key_never_reaches_samples_jsonl():
    completion = f"    return '{AWS_KEY}'  # mail ops@acme-corp.io\n"
    failing = f"    raise ValueError('{AWS_KEY}')\n"  # the verdict quotes the key back
    results = judge_samples(PROBLEMS, [{"task_id": "T/0", "completion": c} for c in (completion, failing)], workers=1)
    assert [r["passed"] for r in results] == [True, False]  # judged on the completion as the model wrote it
    assert AWS_KEY in results[1]["result"]
    written = samples_jsonl(results)
    assert AWS_KEY not in written and "ops@acme-corp.io" not in written
    rows = [json.loads(line) for line in written.splitlines()]
    assert "[REDACTED:aws_access_key]" in rows[0]["completion"] and "[REDACTED:email]" in rows[0]["completion"]
    assert AWS_KEY not in rows[1]["result"] and rows[0]["passed"] is True
    assert AWS_KEY in samples_jsonl(results, redact=False)  # evaluate.redact_output=false: as generated
