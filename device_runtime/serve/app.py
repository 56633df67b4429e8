"""The HTTP API of ``km-edge serve`` as a Starlette app (uvicorn runs it; see ``server.py``).

Every outside input is bounded before use: the body (Content-Length, then while streaming), the
number of images, each image's pixels (from its header, before decoding), ``top_k``. Work runs on
a fixed thread pool behind a bounded queue: when the queue is full a request gets 503 with
Retry-After at once instead of waiting without limit. Errors are one-line JSON objects
``{"error": ..., "status": ...}``. A bearer token, when configured, guards every path but
``/healthz`` and is compared in constant time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import ImageError, KmEdgeError, StateError
from ..preprocess import load_image, preprocess
from ..runtime import top_predictions
from . import metrics as prom
from .catalog import PackCatalog, TaskNotFound, TaskRefused
from .openapi import openapi_document

__all__ = ["ServeOptions", "ServerMetrics", "build_app"]

log = logging.getLogger(__name__)
UNKNOWN_TASK = "_unknown"  # metric label for requests naming no loaded or refused task
MAX_NAME_CHARS = 200  # of an uploaded file name echoed back in the answer


@dataclass(frozen=True)
class ServeOptions:
    """Limits and policies of one server (the CLI flags of ``km-edge serve``)."""

    max_body_bytes: int = 20 * 2**20
    max_images: int = 32
    max_pixels: int = 25_000_000
    max_top_k: int = 1000
    workers: int = 1
    queue_size: int = 16
    retry_after_s: int = 1
    token: bytes | None = None

    @property
    def capacity(self) -> int:
        """Requests admitted at once: one per worker plus the waiting queue."""
        return self.workers + self.queue_size


class ServerMetrics:
    """The families ``/metrics`` exposes."""

    def __init__(self, catalog_source, queue_source):
        self.registry = prom.Registry()
        add = self.registry.add
        self.requests = add(prom.Counter("km_edge_requests_total",
                                         "Predict requests by task and HTTP status code.", ("task", "code")))
        self.errors = add(prom.Counter("km_edge_request_errors_total",
                                       "Predict requests answered with an error (status >= 400).",
                                       ("task", "code")))
        self.latency = add(prom.Histogram("km_edge_request_duration_seconds",
                                          "Predict request latency, receipt to answer.", ("task",)))
        self.pack_loads = add(prom.Counter("km_edge_pack_loads_total",
                                           "Packs verified and swapped in, by task.", ("task",)))
        self.refusals = add(prom.Counter("km_edge_pack_refusals_total",
                                         "Pack files refused, by reason.", ("reason",)))
        self.unloads = add(prom.Counter("km_edge_pack_unloads_total",
                                        "Tasks unloaded because their pack file was removed.", ("task",)))
        self.cache_hits = add(prom.Counter("km_edge_session_cache_hits_total",
                                           "Predict requests that found their task's session built."))
        self.cache_misses = add(prom.Counter("km_edge_session_cache_misses_total",
                                             "Predict requests that had to rebuild an evicted session."))
        add(prom.Gauge("km_edge_pack_version", "Pack version being served, by task.", ("task",),
                       source=catalog_source))
        add(prom.Gauge("km_edge_queue_depth", "Predict requests admitted and not yet answered.",
                       source=queue_source))


class ApiError(Exception):
    """An answer other than 200: status, one-line message, optional headers and reason."""

    def __init__(self, status: int, message: str, headers: dict | None = None, reason: str | None = None):
        super().__init__(message)
        self.status, self.headers, self.reason = status, headers or {}, reason

    def response(self) -> JSONResponse:
        return error_response(self.status, str(self), self.headers, self.reason)


def error_response(status: int, message: str, headers: dict | None = None,
                   reason: str | None = None) -> JSONResponse:
    body = {"error": " ".join(str(message).split()), "status": status}
    if reason:
        body["reason"] = reason
    return JSONResponse(body, status_code=status, headers=headers)


class BearerAuth:
    """ASGI middleware: ``Authorization: Bearer <token>`` on every path except the open ones."""

    def __init__(self, app, token: bytes, open_paths=("/healthz",)):
        self.app, self.token, self.open_paths = app, token, frozenset(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            given = b""
            for name, value in scope.get("headers", ()):
                if name == b"authorization" and value[:7].lower() == b"bearer ":
                    given = value[7:].strip()
            if not hmac.compare_digest(given, self.token):
                response = error_response(401, "missing or wrong bearer token",
                                          {"WWW-Authenticate": 'Bearer realm="km-edge"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(catalog: PackCatalog, options: ServeOptions, metrics: ServerMetrics | None = None,
              polling_interval_s: float | None = None) -> Starlette:
    """The Starlette app; its lifespan starts the pack poller (when an interval is given) and, on
    shutdown, stops it and lets running inference finish before the thread pool goes."""
    runtime = catalog.runtime
    executor = ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="km-edge-infer")
    admitted = 0
    if metrics is None:
        metrics = ServerMetrics(lambda: {(s.task,): s.version for s in catalog.served()},
                                lambda: {(): admitted})
    catalog.metrics = metrics

    def infer(task: str, images: list[tuple[str, bytes]], top_k: int) -> dict:
        """Runs on a worker thread: the task's pack is taken once, so a swap cannot change it."""
        served, loaded = catalog.session(task)
        spec = runtime.preprocess_spec_for(loaded)
        arrays, good, errors = [], [], {}
        for index, (name, data) in enumerate(images):
            try:
                image = load_image(io.BytesIO(data), max_pixels=options.max_pixels, label=name)
                arrays.append(preprocess(image, spec))
                good.append(index)
            except ImageError as exc:
                errors[index] = str(exc)
        if not good:
            raise ApiError(400, errors[0] if len(errors) == 1 else
                           f"no image could be read ({len(errors)}): {errors[0]}", reason="bad_image")
        ranked = top_predictions(loaded.logits(loaded.backend.features(np.stack(arrays))),
                                 loaded.labels, top_k)
        rows = dict(zip(good, ranked))
        predictions = [{"image": name, "error": errors[i]} if i in errors else {"image": name, "top": rows[i]}
                       for i, (name, _) in enumerate(images)]
        pack = served.pack
        return {"task": task, "pack_version": served.version, "key_id": pack.key_id,
                "base_id": pack.base_id, "predictions": predictions}

    async def predict(request: Request) -> Response:
        nonlocal admitted
        task = request.path_params["task"]
        label, status, started = task, 500, time.perf_counter()
        try:
            try:
                catalog.lookup(task)
            except TaskNotFound as exc:
                label = UNKNOWN_TASK
                raise ApiError(404, str(exc), reason="unknown_task") from None
            except TaskRefused as exc:
                raise ApiError(409, str(exc), reason=exc.reason) from None
            top_k = _top_k(request.query_params.get("top_k"), options.max_top_k)
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > options.max_body_bytes):
                raise ApiError(413, f"request body of {length} bytes is larger than the limit of "
                                    f"{options.max_body_bytes} bytes", reason="body_too_large")
            if admitted >= options.capacity:
                raise ApiError(503, f"server busy ({admitted} requests in progress or queued); retry later",
                               {"Retry-After": str(options.retry_after_s)}, reason="queue_full")
            admitted += 1
            try:
                images = await _read_images(request, options)
                result = await asyncio.get_running_loop().run_in_executor(
                    executor, infer, task, images, top_k)
            finally:
                admitted -= 1
            status = 200
            return JSONResponse(result)
        except ApiError as exc:
            status = exc.status
            return exc.response()
        except TaskNotFound as exc:  # unloaded between the lookup and the worker
            status = 404
            return error_response(404, str(exc), reason="unknown_task")
        except TaskRefused as exc:
            status = 409
            return error_response(409, str(exc), reason=exc.reason)
        except StateError as exc:
            status = 503
            return error_response(503, str(exc), reason="state_error")
        except KmEdgeError as exc:  # an evicted session's rebuild was refused (e.g. rollback)
            status = 409
            return error_response(409, str(exc), reason="refused")
        except ClientDisconnect:
            status = 499
            return Response(status_code=499)
        finally:
            metrics.requests.inc(task=label, code=str(status))
            if status >= 400:
                metrics.errors.inc(task=label, code=str(status))
            metrics.latency.observe(time.perf_counter() - started, task=label)

    async def list_tasks(request: Request) -> Response:
        return JSONResponse({
            "base_id": runtime.base.base_id,
            "tasks": [s.describe() for s in catalog.served()],
            "refused": [r.describe() for r in catalog.refusals()],
        })

    async def healthz(request: Request) -> Response:
        if catalog.ready:
            return JSONResponse({"status": "ok", "tasks": len(catalog.served())})
        return JSONResponse({"status": "starting", "reason": "no task pack loaded yet"}, status_code=503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.registry.render(), media_type=prom.CONTENT_TYPE)

    document = openapi_document(options)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(exc.status_code, exc.detail, getattr(exc, "headers", None))

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return error_response(500, f"internal error: {type(exc).__name__}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if polling_interval_s is not None:
            catalog.start_polling(polling_interval_s)
        try:
            yield
        finally:
            # uvicorn lets requests in flight finish before this runs; a load in progress completes
            await asyncio.to_thread(catalog.stop_polling)
            await asyncio.to_thread(executor.shutdown, True)

    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/v1/tasks", list_tasks, methods=["GET"]),
            Route("/v1/tasks/{task}/predict", predict, methods=["POST"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
    if options.token:
        app.add_middleware(BearerAuth, token=options.token)
    return app


def _top_k(raw: str | None, limit: int) -> int:
    if raw is None:
        return 5
    if not raw.isdigit() or not 1 <= int(raw) <= limit:
        raise ApiError(400, f"top_k must be an integer from 1 to {limit}, got {raw[:40]!r}", reason="bad_top_k")
    return int(raw)


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it passes ``limit`` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is larger than the limit of {limit} bytes",
                           reason="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_images(request: Request, options: ServeOptions) -> list[tuple[str, bytes]]:
    """[(name, bytes)]: the raw body as one image, or every file part of a multipart form."""
    body = await _read_body(request, options.max_body_bytes)
    content_type = request.headers.get("content-type", "")
    if content_type.lower().startswith("multipart/form-data"):
        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(
                max_files=options.max_images + 1, max_fields=options.max_images + 8)
        except HTTPException as exc:  # python-multipart's refusal, as Starlette reports it
            raise ApiError(400, f"bad multipart body: {exc.detail}", reason="bad_multipart") from None
        try:
            images = []
            for key, value in form.multi_items():
                if hasattr(value, "read"):
                    images.append(((value.filename or key)[:MAX_NAME_CHARS], await value.read()))
        finally:
            await form.close()
        if not images:
            raise ApiError(400, "multipart body has no file parts; send each image as a file",
                           reason="no_image")
    else:
        if not body:
            raise ApiError(400, "empty body: send the image bytes (raw body, or multipart files)",
                           reason="no_image")
        images = [("body", body)]
    if len(images) > options.max_images:
        raise ApiError(400, f"{len(images)} images in one request; the limit is {options.max_images}",
                       reason="too_many_images")
    return images
