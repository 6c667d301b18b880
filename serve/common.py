"""The HTTP shell shared by the Serve apps (:class:`ServerBase`): a FastAPI app per replica (Serve's ingress), with
auth, body limits, the project's JSON errors, admission control, streaming, batching, stats, health and shutdown.

Threads: the event loop only reads, parses and validates requests (cheap, no pixel decoding). Image decoding,
tokenisation and generation all run on one "gen" thread, batch by batch. Why: with a small model, ``generate`` is
Python-bound and holds the GIL most of the time; when requests were also encoded on a second thread, that thread
was starved and most in-flight requests sat in preparation instead of the batch queue (batches of 2-5 at
concurrency 32). Preparing inside the batch keeps the queue full, so batches fill up. It also keeps each
tokenizer on a single thread (HF fast tokenizers are not safe to call concurrently).

Streaming shares the batches: a streamed row is an ordinary batch row with a :class:`~serve.engine.TokenSink`
that the generation thread feeds step by step, so streamed and plain requests decode together (Serve's batched
generators would need every row of a batch to stream).
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from fastapi import Request

from mmrole.serving import (
    AppConfig,
    BatchStats,
    RequestError,
    body_too_large,
    check_bearer,
    check_content_length,
    header_value,
    parse_json_object,
)
from mmrole.serving.schemas import Health, request_schemas
from mmrole.serving.streaming import DONE, error_event, sse

from .batch_decode import decode_batch, is_fatal
from .engine import Engine, Job, Row, TokenSink
from .shell import ERRORS, EventStream, ShellMiddleware, json_response, rss_bytes, web_dir

log = logging.getLogger("ray.serve")  # Serve's documented logger: lines land in the replica logs


class ServerBase:
    """HTTP shell shared by the agent and judge deployments. Subclasses add their routes in ``add_routes`` and
    define a ``@serve.batch`` method ``_batch`` that awaits :meth:`_run_batch` (each class needs its own decorated
    method: the batch queue belongs to the decorated function)."""

    cfg: AppConfig
    title = "mmrole"
    page = "agent.html"

    def _setup(self, cfg: AppConfig) -> None:
        from ray import serve

        self.cfg = cfg
        self.limits = cfg.limits
        self.defaults = cfg.default_params()
        self.stats = BatchStats()
        self.created = int(time.time())
        self.pid = os.getpid()
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (e.g. a unit test of the class)
            self.replica_id = f"local-{self.pid}"
        self._token = os.environ.get(cfg.api_token_env) or None
        self._gen = ThreadPoolExecutor(1, thread_name_prefix="mmrole-gen")
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="mmrole-load")  # adapters load beside serving
        self._batch_started: Optional[float] = None
        self._fatal: Optional[str] = None
        self._ongoing = 0  # admitted requests inside a handler or stream right now
        self._admit = cfg.deployment.max_ongoing_requests
        self._latency_s = 1.0  # moving average of admitted requests' durations (for Retry-After)
        self.engine = Engine.load(cfg.model, cfg.model_name, cfg.torch_threads)
        # Size the batcher from the config (the decorator's values are only defaults).
        self._batch.set_max_batch_size(cfg.batching.max_batch_size)
        self._batch.set_batch_wait_timeout_s(cfg.batching.batch_wait_timeout_s)
        self._wait_now = cfg.batching.batch_wait_timeout_s
        log.info(
            "replica %s ready: model %s, batch %d/%.3fs, admits %d, auth %s",
            self.replica_id,
            cfg.model_name,
            cfg.batching.max_batch_size,
            cfg.batching.batch_wait_timeout_s,
            self._admit,
            "on" if self._token else "off",
        )

    # -- to override
    def add_routes(self, app) -> None:
        raise NotImplementedError

    async def _batch(self, job: Job) -> Any:  # replaced by a @serve.batch method in subclasses
        raise NotImplementedError

    # -- the ASGI app (Serve calls __serve_build_asgi_app__ after __init__)
    def __serve_build_asgi_app__(self):
        return self.build_http_app()

    def build_http_app(self):
        """The replica's FastAPI app: routes, OpenAPI (``/openapi.json``, ``/docs``), errors in the project's
        JSON shape, per-route stats and access log."""
        from fastapi import FastAPI
        from fastapi.staticfiles import StaticFiles
        from starlette.exceptions import HTTPException
        from starlette.responses import HTMLResponse

        app = FastAPI(
            title=self.title,
            version="1",
            description=(type(self).__doc__ or "").strip(),
            docs_url="/docs",
            redoc_url=None,
            openapi_url="/openapi.json",
        )

        async def on_request_error(request, exc: RequestError):
            return json_response(exc.body(), exc.status, exc.headers)

        async def on_http_error(request, exc: HTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
            msg = {404: f"no route {request.url.path}; see GET /v1/models or /docs"}.get(exc.status_code)
            err = RequestError(exc.status_code, msg or f"{exc.detail} ({request.method} {request.url.path})")
            err.code = code
            return json_response(err.body(), exc.status_code, dict(exc.headers or {}))

        app.add_exception_handler(RequestError, on_request_error)
        app.add_exception_handler(HTTPException, on_http_error)
        app.add_middleware(ShellMiddleware, server=self)
        with open(os.path.join(web_dir(), self.page), encoding="utf-8") as f:
            page_html = f.read()

        async def page(request: Request):
            # <base> = the app's route prefix, so the page's relative URLs work under any prefix, slash or not.
            base = html.escape(request.scope.get("root_path", "").rstrip("/") + "/", quote=True)
            return HTMLResponse(page_html.replace("<head>", f'<head>\n<base href="{base}">', 1))

        app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
        app.mount("/static", StaticFiles(directory=web_dir()), name="static")
        for path in ("/health", "/healthz"):
            app.add_api_route(path, self._health, methods=["GET"], response_model=Health, summary="liveness (no auth)")
        self.route(app, "GET", "/v1/stats", self._stats, summary="batch sizes, statuses by route, memory")
        self.route(app, "GET", "/v1/limits", self._limits, summary="what one request may carry")
        self.add_routes(app)
        refs, defs = request_schemas()
        base_openapi = app.openapi

        def openapi():
            doc = base_openapi()
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs)
            return doc

        app.openapi = openapi
        return app

    def route(
        self,
        app,
        method: str,
        path: str,
        handler: Callable[[Any], Awaitable[Any]],
        *,
        auth: bool = True,
        admit: bool = False,
        body: Optional[str] = None,
        response_model: Any = None,
        stream_doc: bool = False,
        summary: str = "",
    ) -> None:
        """Register ``handler(request)``: bearer auth, admission (``admit``: counted against the replica's limit,
        503 beyond it) and the OpenAPI entry (``body``: request model name)."""

        async def endpoint(request: Request):
            if auth and not check_bearer(request.headers.get("authorization"), self._token):
                raise RequestError(
                    401,
                    "missing or invalid bearer token (Authorization: Bearer <token>)",
                    None,
                    "unauthorized",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            if not admit:
                return await handler(request)
            return await self._admitted(handler, request)

        extra: dict = {}
        if body:
            refs, _ = request_schemas()
            extra["requestBody"] = {"required": True, "content": {"application/json": {"schema": {"$ref": refs[body]}}}}
        names = re.findall(r"{(\w+)(?::\w+)?}", path)
        if names:  # the handler reads path parameters from the request; document them
            extra["parameters"] = [
                {"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names
            ]
        if stream_doc:
            extra.setdefault("responses", {})["200"] = {
                "description": "JSON, or text/event-stream when stream is true",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            }
        endpoint.__name__ = f"{method.lower()}_{path.strip('/').replace('/', '_') or 'root'}"
        app.add_api_route(
            path,
            endpoint,
            methods=[method],
            response_model=response_model,
            responses=ERRORS if (auth or body) else None,
            openapi_extra=extra or None,
            summary=summary or None,
        )

    async def _admitted(self, handler, request) -> Any:
        """Run an admitted request; beyond the limit answer 503 at once with ``Retry-After``. A streamed
        response keeps its slot until the stream ends (or its client goes away)."""
        if self._ongoing >= self._admit:
            retry = max(1, math.ceil(self._latency_s))
            raise RequestError(
                503,
                f"server busy: {self._ongoing} requests in progress on this replica; retry after {retry}s",
                None,
                "overloaded",
                headers={"Retry-After": str(retry)},
            )
        self._ongoing += 1
        t0 = time.monotonic()
        handed_over = False

        def release() -> None:
            self._ongoing -= 1
            self._latency_s = 0.8 * self._latency_s + 0.2 * (time.monotonic() - t0)

        try:
            resp = await handler(request)
            if isinstance(resp, EventStream):
                resp.on_close.append(release)
                handed_over = True
            return resp
        finally:
            if not handed_over:
                release()

    # -- batching
    async def _run_batch(self, jobs: list[Job]) -> list[Any]:
        """Prepare and decode one batch on the gen thread. Each job gets a :class:`Row`, or the exception its
        preparation raised (a :class:`RequestError` for bad input); the other rows still decode."""
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        self._batch_started = t0

        try:
            out, n = await loop.run_in_executor(self._gen, decode_batch, jobs)
        except Exception as e:
            if is_fatal(e):  # a broken device: let Serve replace this replica
                self._fatal = f"{type(e).__name__}: {e}"
            log.exception("batch of %d failed", len(jobs))
            raise
        finally:
            self._batch_started = None
        if n:
            self.stats.record_batch(n, time.monotonic() - t0)
        return out

    async def _submit(self, job: Job) -> Row:
        """Queue one row for batching; re-raise its request error here, in its own request.

        Adaptive wait: a request alone in the replica starts its batch at once (nobody else is coming, so the
        batch wait would be pure latency); with company, the batch waits up to ``batch_wait_timeout_s``."""
        wait = self.cfg.batching.batch_wait_timeout_s if self._ongoing > 1 else 0.0
        if wait != self._wait_now:
            self._batch.set_batch_wait_timeout_s(wait)  # read by Serve when the next batch starts
            self._wait_now = wait
        res = await self._batch(job)
        if isinstance(res, BaseException):
            raise res
        return res

    async def _stream(
        self,
        job: Job,
        chunks: Callable[[str], list[dict]],
        final: Callable[[Row, str], list[dict]],
        headers: dict,
        opening: Optional[list[dict]] = None,
    ):
        """Submit a streamed row and answer ``text/event-stream``: ``chunks(delta)`` per new piece of text,
        ``final(row, last_delta)`` at the end, then ``[DONE]``. Bad input found while preparing the row (e.g. a
        corrupt image) is still a 4xx JSON answer: the response starts at the first token. A failure after that
        ends the stream with an error event; a client that goes away stops its row."""
        sink = TokenSink(asyncio.get_running_loop())
        job.sink = sink
        task = asyncio.ensure_future(self._submit(job))
        first = await _next_event(sink, task)  # raises the row's RequestError before any byte is sent

        async def events() -> AsyncIterator[bytes]:
            sent = ""
            item = first
            try:
                for c in opening or ():
                    yield sse(c)
                while True:
                    if item is None:  # the row is done
                        row = task.result()
                        rest = row.text[len(sent) :] if row.text.startswith(sent) else ""
                        for c in final(row, rest):
                            yield sse(c)
                        yield DONE
                        return
                    kind, text = item
                    if kind == "text" and text.startswith(sent) and len(text) > len(sent):
                        for c in chunks(text[len(sent) :]):
                            yield sse(c)
                        sent = text
                    item = await _next_event(sink, task)
            except (asyncio.CancelledError, GeneratorExit):
                sink.cancelled = True
                raise
            except Exception as e:
                log.warning("stream failed: %s: %s", type(e).__name__, e)
                yield sse(error_event(e))
                yield DONE
            finally:
                if not task.done():
                    sink.cancelled = True  # stop_row (below) cancels the task and counts the disconnect

        def stop_row() -> None:  # however the response ends (even before its first byte), the row stops
            if not task.done():  # the client went away mid-stream
                self.stats.streams_cancelled += 1
                sink.cancelled = True
                task.cancel()

        resp = EventStream(
            events(), media_type="text/event-stream", headers=self._headers({**headers, "cache-control": "no-cache"})
        )
        resp.on_close.append(stop_row)
        return resp

    async def _load_call(self, fn: Callable, *args) -> Any:
        """Run a model load off the event loop (and off the gen thread, which keeps serving)."""
        return await asyncio.get_running_loop().run_in_executor(self._loader, fn, *args)

    # -- HTTP helpers
    async def _read_json(self, request) -> dict:
        check_content_length(request.headers.get("content-length"), self.limits)
        buf = bytearray()
        async for chunk in request.stream():  # also caps bodies sent without Content-Length (chunked)
            buf += chunk
            if len(buf) > self.limits.max_body_bytes:
                raise body_too_large(self.limits)
        return parse_json_object(bytes(buf))

    def _headers(self, extra: Optional[dict] = None) -> dict:
        h = {"x-mmrole-replica": header_value(self.replica_id), "x-mmrole-pid": str(self.pid)}
        if extra:
            h.update(extra)
        return h

    async def _health(self) -> Any:
        try:
            self.check_health()
        except RuntimeError as e:
            raise RequestError(503, str(e), None, "unhealthy")
        return json_response({"status": "ok", "replica": self.replica_id}, headers=self._headers())

    async def _limits(self, request) -> Any:
        return json_response(dataclasses.asdict(self.limits), headers=self._headers())

    async def _stats(self, request) -> Any:
        body = {
            "replica": self.replica_id,
            "pid": self.pid,
            "model": self.cfg.model_name,
            "max_batch_size": self.cfg.batching.max_batch_size,
            "batch_wait_timeout_s": self.cfg.batching.batch_wait_timeout_s,
            "admission_limit": self._admit,
            "rss_bytes": rss_bytes(),
            "auth": bool(self._token),
            "ongoing": self._ongoing,
            "adapters": self.engine.pool.snapshot() if self.engine and self.engine.pool else None,
            **self.stats.snapshot(),
        }
        return json_response(body, headers=self._headers())

    # -- Serve hooks
    def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica."""
        if self._fatal:
            raise RuntimeError(f"replica unhealthy after a device error: {self._fatal}")
        started = self._batch_started
        if started is not None and time.monotonic() - started > self.cfg.stuck_batch_s:
            raise RuntimeError(f"a batch has been decoding for over {self.cfg.stuck_batch_s:.0f}s")

    def _shutdown(self) -> None:
        """Graceful shutdown: Serve has already drained ongoing requests (graceful_shutdown_timeout_s); finish
        the batch in flight, then release the model (and its GPU memory)."""
        for pool in (getattr(self, "_loader", None), getattr(self, "_gen", None)):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        eng = getattr(self, "engine", None)
        if eng is not None:
            eng.close()
            self.engine = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass

    def __del__(self):
        self._shutdown()
        tmp = getattr(self, "_demo_tmp", None)  # the demo dataset a replica built for "dataset_root: demo"
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


async def _next_event(sink: TokenSink, task: asyncio.Future) -> Optional[tuple]:
    """The next ``(kind, text)`` of a streamed row, or None once the row is done (its result or error is in
    ``task``; a preparation error is raised here)."""
    if task.done():
        task.result()  # raises the row's error
        return None
    get = asyncio.ensure_future(sink.queue.get())
    done, _ = await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        item = get.result()
        if item[0] == "error":
            raise item[1]
        return item
    get.cancel()
    task.result()
    return None


__all__ = ["Engine", "EventStream", "Job", "Row", "ServerBase", "json_response", "rss_bytes", "web_dir"]
