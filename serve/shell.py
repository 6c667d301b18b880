"""HTTP pieces of the Serve apps that need no model: the project's JSON answers and error schema, the static page
folder, the ASGI middleware (replica headers, JSON 500s, per-route stats, access log), the event-stream response
and process memory."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

from starlette.responses import StreamingResponse

from mmrole.serving import header_value
from mmrole.serving.schemas import ErrorResponse

if TYPE_CHECKING:
    from .common import ServerBase

log = logging.getLogger("ray.serve")  # Serve's documented logger: lines land in the replica logs
ERRORS = {
    400: {"model": ErrorResponse, "description": "bad input; error.param names the field"},
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
    413: {"model": ErrorResponse, "description": "body or text too large"},
    503: {"model": ErrorResponse, "description": "overloaded (see Retry-After) or unhealthy"},
}


def json_response(body: Any, status: int = 200, headers: Optional[dict] = None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


def web_dir() -> str:
    """The packaged static page (``mmrole/web``)."""
    import mmrole

    return os.path.join(os.path.dirname(os.path.abspath(mmrole.__file__)), "web")


class ShellMiddleware:
    """Pure ASGI middleware: replica headers on every answer, a 500 in the project's JSON shape for server faults
    (503 after a device fault), per-route status counts and one access-log line per request (the route template,
    not the raw path)."""

    def __init__(self, app, server: ServerBase):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        srv = self.server
        t0 = time.perf_counter()
        state = {"status": None}
        replica = [
            (b"x-mmrole-replica", header_value(srv.replica_id).encode()),
            (b"x-mmrole-pid", str(srv.pid).encode()),
        ]

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [h for h in replica if h[0] not in names]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapped)
        except Exception as e:
            log.exception("request failed")
            if state["status"] is None:
                status = 503 if srv._fatal else 500
                body = {
                    "error": {
                        "message": f"internal error ({type(e).__name__})",
                        "type": "server_error",
                        "param": None,
                        "code": "internal_error",
                    }
                }
                await json_response(body, status, srv._headers())(scope, receive, send_wrapped)
        finally:
            status = state["status"] or 499  # no answer started: the client went away
            route = getattr(scope.get("route"), "path", None)
            if route is None:  # mounts and built-in routes carry no template; unknown paths are not listed
                route = "<unmatched>" if status == 404 else scope.get("path", "")[len(scope.get("root_path", "")) :]
            if route not in ("/v1/stats", "/health", "/healthz") and not route.startswith("/static"):
                srv.stats.record_status(status, route)
            log.info("route %s %s %s %.1fms", scope.get("method"), route, status, (time.perf_counter() - t0) * 1e3)


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response that runs its ``on_close`` callbacks however it ends: completed, failed,
    or cancelled because the client went away (even before the body started, when the body generator's own
    ``finally`` would never run)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_close: list[Callable[[], None]] = []

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for fn in self.on_close:
                fn()


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
