"""The one refusal type of the serving layer: an HTTP status and an OpenAI-style JSON error naming the field."""

from __future__ import annotations

from typing import Optional


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, a message and the offending field (``param``)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: str = "invalid_request",
        headers: Optional[dict] = None,
    ):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad_request(param: Optional[str], message: str, code: str = "invalid_request", status: int = 400) -> RequestError:
    return RequestError(status, message, param, code)
