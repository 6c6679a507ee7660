"""Per-request context: request id bound into logs, access log line, HTTP metrics by route template.

Each finished request also goes into the sliding `RequestWindow` behind `/performance-stats`.
"""

from __future__ import annotations

import time

import anyio
import structlog
from asgi_correlation_id import correlation_id
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infrastructure.logging import session_tag
from infrastructure.metrics import HTTP_REQUEST_DURATION, HTTP_REQUESTS, SSE_STREAMS_ACTIVE, STREAMS_CANCELLED
from infrastructure.windows import RequestWindow

logger = structlog.get_logger("access")


def route_template(scope: Scope) -> str:
    """The matched route's path template ("/v2/sessions/{session_id}"), never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def _is_disconnect(error: BaseException) -> bool:
    if isinstance(error, BaseExceptionGroup):
        return all(_is_disconnect(inner) for inner in error.exceptions)
    return isinstance(error, anyio.BrokenResourceError | anyio.ClosedResourceError)


RATE_LIMIT_HEADERS_KEY = "rate_limit_headers"
"""Where a charged request keeps its X-RateLimit-* headers (in the ASGI scope's state), as raw header pairs."""


class RequestContextMiddleware:
    """Pure ASGI (no response buffering): works for JSON, SSE and WebSocket alike."""

    def __init__(self, app: ASGIApp, window: RequestWindow | None = None) -> None:
        self.app = app
        self.window = window

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            request_id=correlation_id.get(), method=scope.get("method", "WS"), path=scope["path"]
        )
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        session_id: str | None = None

        event_stream = False
        body_finished = False

        async def capture(message: Message) -> None:
            nonlocal status, session_id, event_stream, body_finished
            if message["type"] == "http.response.start":
                status = message["status"]
                budget = scope.get("state", {}).get(RATE_LIMIT_HEADERS_KEY)
                if budget and not any(name.lower() == b"x-ratelimit-limit" for name, _ in message["headers"]):
                    # The question was charged: every answer says so, errors (422, 409, 503) included.
                    message["headers"] = [*message["headers"], *budget]
                for name, value in message.get("headers", []):
                    if name.lower() == b"x-session-id":
                        session_id = value.decode("latin-1")
                    elif name.lower() == b"content-type" and value.startswith(b"text/event-stream"):
                        event_stream = True
                        SSE_STREAMS_ACTIVE.inc()
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                body_finished = True
            await send(message)

        try:
            await self.app(scope, receive, capture)
        except Exception as error:
            # A client that hangs up mid-stream surfaces as anyio's Broken/ClosedResourceError (inside an
            # exception group from the SSE task group): the response already started, nothing is wrong.
            if status == 500 or not _is_disconnect(error):
                raise
            logger.info("client_disconnected", reason=type(error).__name__)
        finally:
            if event_stream:
                # Counted here, from the response's own life, not from generator finalisation.
                SSE_STREAMS_ACTIVE.dec()
                if not body_finished:
                    STREAMS_CANCELLED.labels(transport="sse").inc()
                    logger.info("stream_cancelled", transport="sse", reason="client_disconnected")
            duration = time.perf_counter() - started
            route = route_template(scope)
            method = scope["method"]
            HTTP_REQUESTS.labels(method=method, route=route, status=str(status)).inc()
            HTTP_REQUEST_DURATION.labels(method=method, route=route).observe(duration)
            if self.window is not None:
                self.window.record(method, route, status, duration)
            logger.info(
                "request_finished",
                route=route,
                status=status,
                duration_ms=round(duration * 1000, 2),
                session=session_tag(session_id),
            )
