"""``POST /v1/completions`` and ``/v1/chat/completions``: OpenAI's request and response shapes, streamed or not.

A handler checks caps, the key's request rate and concurrency, tokenizes, checks the context and
the key's token rate, then submits one sequence per choice and answers as the tokens arrive.
``usage`` is exact: each prompt's tokens once, and every token sampled for every choice (a stop
token included).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from codex_ml.data.fim import fim_prompt
from codex_ml.serve.chat import ChatTemplateError
from codex_ml.serve.errors import ApiError
from codex_ml.serve.generation import Choices, ChoiceSpec, ServedModel, choice_seed
from codex_ml.serve.limits import Caps, ConcurrencyLimiter, RateLimiter, check_caps
from codex_ml.serve.schemas import ChatRequest, CompletionRequest
from codex_ml.serve.text_stream import ChoiceText

if TYPE_CHECKING:
    from codex_ml.serve.metrics import ServerMetrics
    from codex_ml.serve.scheduler import TokenEvent


@dataclass
class Services:
    """What the generation routes share."""

    served: ServedModel
    caps: Caps
    rates: RateLimiter
    concurrency: ConcurrencyLimiter
    metrics: ServerMetrics
    redact: bool
    log_texts: bool = False  # keep (masked) texts for the request log


@dataclass
class _Choice:
    """One choice's state while answering."""

    text: ChoiceText
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    pending: int = 0  # tokens whose logprobs were not streamed yet
    n_generated: int = 0
    finish: str | None = None
    prompt_logprobs: list | None = None
    prompt_ids: list[int] = field(default_factory=list)
    completion: str = ""


def _key(request: Request) -> str:
    return request.scope.get("state", {}).get("key_name") or "anonymous"


async def complete(request: Request, body: CompletionRequest, svc: Services) -> Response:
    served = svc.served
    served.check_model(body.model)
    if body.prompt == []:
        raise ApiError(400, "prompt: an empty list", "invalid_request")
    prompts = body.prompt if isinstance(body.prompt, list) and not isinstance(body.prompt[0], int) else [body.prompt]
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    check_caps(svc.caps, max_tokens, body.n, len(prompts), body.stops, body.logprobs)
    if body.suffix is not None and body.echo:
        raise ApiError(400, "echo is not supported together with suffix", "invalid_request")
    key = _key(request)
    svc.rates.take_request(key)
    svc.concurrency.acquire(key)
    try:
        encoded, echoes = [], []
        for p in prompts:
            if isinstance(p, str):
                ids = served.encode(p, max_tokens)
                if body.suffix is not None:
                    ids = _infill(served, ids, served.encode(body.suffix, max_tokens))
                echoes.append(p)
            else:
                served.check_ids(p)
                ids = list(p)
                echoes.append(served.tokenizer.decode(p))
            encoded.append(served.fit(ids, max_tokens))
        specs = [
            ChoiceSpec(
                ids,
                max_tokens,
                body.temperature,
                body.top_p,
                choice_seed(body.seed, i * body.n + j),
                body.stops,
                frozenset({served.tokenizer.eos_id}),
                body.logprobs,
                prompt_logprobs=body.echo and body.logprobs is not None,
            )
            for i, ids in enumerate(encoded)
            for j in range(body.n)
        ]
        prefixes = [echoes[i] if body.echo else "" for i in range(len(encoded)) for _ in range(body.n)]
        return await _answer(request, svc, specs, prefixes, encoded, body, chat=False, key=key)
    except BaseException:
        svc.concurrency.release(key)
        raise


