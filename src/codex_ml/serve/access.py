"""One observation per request when its response ends: a log line (no key, no prompt, no completion),
the request counter by route and status, and the request-log row."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from starlette.routing import Match

if TYPE_CHECKING:
    from starlette.routing import Router
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from codex_ml.serve.metrics import ServerMetrics
    from codex_ml.serve.request_log import RequestLog


class AccessObserver:
    """ASGI layer; handlers leave token counts and texts in ``scope["state"]["usage"]``."""

    def __init__(
        self, app: ASGIApp, router: Router, metrics: ServerMetrics, request_log: RequestLog | None = None, quiet: bool = False
    ) -> None:
        self.app, self.router, self.metrics, self.request_log, self.quiet = app, router, metrics, request_log, quiet

    def _route(self, scope: Scope) -> str:
        for route in self.router.routes:
            if route.matches(scope)[0] == Match.FULL:
                return getattr(route, "path", "?")
        return "unmatched"  # not the raw path: it could carry anything a client sends

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 0
        state = scope.setdefault("state", {})

        async def observing_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._record(scope, state, status, time.perf_counter() - start)  # before the client can see the end
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        finally:
            if not state.get("_recorded"):  # the client went away before the end of the response
                self._record(scope, state, status or 499, time.perf_counter() - start)

    def _record(self, scope: Scope, state: dict, status: int, latency: float) -> None:
        if state.get("_recorded"):
            return
        state["_recorded"] = True
        route = self._route(scope)
        self.metrics.requests.labels(route=route, status=str(status)).inc()
        usage = state.get("usage") or {}
        if not self.quiet:
            key = state.get("key_name") or "-"
            tokens = f" {usage['prompt_tokens']}+{usage['completion_tokens']} tokens" if usage else ""
            print(
                f"{scope.get('method')} {route} {status} {latency * 1000:.0f} ms key={key}{tokens}", file=sys.stderr, flush=True
            )
        if self.request_log is not None:
            self.request_log.write(
                state.get("key_name"),
                route,
                status,
                latency,
                usage.get("prompt_tokens"),
                usage.get("completion_tokens"),
                usage.get("prompt"),
                usage.get("completion"),
            )
