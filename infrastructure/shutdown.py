"""The process's graceful shutdown, as the application sees it.

uvicorn's own WebSocket protocol closes every open socket with 1012 the moment SIGTERM arrives, cutting an
answer mid-stream. `infrastructure.http_server.LimitedWebSocketProtocol` calls `begin_drain()` instead, and
each chat connection (api/routes/websocket.py) finishes the answer it is streaming, then closes with 1012
("service restart") so the client reconnects elsewhere. HTTP requests and SSE streams in progress are
finished by uvicorn itself; both are bounded by `GRACEFUL_SHUTDOWN_SECONDS`.
"""

from __future__ import annotations

import asyncio

SERVICE_RESTART = 1012  # WebSocket close code: the server is restarting, reconnect shortly
_draining: asyncio.Event | None = None


def drain_event() -> asyncio.Event:
    """The event set once the server has begun draining (created on first use, in the serving loop)."""
    global _draining
    if _draining is None:
        _draining = asyncio.Event()
    return _draining


def begin_drain() -> None:
    """Tell every open connection that the server is shutting down."""
    drain_event().set()