async def chat(request: Request, body: ChatRequest, svc: Services) -> Response:
    served = svc.served
    served.check_model(body.model)
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top = body.top_logprobs if body.logprobs else None
    check_caps(svc.caps, limit, body.n, 1, body.stops, top)
    key = _key(request)
    svc.rates.take_request(key)
    svc.concurrency.acquire(key)
    try:
        messages = [(m.role, m.text) for m in body.messages]
        for _, text in messages:
            served.encode(text, limit or 0)  # the size bound, before the template runs
        try:
            ids = served.chat.prompt_ids(messages)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), "chat_template") from None
        max_tokens = limit if limit is not None else min(svc.caps.max_tokens, max(served.context - len(ids), 0))
        ids = served.fit(ids, max_tokens)
        logprobs = (top or 0) if body.logprobs else None
        specs = [
            ChoiceSpec(
                ids,
                max_tokens,
                body.temperature,
                body.top_p,
                choice_seed(body.seed, j),
                body.stops,
                served.chat.stop_token_ids,
                logprobs,
            )
            for j in range(body.n)
        ]
        return await _answer(request, svc, specs, [""] * body.n, [ids], body, chat=True, key=key)
    except BaseException:
        svc.concurrency.release(key)
        raise


def _infill(served: ServedModel, prefix: list[int], suffix: list[int]) -> list[int]:
    ids = served.tokenizer.fim_ids
    fim_prefix, fim_middle, fim_suffix = ids["prefix"], ids["middle"], ids["suffix"]
    if fim_prefix is None or fim_middle is None or fim_suffix is None:
        raise ApiError(
            400, "suffix asks for infilling, but this model's tokenizer has no fill-in-the-middle tokens", "fim_unsupported"
        )
    return fim_prompt(prefix, suffix, (fim_prefix, fim_middle, fim_suffix))


async def _answer(
    request: Request,
    svc: Services,
    specs: list[ChoiceSpec],
    prefixes: list[str],
    prompts: list[list[int]],
    body: CompletionRequest | ChatRequest,
    chat: bool,
    key: str,
) -> Response:
    """Submit, then answer as JSON or as server-sent events; the key's concurrency slot is released when
    the answer ends, however it ends."""
    served = svc.served
    prompt_tokens = sum(len(p) for p in prompts)
    svc.rates.take_tokens(key, prompt_tokens + sum(s.max_tokens for s in specs))
    choices = Choices(served, specs, request_id=secrets.token_hex(8))
    states = [_Choice(ChoiceText(s.stops, svc.redact, prefix), prompt_ids=s.prompt_ids) for s, prefix in zip(specs, prefixes)]
    for st, spec in zip(states, specs):
        if spec.max_tokens == 0:
            st.finish = "length"
    choices.submit()
    svc.metrics.prompt_tokens.inc(prompt_tokens)
    meta = {
        "id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
        "created": int(time.time()),
        "model": served.model_id,
    }

    def finish(completion_tokens: int) -> dict:
        svc.metrics.completion_tokens.inc(completion_tokens)
        for st in states:
            for kind, n in st.text.masked.items():
                svc.metrics.secrets_masked.labels(kind=kind).inc(n)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        request.scope.setdefault("state", {})["usage"] = {
            **usage,
            **({"prompt": served.tokenizer.decode(prompts[0]), "completion": states[0].completion} if svc.log_texts else {}),
        }
        return usage

    if getattr(body, "stream", False):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(svc, choices, states, meta, chat, include_usage, finish, key),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    try:
        if not await _collect(request, choices, states):
            return Response(status_code=499)  # the client is gone; nobody reads this
    finally:
        choices.close()
        svc.concurrency.release(key)
    out = [_final_choice(served, i, st, chat, body) for i, st in enumerate(states)]  # masks: before finish counts
    usage = finish(sum(st.n_generated for st in states))
    return JSONResponse({**meta, "object": "chat.completion" if chat else "text_completion", "choices": out, "usage": usage})


def _observe(st: _Choice, event: TokenEvent) -> None:
    """Fold one token event into the choice's state."""
    if event.token_id >= 0:
        st.n_generated = event.n_generated
        if event.logprob is not None and not event.is_stop_token:
            st.tokens.append(event.token_id)
            st.logprobs.append(event.logprob)
            st.tops.append(event.top or [])
            st.pending += 1
    if event.prompt_logprobs is not None:
        st.prompt_logprobs = event.prompt_logprobs
    st.completion = event.text
    if event.finish:
        st.finish = event.finish


