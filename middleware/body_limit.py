"""Refuse request bodies over MAX_BODY_BYTES (ADMIN_MAX_BODY_BYTES under /admin/) with 413, by Content-Length
or while reading (in OpenAI's error shape under /v1/, see infrastructure/error_format.py)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infrastructure.error_format import TrackedSend, send_error


class BodyTooLargeError(HTTPException):
    """Raised while the app reads a body that passes the limit; rendered as 413 by the error handlers."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"Request body is larger than the {max_bytes}-byte limit")


class BodySizeLimitMiddleware:
    """Pure ASGI middleware, so responses (SSE included) are never buffered."""

    def __init__(self, app: ASGIApp, max_bytes: int, admin_max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.admin_max_bytes = admin_max_bytes or max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.admin_max_bytes if scope["path"].startswith("/admin/") else self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._reject(send, declared.isdigit(), limit, scope["path"])
            return
        received = 0
        tracked = TrackedSend(send)

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
            return message

        try:
            await self.app(scope, limited_receive, tracked)
        except BodyTooLargeError:
            if not tracked.started:
                await self._reject(send, True, limit, scope["path"])

    async def _reject(self, send: Send, too_large: bool, limit: int, path: str) -> None:
        status = 413 if too_large else 400
        detail = (
            f"Request body is larger than the {limit}-byte limit"
            if too_large
            else "Content-Length header is not a number"
        )
        await send_error(send, status, detail, path=path)
