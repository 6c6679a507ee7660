"""The project's error format, built in one place for every layer that answers an error.

`{"detail": <human text>, "type": <class of error>, "code": <HTTP status, an integer>, "reason": <stable
machine-readable reason>}`: `code` is the status, as the original API documents it, and `reason` is what a
client can branch on (`question_empty`, `session_busy`, ...).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Send

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


def error_bytes(status: int, detail: str, reason: str | None = None) -> bytes:
    """`error_body` as the UTF-8 JSON bytes of a response body."""
    return json.dumps(error_body(status, detail, reason)).encode()


async def send_error(send: Send, status: int, detail: str, reason: str | None = None) -> None:
    """Answer an ASGI request with the error body (for middleware that answers before any route)."""
    body = error_bytes(status, detail, reason)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
