"""The FastAPI app: routes, and the layers in front of them.

From the outside in: ``CatchAll`` (no traceback ever reaches a client or the log), ``AccessObserver``
(log line, metrics, request log), ``AuthGuard`` (built from this app's route table: everything but
``/health`` needs a key), ``BodySizeLimit`` (413 before parsing), then FastAPI's routing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from codex_ml.serve.access import AccessObserver
from codex_ml.serve.auth import AuthGuard, KeyStore
from codex_ml.serve.errors import ApiError, CatchAll, install_error_handlers
from codex_ml.serve.generation import ServedModel
from codex_ml.serve.limits import BodySizeLimit, Caps, ConcurrencyLimiter, RateLimiter
from codex_ml.serve.metrics import ServerMetrics
from codex_ml.serve.openai_routes import Services, chat, complete
from codex_ml.serve.request_log import RequestLog
from codex_ml.serve.schemas import ChatRequest, CompletionRequest, DetokenizeRequest, JobRequest, TokenizeRequest

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from codex_ml.serve.jobs import JobManager


@dataclass
class AppSettings:
    """The ``serve.*`` settings the app itself uses."""

    caps: Caps
    max_body_bytes: int
    requests_per_minute: int
    tokens_per_minute: int
    max_concurrent_per_key: int
    redact_output: bool = True
    quiet: bool = False  # no access log lines (tests)


def create_app(
    served: ServedModel,
    settings: AppSettings,
    keys: KeyStore | None,
    jobs: JobManager | None = None,
    request_log: RequestLog | None = None,
) -> tuple[FastAPI, CatchAll]:
    """(the FastAPI app, the ASGI app to serve: the app inside its layers). ``keys`` None: no auth."""
    metrics = ServerMetrics()
    metrics.watch(served.scheduler)
    svc = Services(
        served,
        settings.caps,
        RateLimiter(settings.requests_per_minute, settings.tokens_per_minute),
        ConcurrencyLimiter(settings.max_concurrent_per_key),
        metrics,
        settings.redact_output,
        log_texts=request_log is not None,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if jobs is not None:
            jobs.start()
        try:
            yield
        finally:
            if jobs is not None:
                jobs.shutdown()
            served.scheduler.stop(timeout=30)

    app = FastAPI(title="codex-ml", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    install_error_handlers(app)
    app.state.services, app.state.metrics = svc, metrics

    # response_model=None on the routes that return dicts: their return annotations are for the type
    # checker only, so that FastAPI serialises them exactly as before (no response model)
    @app.get("/health", response_model=None)
    async def health() -> JSONResponse | dict:
        if served.scheduler.error is not None:
            return JSONResponse({"status": "error"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": served.model_id, "object": "model", "created": 0, "owned_by": "codex-ml", "max_model_len": served.context}

    @app.get("/v1/models", response_model=None)
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", response_model=None)
    async def model(model_id: str) -> dict:
        served.check_model(model_id)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await complete(request, body, svc)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest) -> Response:
        return await chat(request, body, svc)

    @app.post("/tokenize", response_model=None)
    async def tokenize(request: Request, body: TokenizeRequest) -> dict:
        served.check_model(body.model)
        svc.rates.take_request(request.scope["state"].get("key_name") or "anonymous")
        ids = served.tokenizer.encode(body.prompt)  # no context check: counting a long text is what this is for
        return {"tokens": ids, "count": len(ids), "max_model_len": served.context}

    @app.post("/detokenize", response_model=None)
    async def detokenize(request: Request, body: DetokenizeRequest) -> dict:
        served.check_model(body.model)
        svc.rates.take_request(request.scope["state"].get("key_name") or "anonymous")
        served.check_ids(body.tokens)
        return {"prompt": served.tokenizer.decode(body.tokens)}

    if jobs is not None:
        _job_routes(app, jobs)

    layered: ASGIApp = BodySizeLimit(app, settings.max_body_bytes)
    layered = AuthGuard(layered, app.router, keys)
    layered = AccessObserver(layered, app.router, metrics, request_log, quiet=settings.quiet)
    return app, CatchAll(layered)


def _job_routes(app: FastAPI, jobs: JobManager) -> None:
    @app.post("/v1/jobs", status_code=201, response_model=None)
    def submit_job(body: JobRequest) -> dict:  # plain def: validation composes the config (blocking), off the event loop
        return jobs.submit(body.command, list(body.overrides))

    @app.get("/v1/jobs", response_model=None)
    def list_jobs() -> dict:
        return {"object": "list", "data": jobs.list()}

    @app.get("/v1/jobs/{job_id}", response_model=None)
    def get_job(job_id: str) -> dict:
        return _found(jobs.get(job_id), job_id)

    @app.get("/v1/jobs/{job_id}/logs")
    def job_logs(job_id: str) -> PlainTextResponse:
        _found(jobs.get(job_id), job_id)
        return PlainTextResponse(jobs.logs(job_id))

    @app.delete("/v1/jobs/{job_id}", response_model=None)
    def cancel_job(job_id: str) -> dict:
        _found(jobs.get(job_id), job_id)
        return jobs.cancel(job_id)


def _found(job: dict | None, job_id: str) -> dict:
    if job is None:
        raise ApiError(404, f"no job {job_id[:40]!r}", "job_not_found")
    return job
