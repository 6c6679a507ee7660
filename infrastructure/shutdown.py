"""The process's graceful shutdown, as the application sees it.

uvicorn's own WebSocket protocol closes every open socket with 1012 the moment SIGTERM arrives, cutting an
answer mid-stream. `infrastructure.http_server.LimitedWebSocketProtocol` calls `begin_drain()` instead, and
each chat connection (api/routes/websocket.py), told through the listener it registered with `on_drain`,
finishes the answer it is streaming, then closes with 1012 ("service restart") so the client reconnects
elsewhere. HTTP requests and SSE streams in progress are finished by uvicorn itself; both are bounded by
`GRACEFUL_SHUTDOWN_SECONDS`.

Listeners rather than one waiting task per connection: an idle socket then costs no task for this.
"""

from __future__ import annotations

from collections.abc import Callable

SERVICE_RESTART = 1012  # WebSocket close code: the server is restarting, reconnect shortly
DrainListener = Callable[[], None]

_draining = False
_listeners: set[DrainListener] = set()


def on_drain(listener: DrainListener) -> Callable[[], None]:
    """Call `listener` (in the event loop, once) when the server begins draining; at once if it has begun.

    Returns the function that unregisters it, for a connection that ends first.
    """
    if _draining:
        listener()
        return lambda: None
    _listeners.add(listener)
    return lambda: _listeners.discard(listener)


def begin_drain() -> None:
    """Tell every open connection that the server is shutting down (the first call does; later ones nothing)."""
    global _draining
    if _draining:
        return
    _draining = True
    listeners = list(_listeners)
    _listeners.clear()
    for listener in listeners:
        listener()
