"""`codex-ml serve` vs the anchor users write today (FastAPI + Hugging Face ``generate``, one request at a time).

In the manner of vLLM's ``bench serve``: both servers run on loopback over the same tiny model (our run,
and the same weights exported with ``codex-ml export`` for the anchor); the client streams the same code
prompts from the standard library (mixed lengths, greedy, the same max_tokens) with Poisson arrivals at
several request rates and at a fixed concurrency of 32, and reports requests/s, output tokens/s, time to
first token and time per output token (median, p90, p99). The last line, ``ratio: X``, is our output
tokens/s over the anchor's at 32 concurrent clients. Our server runs with ``serve.compile=true`` (a compiled
decoding step, built at start-up), as one would serve under load; ``--no-compile`` measures the eager step.

    python benchmarks/serve.py            # the tiny preset (trains it briefly first), about five minutes on 2 cores
    python benchmarks/serve.py --smoke    # tiny shapes, a few requests: seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from fastapi import Request  # module level: FastAPI resolves the anchor's annotations here

from common import machine_line

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "codex_ml.cli"]
SMOKE_MODEL = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.n_kv_head=1", "model.d_ff=64"]


# ------------------------------------------------------------------ the anchor server


def anchor_app(model_dir: str):
    """FastAPI + HF generate, one request at a time (a lock around the model), streaming through
    ``TextIteratorStreamer``: the script a user writes to put a model behind an endpoint."""
    import threading

    import torch
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        ids = tok(body["prompt"], return_tensors="pt").input_ids
        streamer = TextIteratorStreamer(tok, skip_prompt=True)
        counted = {"n": 0}

        def run():
            with lock, torch.no_grad():
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=body["max_tokens"],
                    do_sample=False,
                    streamer=streamer,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
                counted["n"] = out.shape[1] - ids.shape[1]

        worker = threading.Thread(target=run)
        worker.start()

        def events():
            for text in streamer:
                if text:
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'text': text}]})}\n\n"
            worker.join()
            usage = {"prompt_tokens": ids.shape[1], "completion_tokens": counted["n"]}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


# ------------------------------------------------------------------ the client


async def one_request(client, url: str, prompt: str, max_tokens: int, model: str) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise SystemExit(f"{url} answered {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and any(c.get("text") for c in event.get("choices", [])):
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - start, "tpot": (end - first) / max(tokens - 1, 1), "tokens": tokens, "end": end}


async def load(url: str, prompts: list[str], max_tokens: int, model: str, rate: float | None, concurrency: int) -> dict:
    """Poisson arrivals at ``rate`` requests/s (None: all at once), at most ``concurrency`` in flight."""
    import httpx

    rng = random.Random(0)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4)) as client:

        async def gated(p):
            async with gate:
                return await one_request(client, url, p, max_tokens, model)

        start = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.ensure_future(gated(p)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    wall = max(r["end"] for r in results) - start
    return {
        "requests_per_s": len(results) / wall,
        "output_tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft": [r["ttft"] for r in results],
        "tpot": [r["tpot"] for r in results],
    }


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


# ------------------------------------------------------------------ set-up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], **kw) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}")


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    import http.client

    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    end = time.time() + 300
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[2:4]} exited: {log.read_text()[-1500:]}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{cmd[2:4]} did not come up: {log.read_text()[-1500:]}")


def code_prompts(n: int, max_chars: int) -> list[str]:
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size > 4000)
    rng = random.Random(1)
    out = []
    for i in range(n):
        text = files[i % len(files)].read_text(encoding="utf-8", errors="replace")
        start = rng.randrange(0, max(1, len(text) - max_chars))
        out.append(text[start : start + rng.randint(max_chars // 8, max_chars)])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--requests", type=int, default=96, help="requests per load level")
    p.add_argument("--rates", type=float, nargs="+", default=[2.0, 8.0], help="Poisson arrival rates (requests/s)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="our server with serve.compile=true")
    p.add_argument("--anchor-app", help=argparse.SUPPRESS)  # internal: serve the anchor for this model folder
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.anchor_app:
        import uvicorn

        uvicorn.run(anchor_app(args.anchor_app), host="127.0.0.1", port=args.port, log_level="warning")
        return
    if args.smoke:
        args.requests, args.rates, args.max_tokens, args.train_steps = 6, [4.0], 8, 2
    concurrency = 32
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    with tempfile.TemporaryDirectory(prefix="codex-ml-bench-serve-") as tmp:
        tmp = Path(tmp)
        run_dir, hf_dir = tmp / "runs" / "tiny", tmp / "hf"
        train = [
            *CLI,
            "train",
            "model=tiny",
            f"run.dir={run_dir}",
            f"training.max_steps={args.train_steps}",
            "data.seq_len=64",
            "tracking.mlflow=false",
            "training.sample_tokens=0",
            "training.eval_every=0",
            f"training.checkpoint_every={args.train_steps}",
        ]
        if args.smoke:
            corpus = tmp / "corpus"
            corpus.mkdir()
            for f in sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size > 4000)[:15]:
                (corpus / f.name).write_bytes(f.read_bytes())
            train += [
                *SMOKE_MODEL,
                "data.source=files",
                f"data.paths=[{corpus}]",
                "tokenizer.vocab_size=400",
                "data.num_workers=0",
                "training.batch_size=4",
                f"data.cache_dir={tmp / 'cache'}",
            ]
        run(train, timeout=900)
        run([*CLI, "export", f"run_dir={run_dir}", f"out={hf_dir}"], timeout=300)
        prompts = code_prompts(args.requests, 120 if args.smoke else 160)
        ours_port, anchor_port = free_port(), free_port()
        servers = {
            "codex-ml serve": (
                [
                    *CLI,
                    "serve",
                    f"run_dir={run_dir}",
                    "serve.host=127.0.0.1",
                    f"serve.port={ours_port}",
                    "serve.auth=false",
                    "serve.max_batch=32",
                    "serve.max_concurrent_per_key=1000",
                    "serve.requests_per_minute=1000000",
                    "serve.tokens_per_minute=1000000000",
                    f"serve.keys_db={tmp / 'keys.db'}",
                    f"serve.compile={str(args.compile).lower()}",
                    "device=cpu",
                ],
                ours_port,
            ),
            "FastAPI + HF generate": (
                [sys.executable, __file__, "--anchor-app", str(hf_dir), "--port", str(anchor_port)],
                anchor_port,
            ),
        }
        levels = [(f"Poisson {r:g}/s", r, concurrency) for r in args.rates] + [(f"concurrency {concurrency}", None, concurrency)]
        results = {}
        for name, (cmd, port) in servers.items():
            proc = start(cmd, port, tmp / f"{port}.log")
            try:
                url = f"http://127.0.0.1:{port}"
                asyncio.run(load(url, prompts[:2], args.max_tokens, "tiny", None, 2))  # warm-up
                for level, rate, conc in levels:
                    results[(name, level)] = asyncio.run(load(url, prompts, args.max_tokens, "tiny", rate, conc))
            finally:
                proc.terminate()
                proc.wait(60)
    shape = "a 2-layer smoke shape" if args.smoke else "the tiny preset"
    print(
        f"model: {shape} ({args.train_steps} training steps), fp32 on CPU; {args.requests} streamed "
        f"code completions per level, greedy, max_tokens {args.max_tokens}; codex-ml serve with "
        f"serve.compile={str(args.compile).lower()}"
    )
    print(machine_line())
    print(f"\n| {'load':<16} | {'server':<22} | req/s | out tok/s | TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) |")
    print(f"|{'-' * 18}|{'-' * 24}|-------|-----------|---------------------------|---------------------------|")
    for (name, level), r in results.items():
        ttft = " / ".join(f"{pct(r['ttft'], q) * 1000:.0f}" for q in (50, 90, 99))
        tpot = " / ".join(f"{pct(r['tpot'], q) * 1000:.1f}" for q in (50, 90, 99))
        print(
            f"| {level:<16} | {name:<22} | {r['requests_per_s']:5.2f} | {r['output_tokens_per_s']:9.0f} | {ttft:>25} | "
            f"{tpot:>25} |"
        )
    top = f"concurrency {concurrency}"
    ours, anchor = (results[(name, top)]["output_tokens_per_s"] for name in ("codex-ml serve", "FastAPI + HF generate"))
    ratio = ours / anchor
    print(
        f"\nour server / FastAPI + HF generate, output tokens/s at {concurrency} concurrent clients; "
        f"median TTFT {statistics.median(results[('codex-ml serve', top)]['ttft']) * 1000:.0f} ms"
    )
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
