"""
Every refusal the HTTP API makes, in one shape: a status and ``{"error": {"code", "message", "field"?}}``.

Routes and the guard raise or return L{ApiError}; nothing else writes an error body.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from twisted.logger import Logger
from twisted.web.iweb import IRequest

log = Logger()


class ApiError(Exception):
    """A request refused before anything runs: the HTTP status, an error code, a message, maybe the field."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.extra = extra or {}

    def as_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        error.update(self.extra)
        return {"error": error}


def invalid(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid_field", message, field)


def unknown_session(session_id: str, field: str | None = None) -> ApiError:
    return ApiError(404, "session_not_found", f"no session {session_id} on this server", field)


def session_busy() -> ApiError:
    return ApiError(409, "session_busy", "a turn of this session is still running; wait for it or cancel it")


def json_body(request: IRequest, status: int, payload: dict[str, Any]) -> bytes:
    request.setResponseCode(status, HTTPStatus(status).phrase.encode())  # Twisted has no phrase for some (429)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(payload).encode() + b"\n"


OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
                409: "conflict_error", 410: "invalid_request_error", 413: "invalid_request_error",
                415: "invalid_request_error", 429: "rate_limit_error"}
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
                   409: "invalid_request_error", 410: "invalid_request_error", 413: "request_too_large",
                   415: "invalid_request_error", 429: "rate_limit_error", 503: "overloaded_error"}


def shaped(path: bytes, error: ApiError) -> dict[str, Any]:
    """An error in the shape its route's clients read: Anthropic's under /v1/messages, OpenAI's under the other
    /v1/ routes (the SDKs raise from these), ours elsewhere."""
    if path.startswith(b"/v1/messages"):
        return {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(error.status, "api_error"),
                                           "message": error.message}}
    if path.startswith(b"/v1/"):
        return {"error": {"message": error.message, "type": OPENAI_TYPES.get(error.status, "server_error"),
                          "param": error.field, "code": error.code}}
    return error.as_json()


def error_body(request: IRequest, error: ApiError) -> bytes:
    """The JSON answer to a refused request, logged without its body."""
    log.info("{method} {path}: {status} {code}", method=request.method.decode("latin-1"),
             path=request.path.decode("latin-1"), status=error.status, code=error.code)
    return json_body(request, error.status, shaped(request.path, error))
