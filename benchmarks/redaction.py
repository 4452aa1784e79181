"""Redaction: recall and precision of codex-ml's secret and PII detector on real code with planted secrets.

The corpus is the standard library's modules. Into them go a few hundred secrets and personal data of many
formats (AWS key ids and secrets, GitHub, Slack, Stripe, OpenAI and Hugging Face tokens, JWTs, PEM private
keys, passwords, connection strings, e-mail and IP addresses), each at a random place: a string literal
assignment, a comment, a config-style dict entry, a URL. As many look-alike decoys go in too: hex digests,
UUIDs, base64 test data, placeholders (``YOUR_API_KEY``, ``<PASSWORD>``, ``${TOKEN}``), documentation
addresses (``example.com``, ``192.0.2.0/24``, ``2001:db8::``), versions. Then every file is redacted with
``codex_ml.data.redact.redact_document``.

Recall per kind: the share of planted values gone from the output. Precision: found planted values over
those plus the decoys that changed. Parse rate: the share of files that ``ast.parse`` before planting and
still do after redaction. MB/s: redaction of the whole corpus in one process.

    python benchmarks/redaction.py            # the whole standard library, 300 secrets; about a minute
    python benchmarks/redaction.py --smoke    # 30 files, 40 secrets; checks the script works
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import json
import random
import string
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from codex_ml.data.redact import redact_document  # noqa: E402
from codex_ml.data.sources import stdlib_files  # noqa: E402

AN = string.ascii_letters + string.digits


def secret(kind: str, rng: random.Random) -> str:
    rnd = lambda chars, n: "".join(rng.choice(chars) for _ in range(n))  # noqa: E731
    b64u = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    return {
        "aws_key_id": lambda: "AKIA" + rnd(string.ascii_uppercase + "234567", 16),
        "aws_secret": lambda: rnd(AN + "/+", 40),
        "github_token": lambda: rng.choice(["ghp_", "gho_", "ghs_"]) + rnd(AN, 36),
        "slack_token": lambda: f"xoxb-{rnd(string.digits, 12)}-{rnd(string.digits, 13)}-{rnd(AN, 24)}",
        "stripe_key": lambda: "sk_live_" + rnd(AN, 24),
        "openai_key": lambda: "sk-proj-" + rnd(AN + "_-", 48),
        "huggingface_token": lambda: "hf_" + rnd(AN, 34),
        "jwt": lambda: ".".join(
            [
                b64u(b'{"alg":"HS256","typ":"JWT"}'),
                b64u(json.dumps({"sub": rnd(string.digits, 8)}).encode()),
                b64u(rng.randbytes(32)),
            ]
        ),
        "password": lambda: rnd(AN, rng.randrange(6, 10)) + rng.choice("!#$%&*") + rnd(AN, rng.randrange(3, 8)),
        "connection_string": lambda: rnd(AN, 16),
        "email": lambda: (
            f"{rng.choice(['ann', 'li.wei', 'j_smith', 'dev+ci', 'ops'])}{rnd(string.digits, 2)}@"
            f"{rng.choice(['acme-corp.io', 'globex.de', 'initech.com', 'mail.hooli.xyz'])}"
        ),
        "ip_address": lambda: (
            f"{rng.randrange(11, 99)}.{rng.randrange(10, 250)}.{rng.randrange(10, 250)}.{rng.randrange(10, 250)}"
        ),
        "private_key": lambda: "\n".join(base64.b64encode(rng.randbytes(48)).decode() for _ in range(6)),
    }[kind]()


def placed(kind: str, value: str, rng: random.Random) -> str:
    """A line (or block) of Python holding ``value`` at a random kind of place."""
    if kind == "private_key":
        return f'KEY = """-----BEGIN RSA PRIVATE KEY-----\n{value}\n-----END RSA PRIVATE KEY-----\n"""'
    if kind == "aws_secret":
        return rng.choice([f'aws_secret_access_key = "{value}"', f'config = {{"aws_secret_access_key": "{value}"}}'])
    if kind == "password":
        name = rng.choice(["password", "db_password", "SMTP_PASSWORD", "admin_pwd", "passwd"])
        return rng.choice(
            [f'{name} = "{value}"', f'connect(user="svc", {name}="{value}")', f'settings = {{"{name}": "{value}"}}']
        )
    if kind == "connection_string":
        url = f"{rng.choice(['postgres', 'mysql', 'redis', 'mongodb'])}://svc_{rng.randrange(99)}:{value}@db.corp-net.io:5432/x"
        return rng.choice([f'DATABASE_URL = "{url}"', f"# connect with {url}"])
    if kind == "ip_address":
        return rng.choice([f'UPSTREAM = "{value}"', f"# fallback server {value}", f'url = "http://{value}:8080/api"'])
    return rng.choice(
        [
            f'TOKEN = "{value}"',
            f"# {kind}: {value}",
            f'headers = {{"Authorization": "Bearer {value}"}}',
            f'url = "https://api.corp.io/v1?key={value}"',
        ]
    )


def decoy(rng: random.Random) -> str:
    r = rng.randrange(10)
    return [
        lambda: f'EXPECTED_SHA256 = "{hashlib.sha256(rng.randbytes(8)).hexdigest()}"',
        lambda: f"# fixed in commit {hashlib.sha1(rng.randbytes(8)).hexdigest()}",
        lambda: f'REQUEST_ID = "{uuid.UUID(int=rng.getrandbits(128), version=4)}"',
        lambda: f'TEST_VECTOR = "{base64.b64encode(rng.randbytes(24)).decode()}"',
        lambda: rng.choice(
            [
                'API_KEY = "YOUR_API_KEY"',
                'password = "<PASSWORD>"',
                'token = "${GITHUB_TOKEN}"',
                'SECRET_KEY = "changeme"',
                'password = "%(password)s"',
            ]
        ),
        lambda: rng.choice(['SUPPORT = "help@example.com"', "# mail user@example.org", 'ADMIN = "root@localhost"']),
        lambda: f'BIND = "192.0.2.{rng.randrange(1, 250)}"',
        lambda: rng.choice(['LOCAL = "127.0.0.1"', 'LAN = "10.0.0.12"', 'V6 = "2001:db8::1"']),
        lambda: f'__version__ = "{rng.randrange(1, 9)}.{rng.randrange(20)}.{rng.randrange(20)}.{rng.randrange(20)}"',
        lambda: "y = weights@inputs.T",
    ][r]()


KINDS = [
    "aws_key_id",
    "aws_secret",
    "github_token",
    "slack_token",
    "stripe_key",
    "openai_key",
    "huggingface_token",
    "jwt",
    "password",
    "connection_string",
    "email",
    "ip_address",
    "private_key",
]
CREDENTIALS = set(KINDS) - {"ip_address"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="30 files, 40 secrets: checks the script works")
    parser.add_argument("--secrets", type=int, default=300)
    args = parser.parse_args()
    rng = random.Random(0)
    files = []
    for _, path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
            ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        files.append([path.name, text])
    files = files[:30] if args.smoke else files
    n = 40 if args.smoke else args.secrets
    planted, decoys = [], []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        value = secret(kind, rng)
        f = rng.choice(files)
        f[1] = f[1].rstrip("\n") + "\n\n" + placed(kind, value, rng) + "\n"
        planted.append((kind, value.splitlines()[0]))
    for _ in range(n):
        f = rng.choice(files)
        d = decoy(rng)
        f[1] = f[1].rstrip("\n") + "\n\n" + d + "\n"
        decoys.append(d)
    start = time.perf_counter()
    out = [redact_document(text).text for _, text in files]
    seconds = time.perf_counter() - start
    joined = "\n".join(out)
    mb = sum(len(t) for _, t in files) / 1e6
    parsed = 0
    for text in out:
        try:
            ast.parse(text)
            parsed += 1
        except SyntaxError:
            pass
    found = Counter(kind for kind, value in planted if value not in joined)
    total = Counter(kind for kind, _ in planted)
    changed = [d for d in decoys if d not in joined]
    print(f"corpus: {len(files)} files, {mb:.1f} MB; {len(planted)} planted secrets, {len(decoys)} decoys")
    print("| kind | planted | redacted | recall |")
    print("|---|---|---|---|")
    for kind in KINDS:
        if total[kind]:
            print(f"| {kind} | {total[kind]} | {found[kind]} | {found[kind] / total[kind]:.3f} |")
    tp = sum(found.values())
    precision = tp / max(tp + len(changed), 1)
    cred = sum(found[k] for k in CREDENTIALS) / max(sum(total[k] for k in CREDENTIALS), 1)
    print(f"decoys changed: {len(changed)} of {len(decoys)} {changed[:3]}")
    print(f"files that parse after redaction: {parsed} of {len(files)} (all parsed before)")
    print(
        f"credential and e-mail recall: {cred:.3f}; precision: {precision:.3f}; parse rate: {parsed / len(files):.3f}; "
        f"{mb / seconds:.2f} MB/s"
    )


if __name__ == "__main__":
    main()
