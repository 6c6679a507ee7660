"""The project's error format, built in one place for every layer that answers an error.

`{"detail": <human text>, "type": <class of error>, "code": <HTTP status, an integer>, "reason": <stable
machine-readable reason>}`: `code` is the status, as the original API documents it, and `reason` is what a
client can branch on (`question_empty`, `session_busy`, ...).

Under `/v1/` (the OpenAI-compatible API) errors take OpenAI's shape instead, `{"error": {"message", "type",
"param", "code"}}`, so that OpenAI's SDKs raise their usual exceptions: `error_for_path` picks the shape by path,
for the exception handlers and the ASGI middlewares alike.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Message, Send

_STATUS_TYPES: dict[int, tuple[str, str]] = {
    400: ("bad_request", "bad_request"),
    401: ("authentication_error", "unauthorized"),
    403: ("permission_error", "forbidden"),
    404: ("not_found", "not_found"),
    405: ("method_not_allowed", "method_not_allowed"),
    408: ("timeout", "request_timeout"),
    409: ("conflict", "conflict"),
    413: ("payload_too_large", "payload_too_large"),
    415: ("unsupported_media_type", "unsupported_media_type"),
    422: ("validation_error", "invalid_request"),
    429: ("rate_limit_exceeded", "rate_limited"),
    431: ("request_header_fields_too_large", "request_headers_too_large"),
    500: ("internal_error", "internal_error"),
    503: ("service_unavailable", "service_unavailable"),
}


def error_body(status: int, detail: str, reason: str | None = None) -> dict[str, Any]:
    """The error body for `status`; `reason` defaults to the status's generic one."""
    error_type, default_reason = _STATUS_TYPES.get(status, ("internal_error", "internal_error"))
    return {"detail": detail, "type": error_type, "code": status, "reason": reason or default_reason}


# OpenAI's error `type` by status; invalid input is a 400 there (never our 422).
_OPENAI_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}
# Our reasons that have an established OpenAI code; every other reason is the code itself.
_OPENAI_CODES: dict[str, str] = {"unauthorized": "invalid_api_key", "rate_limited": "rate_limit_exceeded"}


def openai_path(path: str) -> bool:
    """Whether `path` belongs to the OpenAI-compatible API (`/v1/...`), whose errors take OpenAI's shape."""
    return path == "/v1" or path.startswith("/v1/")


def openai_error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error body: `type` from the status (`server_error` for 5xx), `code` the stable reason."""
    error_type = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_for_path(
    path: str, status: int, detail: str, reason: str | None = None, param: str | None = None
) -> tuple[int, dict[str, Any]]:
    """The status and body of an error on `path`: the project's format, or OpenAI's under `/v1/`.

    On `/v1/` a 422 (invalid input) becomes OpenAI's 400, and `param` names the offending field.
    """
    if not openai_path(path):
        return status, error_body(status, detail, reason)
    status = 400 if status == 422 else status
    code = reason or _STATUS_TYPES.get(status, ("", "internal_error"))[1]
    return status, openai_error_body(status, detail, _OPENAI_CODES.get(code, code), param)


def error_bytes(status: int, detail: str, reason: str | None = None) -> bytes:
    """`error_body` as the UTF-8 JSON bytes of a response body."""
    return json.dumps(error_body(status, detail, reason)).encode()


async def send_error(send: Send, status: int, detail: str, reason: str | None = None, path: str = "") -> None:
    """Answer an ASGI request with the error body (for middleware that answers before any route); given the
    request's `path`, in the shape that path's API uses (`error_for_path`)."""
    status, payload = error_for_path(path, status, detail, reason)
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class TrackedSend:
    """An ASGI `send` that remembers whether the response has started: until it has, an error can still be sent
    in its place (`send_error`); after, the status is on the wire."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)
