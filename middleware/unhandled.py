"""Turn an unexpected exception into the project's 500 inside the middleware stack, so it keeps every header.

Starlette sends its `Exception` handler's answer from `ServerErrorMiddleware`, the outermost layer: outside
`CorrelationIdMiddleware` and `SecurityHeadersMiddleware`, so such a 500 had no `X-Request-ID` and no
security headers. This middleware sits inside them and answers first.
"""

from __future__ import annotations

import structlog
from asgi_correlation_id import correlation_id
from starlette.types import ASGIApp, Receive, Scope, Send

from infrastructure.error_format import TrackedSend, send_error

logger = structlog.get_logger(__name__)


class UnhandledErrorMiddleware:
    """Pure ASGI: an exception before the response started becomes a logged 500 JSON; after, it propagates.

    Once a response has started (a stream, for instance) its status is on the wire: nothing can be sent in its
    place, so the exception goes on to the outer layers (which tell a client hang-up from a failure).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if tracked.started:
                raise
            logger.exception("unhandled_error", path=scope["path"], request_id=correlation_id.get())
            await send_error(send, 500, "Internal server error")  # the body of middleware.errors.internal_error_body
