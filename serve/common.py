"""Shared pieces of the Serve apps: the batched model (:class:`Engine`, usable without Ray) and the HTTP shell
(:class:`ServerBase`: routing, auth, body limits, JSON errors, batching, stats, health and shutdown).

Threads: the event loop only reads, parses and validates requests (cheap, no pixel decoding). Image decoding,
tokenisation and generation all run on one "gen" thread, batch by batch. Why: with a small model, ``generate`` is
Python-bound and holds the GIL most of the time; when requests were also encoded on a second thread, that thread
was starved and most in-flight requests sat in preparation instead of the batch queue (batches of 2-5 at
concurrency 32). Preparing inside the batch keeps the queue full, so batches fill up. It also keeps each
tokenizer on a single thread (HF fast tokenizers are not safe to call concurrently).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

from mmrole.serving import (
    AppConfig,
    BatchStats,
    RequestError,
    apply_stops,
    body_too_large,
    check_bearer,
    check_content_length,
    header_value,
    params_key,
    parse_json_object,
)

log = logging.getLogger("mmrole.serve")


# ------------------------------------------------------------------------------------------------ engine


def materialize_model_path(model: dict) -> tuple[dict, Optional[str]]:
    """``model_path: tiny:<family>`` -> a freshly written tiny random-weight model in a temp dir (CPU demos and
    tests need no download). Returns the VLMConfig dict and the temp dir to delete later (or None)."""
    cfg = dict(model)
    path = str(cfg.get("model_path", ""))
    if not path.startswith("tiny:"):
        return cfg, None
    from mmrole.models import make_tiny_vlm

    tmp = tempfile.mkdtemp(prefix="mmrole-tiny-")
    make_tiny_vlm(tmp, family=path[5:] or "qwen2_5_vl", seed=0)
    cfg["model_path"] = tmp
    return cfg, tmp


class Engine:
    """A loaded VLM that encodes one request at a time and decodes many together; no Ray involved, so the
    benchmark can call it in-process to measure what Serve adds."""

    def __init__(self, vlm: Any, name: str, tmp_dir: Optional[str] = None):
        self.vlm = vlm
        self.name = name
        self._tmp_dir = tmp_dir

    @classmethod
    def load(cls, model: dict, name: str, torch_threads: Optional[int] = None) -> Engine:
        import torch

        from mmrole.models import VLMConfig, build_vlm

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        cfg, tmp = materialize_model_path(model)
        vlm = build_vlm(VLMConfig.from_dict(cfg))
        return cls(vlm, name, tmp)

    @property
    def max_length(self) -> int:
        return self.vlm.cfg.max_length

    def encode(self, sample, image, params, param: str) -> dict:
        """Prompt tokens + vision inputs; too long or unusable prompts -> 400 naming ``param``.

        The room kept for the reply is the same as in offline ``VLM.generate`` (so serving drops the same
        history lines as the offline jobs)."""
        from mmrole.models import SampleRejected, SampleTooLong

        reserve = min(params.max_new_tokens, self.max_length // 4)
        try:
            return self.vlm.encode(sample, image, with_target=False, reserve=reserve)
        except SampleTooLong as e:
            raise RequestError(
                400,
                f"'{param}': the prompt is too long for the model even with the whole history "
                f"dropped ({e.length} tokens with the reply budget > {e.max_length})",
                param,
                "context_length_exceeded",
            )
        except SampleRejected as e:
            raise RequestError(400, f"'{param}': {e.reason}", param, "rejected_input")

    def generate(self, encoded: Sequence[dict], params: Sequence[Any]) -> list[str]:
        """Reply texts in input order. Rows whose decoding settings match run as one padded batch; stop strings
        are applied per row afterwards, so rows with different stops still share a batch."""
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(params_key(p), []).append(i)
        out: list[str] = [""] * len(encoded)
        for idx in groups.values():
            p = dataclasses.replace(params[idx[0]], stop=None)
            texts = self.vlm.generate_encoded([encoded[i] for i in idx], p)
            for i, t in zip(idx, texts):
                out[i] = apply_stops(t, params[i].stop)
        return out

    def count_tokens(self, text: str) -> int:
        return len(self.vlm.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def close(self) -> None:
        self.vlm = None
        if self._tmp_dir:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None

    def __del__(self):  # called by Serve's multiplexer on eviction
        self.close()


@dataclass
class Job:
    """One decoding row submitted to the batcher. ``prepare`` (image decoding + encoding) runs on the gen thread
    right before the batch decodes; it may raise :class:`RequestError`, which fails this row only."""

    engine: Engine
    prepare: Callable[[], dict]
    params: Any
    encoded: Optional[dict] = None  # set by prepare (kept for re-asks)


@dataclass
class Row:
    """What the batcher returns for one job."""

    text: str
    batch_size: int
    prompt_tokens: int
    completion_tokens: int
    history_dropped: int


# ------------------------------------------------------------------------------------------------ server


def json_response(body: Any, status: int = 200, headers: Optional[dict] = None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


Handler = Callable[[Any], Awaitable[Any]]


class ServerBase:
    """HTTP shell shared by the agent and judge deployments. Subclasses define ``routes()`` and a
    ``@serve.batch`` method ``_batch`` that awaits :meth:`_run_batch` (each class needs its own decorated method:
    the batch queue belongs to the decorated function)."""

    cfg: AppConfig

    def _setup(self, cfg: AppConfig) -> None:
        from ray import serve

        self.cfg = cfg
        self.limits = cfg.limits
        self.defaults = cfg.default_params()
        self.stats = BatchStats()
        self.created = int(time.time())
        self.pid = os.getpid()
        try:
            ctx = serve.get_replica_context()
            self.replica_id = ctx.replica_id.unique_id
            max_ongoing = ctx._deployment_config.max_ongoing_requests
        except Exception:  # outside a replica (e.g. a unit test of the class)
            self.replica_id, max_ongoing = f"local-{self.pid}", None
        if max_ongoing is not None and max_ongoing < cfg.batching.max_batch_size:
            log.warning(
                "max_ongoing_requests=%s < max_batch_size=%s: batches will never be full",
                max_ongoing,
                cfg.batching.max_batch_size,
            )
        self._token = os.environ.get(cfg.api_token_env) or None
        self._gen = ThreadPoolExecutor(1, thread_name_prefix="mmrole-gen")
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="mmrole-load")  # adapters load beside serving
        self._batch_started: Optional[float] = None
        self._fatal: Optional[str] = None
        self._ongoing = 0  # requests inside a handler right now (stats excluded)
        self.engine = Engine.load(cfg.model, cfg.model_name, cfg.torch_threads)
        # Size the batcher from the config (the decorator's values are only defaults).
        self._batch.set_max_batch_size(cfg.batching.max_batch_size)
        self._batch.set_batch_wait_timeout_s(cfg.batching.batch_wait_timeout_s)
        self._wait_now = cfg.batching.batch_wait_timeout_s
        log.info(
            "replica %s ready: model %s, batch %d/%.3fs, auth %s",
            self.replica_id,
            cfg.model_name,
            cfg.batching.max_batch_size,
            cfg.batching.batch_wait_timeout_s,
            "on" if self._token else "off",
        )

    # -- to override
    def routes(self) -> dict[tuple[str, str], tuple[Handler, bool]]:
        """(method, path) -> (handler, needs auth)."""
        raise NotImplementedError

    async def _batch(self, job: Job) -> Any:  # replaced by a @serve.batch method in subclasses
        raise NotImplementedError

    # -- batching
    async def _run_batch(self, jobs: list[Job]) -> list[Any]:
        """Prepare and decode one batch on the gen thread. Each job gets a :class:`Row`, or the exception its
        preparation raised (a :class:`RequestError` for bad input); the other rows still decode."""
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        self._batch_started = t0

        def work() -> tuple[list[Any], int]:
            out: list[Any] = [None] * len(jobs)
            ready: list[int] = []
            for i, j in enumerate(jobs):
                try:
                    if j.encoded is None:
                        j.encoded = j.prepare()
                    ready.append(i)
                except RequestError as e:
                    out[i] = e
                except Exception as e:  # a bug, not bad input: fail this row (500), not the whole batch
                    log.exception("preparing a row failed")
                    out[i] = e
            by_engine: dict[int, list[int]] = {}
            for i in ready:
                by_engine.setdefault(id(jobs[i].engine), []).append(i)
            for idx in by_engine.values():
                eng = jobs[idx[0]].engine
                texts = eng.generate([jobs[i].encoded for i in idx], [jobs[i].params for i in idx])
                for i, t in zip(idx, texts):
                    enc = jobs[i].encoded
                    out[i] = Row(
                        text=t,
                        batch_size=len(ready),
                        prompt_tokens=int(len(enc["input_ids"])),
                        completion_tokens=min(eng.count_tokens(t), jobs[i].params.max_new_tokens),
                        history_dropped=int(enc.get("history_dropped", 0)),
                    )
            return out, len(ready)

        try:
            out, n = await loop.run_in_executor(self._gen, work)
        except Exception as e:
            if _is_fatal(e):  # a broken device: let Serve replace this replica
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

    async def _load_call(self, fn: Callable, *args) -> Any:
        """Run a model load off the event loop (and off the gen thread, which keeps serving)."""
        return await asyncio.get_running_loop().run_in_executor(self._loader, fn, *args)

    # -- HTTP
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

    async def _dispatch(self, request) -> Any:
        path = request.scope.get("path", "/")
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        path = path.rstrip("/") or "/"
        routes = self.routes()
        route = routes.get((request.method, path))
        try:
            if path in ("/health", "/healthz"):  # no auth: for load balancers and probes
                try:
                    self.check_health()
                except RuntimeError as e:
                    raise RequestError(503, str(e), None, "unhealthy")
                return json_response({"status": "ok", "replica": self.replica_id}, headers=self._headers())
            if route is None:
                if any(p == path for _, p in routes):
                    raise RequestError(
                        405, f"method {request.method} not allowed on {path}", None, "method_not_allowed"
                    )
                raise RequestError(404, f"no route {path}; see GET /v1/models", None, "not_found")
            handler, needs_auth = route
            if needs_auth and not check_bearer(request.headers.get("authorization"), self._token):
                raise RequestError(
                    401,
                    "missing or invalid bearer token (Authorization: Bearer <token>)",
                    None,
                    "unauthorized",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            counted = path != "/v1/stats"
            self._ongoing += counted
            try:
                resp = await handler(request)
            finally:
                self._ongoing -= counted
            self.stats.record_status(200)
            return resp
        except RequestError as e:
            self.stats.record_status(e.status)
            return json_response(e.body(), e.status, self._headers(e.headers))
        except Exception as e:  # a server fault, never the client's: 500 without internals
            self.stats.record_status(500)
            log.exception("request failed")
            status = 503 if self._fatal else 500
            return json_response(
                {
                    "error": {
                        "message": f"internal error ({type(e).__name__})",
                        "type": "server_error",
                        "param": None,
                        "code": "internal_error",
                    }
                },
                status,
                self._headers(),
            )

    async def _stats(self, request) -> Any:
        body = {
            "replica": self.replica_id,
            "pid": self.pid,
            "model": self.cfg.model_name,
            "max_batch_size": self.cfg.batching.max_batch_size,
            "batch_wait_timeout_s": self.cfg.batching.batch_wait_timeout_s,
            "rss_bytes": rss_bytes(),
            "auth": bool(self._token),
            "ongoing": self._ongoing,
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


def rss_bytes() -> int:
    """Resident memory of this process (psutil when installed, else /proc)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # peak, not current


def _is_fatal(e: BaseException) -> bool:
    """Errors after which this process cannot be trusted to decode again (CUDA faults, device OOM)."""
    text = f"{type(e).__name__}: {e}"
    return "CUDA" in text or "OutOfMemoryError" in text or "device-side assert" in text


def common_routes(server: ServerBase) -> dict[tuple[str, str], tuple[Handler, bool]]:
    return {("GET", "/v1/stats"): (server._stats, True)}