async def _collect(request: Request, choices: Choices, states: list[_Choice]) -> bool:
    """Every event, while watching for the client to go away; False if it went (the caller cancels)."""

    async def consume() -> None:
        async for index, event in choices.events():
            _observe(states[index], event)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(consume()), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            work.result()
            return True
        return False
    finally:
        for t in (work, watch):
            t.cancel()


def _final_choice(served: ServedModel, index: int, st: _Choice, chat: bool, body: Any) -> dict:
    text = st.text.sent + st.text.update(st.completion, final=True)
    finish = st.finish or "length"
    if chat:
        lp = {"content": _chat_logprobs(served, st.tokens, st.logprobs, st.tops)} if body.logprobs else None
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": finish}
    lp = None
    if body.logprobs is not None:
        lp = _completion_logprobs(served, st, echo=body.echo, start=0, count=len(st.tokens))
    return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}


def _token_text(served: ServedModel, token: int) -> str:
    return served.tokenizer.decode([token])


def _completion_logprobs(served: ServedModel, st: _Choice, echo: bool, start: int, count: int) -> dict:
    tokens, lps, tops = st.tokens[start : start + count], st.logprobs[start : start + count], st.tops[start : start + count]
    out_tokens: list[str] = []
    out_lps: list[float | None] = []
    out_tops: list[dict[str, float] | None] = []
    if echo and start == 0 and st.prompt_logprobs is not None:
        for t, lp in zip(st.prompt_ids, st.prompt_logprobs):
            out_tokens.append(_token_text(served, t))
            out_lps.append(lp)
            out_tops.append(None)
    out_tokens += [_token_text(served, t) for t in tokens]
    out_lps += lps
    out_tops += [{_token_text(served, i): v for i, v in top} for top in tops]
    offsets: list[int] = []
    at = 0
    for piece in out_tokens:
        offsets.append(at)
        at += len(piece)
    return {"tokens": out_tokens, "token_logprobs": out_lps, "top_logprobs": out_tops, "text_offset": offsets}


def _chat_logprobs(served: ServedModel, tokens: list[int], lps: list[float], tops: list[list[tuple[int, float]]]) -> list[dict]:
    def entry(t: int, lp: float) -> dict:
        s = _token_text(served, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]} for t, lp, top in zip(tokens, lps, tops)]


async def _stream(
    svc: Services,
    choices: Choices,
    states: list[_Choice],
    meta: dict,
    chat: bool,
    include_usage: bool,
    finish: Callable[[int], dict],
    key: str,
) -> AsyncIterator[str]:
    served = svc.served
    obj = "chat.completion.chunk" if chat else "text_completion"

    def sse(choice_list: list[dict], usage: dict | None = None) -> str:
        payload = {**meta, "object": obj, "choices": choice_list}
        if include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def chunk(index: int, st: _Choice, text: str, done: bool) -> dict:
        count, st.pending = st.pending, 0
        start = len(st.tokens) - count
        if chat:
            delta = {"content": text} if text or not done else {}
            lp = (
                {"content": _chat_logprobs(served, st.tokens[start:], st.logprobs[start:], st.tops[start:])}
                if st.logprobs and count
                else None
            )
            return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": st.finish if done else None}
        lp = _completion_logprobs(served, st, echo=False, start=start, count=count) if count else None
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": (st.finish or "length") if done else None}

    try:
        if chat:
            yield sse(
                [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(len(states))
                ]
            )
        for i, st in enumerate(states):
            if st.finish:  # max_tokens=0: nothing to generate
                yield sse([chunk(i, st, st.text.update(st.completion, final=True), True)])
        async for index, event in choices.events():
            st = states[index]
            _observe(st, event)
            done = event.finish is not None
            text = st.text.update(st.completion, final=done)
            if text or done or st.pending:
                yield sse([chunk(index, st, text, done)])
        if include_usage:
            payload = {**meta, "object": obj, "choices": [], "usage": finish(sum(st.n_generated for st in states))}
            yield f"data: {json.dumps(payload)}\n\n"
        else:
            finish(sum(st.n_generated for st in states))
        yield "data: [DONE]\n\n"
    finally:
        choices.close()
        svc.concurrency.release(key)
