"""Limits checked before any tokenization or model work: body size, caps, rates and concurrency per key.

``BodySizeLimit`` reads at most ``max_body_bytes`` of a body (``Content-Length`` or chunked) and
answers 413 past it, before anything parses it. ``check_caps`` refuses settings beyond the caps.
``RateLimiter`` keeps two token buckets per key (requests and tokens per minute) and answers 429
with the seconds until the request would fit; ``ConcurrencyLimiter`` caps requests in flight per key.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from codex_ml.serve.errors import ApiError, error_body


class BodySizeLimit:
    """ASGI layer: buffers the body up to ``max_bytes`` and answers 413 past it; the app then reads the
    buffered body, and later ``receive`` calls (a client's disconnect) go to the server as usual."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k.lower() == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    return await _too_large(send, "invalid Content-Length", 400)
                if declared > self.max_bytes:
                    return await _too_large(send, f"the body has {declared} bytes; serve.max_body_bytes is {self.max_bytes}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _too_large(send, f"the body exceeds serve.max_body_bytes={self.max_bytes}")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(send: Send, message: str, status: int = 413) -> None:
    body = json.dumps(error_body(status, message, "request_too_large" if status == 413 else "invalid_request")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True)
class Caps:
    max_tokens: int
    max_n: int
    max_prompts: int
    max_stop: int
    max_stop_chars: int
    max_logprobs: int


def check_caps(caps: Caps, max_tokens: int | None, n: int, n_prompts: int, stops: list[str], logprobs: int | None) -> None:
    """400 naming the setting and its cap."""
    if max_tokens is not None and max_tokens > caps.max_tokens:
        raise ApiError(400, f"max_tokens={max_tokens} exceeds this server's cap of {caps.max_tokens}", "max_tokens_exceeded")
    if n > caps.max_n:
        raise ApiError(400, f"n={n} exceeds this server's cap of {caps.max_n}", "n_exceeded")
    if n_prompts > caps.max_prompts:
        raise ApiError(400, f"{n_prompts} prompts exceed this server's cap of {caps.max_prompts}", "too_many_prompts")
    if n_prompts == 0:
        raise ApiError(400, "prompt: an empty list", "invalid_request")
    if len(stops) > caps.max_stop:
        raise ApiError(400, f"{len(stops)} stop strings exceed this server's cap of {caps.max_stop}", "too_many_stops")
    longest = max((len(s) for s in stops), default=0)
    if longest > caps.max_stop_chars:
        raise ApiError(400, f"a stop string of {longest} characters exceeds the cap of {caps.max_stop_chars}", "stop_too_long")
    if logprobs is not None and logprobs > caps.max_logprobs:
        raise ApiError(400, f"logprobs={logprobs} exceeds this server's cap of {caps.max_logprobs}", "logprobs_exceeded")


def check_context(prompt_tokens: int, max_tokens: int, context: int) -> None:
    """400 naming both numbers when the prompt and the completion cannot fit the model's context."""
    if prompt_tokens + max_tokens > context:
        raise ApiError(
            400,
            f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: {prompt_tokens + max_tokens} "
            f"tokens exceed the model's context of {context}",
            "context_length_exceeded",
        )


class _Bucket:
    """A token bucket: ``capacity`` tokens, refilled at ``capacity`` per minute."""

    def __init__(self, capacity: float) -> None:
        self.capacity, self.rate = capacity, capacity / 60.0
        self.level, self.at = capacity, time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def take(self, amount: float) -> float:
        """0 when taken, else the seconds until ``amount`` would be available (nothing taken)."""
        self._refill()
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.rate


class RateLimiter:
    """Requests and tokens per minute, per key."""

    def __init__(self, requests_per_minute: int, tokens_per_minute: int) -> None:
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take_request(self, key: str) -> None:
        with self._lock:
            wait = self._requests.setdefault(key, _Bucket(self.rpm)).take(1)
        if wait:
            raise _limited(wait, f"rate limit: serve.requests_per_minute={self.rpm} for this key")

    def take_tokens(self, key: str, tokens: int) -> None:
        if tokens > self.tpm:
            raise ApiError(
                400,
                f"this request needs {tokens} tokens (prompt + max_tokens x n), more than serve.tokens_per_minute={self.tpm}",
                "tokens_exceeded",
            )
        with self._lock:
            wait = self._tokens.setdefault(key, _Bucket(self.tpm)).take(tokens)
        if wait:
            raise _limited(wait, f"rate limit: serve.tokens_per_minute={self.tpm} for this key")


def _limited(wait: float, message: str) -> ApiError:
    return ApiError(429, message, "rate_limit_exceeded", {"Retry-After": str(max(1, math.ceil(wait)))})


class ConcurrencyLimiter:
    """At most ``limit`` requests in flight per key."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._active: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> None:
        with self._lock:
            if self._active.get(key, 0) >= self.limit:
                raise ApiError(
                    429,
                    f"serve.max_concurrent_per_key={self.limit} requests are in flight for this key",
                    "concurrency_limit",
                    {"Retry-After": "1"},
                )
            self._active[key] = self._active.get(key, 0) + 1

    def release(self, key: str) -> None:
        with self._lock:
            self._active[key] -= 1
            if not self._active[key]:
                del self._active[key]

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        self.acquire(key)
        try:
            yield
        finally:
            self.release(key)
