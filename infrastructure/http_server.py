"""uvicorn's HTTP/1.1 protocol (httptools) with connection and request-header limits for hostile clients.

On its own, uvicorn reads request headers with no size or time limit, keeps a connection that sends nothing
open for ever, and past `limit_concurrency` answers every request, `/health` included, with 503. The two
protocol classes here, which `main.run` passes to `uvicorn.run(http=..., ws=...)`, add these limits to each
worker process (docs/deployment.md, "Connection and header limits"):

* Per client: at most MAX_CONNECTIONS_PER_CLIENT open connections from one address (an IPv6 client by its
  /64). One more gets `429` and is closed at once, before anything is read from it. A WebSocket keeps the
  slot of the HTTP connection it was upgraded from until it closes. Peers inside TRUSTED_PROXIES and Unix
  sockets are not capped: a proxy carries many clients and must cap them itself.
* Header size: the request line and headers of one request may take MAX_REQUEST_HEADER_BYTES; beyond that
  the answer is `431` and the connection is closed. At most one socket read (256 KiB) beyond the limit is
  buffered before that happens.
* Header time: the complete headers must arrive within REQUEST_HEADER_TIMEOUT_SECONDS of the connection
  opening, or of the first byte of a later request on a kept-alive connection. Bytes trickling in do not
  move that deadline. When it passes, the answer is `408` (a plain close if no byte of a request came).
* Idle keep-alive: uvicorn's own `timeout_keep_alive` (KEEP_ALIVE_TIMEOUT_SECONDS).
* In total: when MAX_CONNECTIONS are open, a new connection first closes the connection that has been idle
  the longest (waiting for a request or for the rest of its headers), so idle and slow sockets never crowd
  out anyone. Only when every connection is busy (a request in progress, or a WebSocket) do connections
  exceed MAX_CONNECTIONS. Then requests get 503 and close, and so do WebSocket upgrades, except requests
  for the operator endpoints in `OPERATOR_PATHS`. Past MAX_CONNECTIONS + CONNECTION_RESERVE, a new
  connection gets 503 and is closed at once.

After a 408 or 431 the server writes its answer, stops writing (half-close), then reads and discards for up
to `LINGER_SECONDS` / `LINGER_MAX_BYTES` before it closes. A client that is still sending therefore reads
the answer instead of a connection reset. Refusals are logged as `connection_limited` warnings, at most one
per reason every `LOG_INTERVAL_SECONDS`, with the count since the last one.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import ipaddress
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol, cast

import httptools
import structlog
from uvicorn._types import (
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Scope,
)
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from config import Settings, get_settings
from infrastructure.error_format import error_bytes
from infrastructure.shutdown import begin_drain

logger = structlog.get_logger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Served even when every connection is busy: probes and monitoring must see a full server as alive.
OPERATOR_PATHS = frozenset({b"/health", b"/health-status", b"/metrics"})
LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 256 * 1024
RETRY_AFTER_SECONDS = 5
LOG_INTERVAL_SECONDS = 10.0
INVALID_FRAME_PAYLOAD_DATA = 1007  # WebSocket close code: a text message that is not UTF-8
DEFAULT_DRAIN_SECONDS = 10.0  # WebSockets left to the app when uvicorn has no graceful timeout


@dataclass(frozen=True)
class ConnectionLimits:
    """The limits one worker process enforces (see the module docstring)."""

    max_connections: int = 4000
    reserve: int = 100
    per_client: int = 100
    header_bytes: int = 32_768
    header_timeout_seconds: float = 10.0
    uncapped_networks: tuple[Network, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        """The limits from the `# Connection limits` settings; TRUSTED_PROXIES are not capped per client."""
        return cls(
            max_connections=settings.max_connections,
            reserve=settings.connection_reserve,
            per_client=settings.max_connections_per_client,
            header_bytes=settings.max_request_header_bytes,
            header_timeout_seconds=settings.request_header_timeout_seconds,
            uncapped_networks=tuple(ipaddress.ip_network(item, strict=False) for item in settings.trusted_proxies),
        )


def client_key(host: str) -> str:
    """The key a client's connections are counted under: its IPv4 address, or the /64 of its IPv6 address.

    One host or site usually owns a whole IPv6 /64, so counting single IPv6 addresses would let one client
    open MAX_CONNECTIONS_PER_CLIENT connections from each of 2**64 addresses.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


class Admission(enum.Enum):
    """What `ConnectionGuard.admit` decided for a new connection."""

    ADMITTED = "admitted"
    CLIENT_FULL = "too_many_connections_from_client"
    SERVER_FULL = "server_connection_limit"


class Evictable(Protocol):
    """A connection the guard may close to make room: it must give its slot back."""

    def evict(self) -> None:
        """Release the slot and close the connection."""


class ConnectionGuard:
    """The open connections of one process: per client, in total, and which are idle (oldest first).

    Used only from the event loop, so it needs no lock. A connection is identified by its transport, which
    stays the same when uvicorn hands an upgraded connection to the WebSocket protocol.
    """

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._owners: dict[object, str | None] = {}  # transport -> client key (None: not capped)
        self._per_client: dict[str, int] = {}
        self._idle: OrderedDict[Evictable, None] = OrderedDict()
        self._refused: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    @property
    def open_connections(self) -> int:
        """Connections holding a slot (HTTP and WebSocket)."""
        return len(self._owners)

    @property
    def over_capacity(self) -> bool:
        """More than MAX_CONNECTIONS are open: the extra ones are the reserve, for operator requests only."""
        return len(self._owners) > self.limits.max_connections

    def connections_from(self, host: str) -> int:
        """Open connections counted against the client at `host`."""
        return self._per_client.get(client_key(host), 0)

    def admit(self, transport: object, host: str | None) -> Admission:
        """Take a slot for a new connection from `host`, closing the longest-idle connection at the cap."""
        key = self._capped_key(host)
        if key is not None and self._per_client.get(key, 0) >= self.limits.per_client:
            return Admission.CLIENT_FULL
        if len(self._owners) >= self.limits.max_connections and self._idle:
            victim, _ = self._idle.popitem(last=False)
            victim.evict()
            self.note("idle_connection_closed_at_capacity", None)
        if len(self._owners) >= self.limits.max_connections + self.limits.reserve:
            return Admission.SERVER_FULL
        self._owners[transport] = key
        if key is not None:
            self._per_client[key] = self._per_client.get(key, 0) + 1
        return Admission.ADMITTED

    def release(self, transport: object) -> None:
        """Give the connection's slot back (once; later calls do nothing)."""
        if transport not in self._owners:
            return
        key = self._owners.pop(transport)
        if key is not None:
            left = self._per_client[key] - 1
            if left:
                self._per_client[key] = left
            else:
                del self._per_client[key]

    def mark_idle(self, connection: Evictable) -> None:
        """The connection waits for a request: it may be closed to make room (it keeps its place if idle)."""
        self._idle[connection] = None

    def mark_busy(self, connection: Evictable) -> None:
        """The connection has a request in progress, is a WebSocket, or is closing: never closed for room."""
        self._idle.pop(connection, None)

    def note(self, reason: str, host: str | None) -> None:
        """Count a refusal; log one warning per reason per LOG_INTERVAL_SECONDS with the count since the last."""
        count = self._refused.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._logged_at.get(reason, -math.inf) >= LOG_INTERVAL_SECONDS:
            logger.warning(
                "connection_limited", reason=reason, client=host, count=count, open_connections=len(self._owners)
            )
            self._logged_at[reason] = now
            count = 0
        self._refused[reason] = count

    def _capped_key(self, host: str | None) -> str | None:
        if host is None:
            return None
        if self.limits.uncapped_networks:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                return client_key(host)
            if any(address in network for network in self.limits.uncapped_networks):
                return None
        return client_key(host)


@functools.cache
def connection_guard() -> ConnectionGuard:
    """This process's guard, built from the settings on first use: each uvicorn worker builds its own."""
    return ConnectionGuard(ConnectionLimits.from_settings(get_settings()))


class _RefusedError(Exception):
    """Raised from a parser callback to stop parsing once the request has been answered with an error."""


AT_CAPACITY = error_bytes(503, "The server is at its connection limit; retry shortly", "connection_limit")


async def _service_unavailable(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """The answer to a non-operator request while the server is over MAX_CONNECTIONS."""
    body = AT_CAPACITY
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": 503,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
            (b"connection", b"close"),
        ],
    }
    await send(start)
    done: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
    await send(done)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the connection, header-size and header-time limits of this module."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = connection_guard()
        self._app = self.app
        # The header deadline is a loop time, checked by a timer that is re-armed only when it fires early,
        # so back-to-back requests on a kept-alive connection do not each create and cancel a timer.
        self._headers_due: float | None = None  # set while a request's headers are awaited
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._awaiting_request = True  # no request in progress: the next one's headers are timed
        self._in_message = False  # between the first byte of a request and the end of its body
        self._in_headers = False  # between the first byte of a request and the end of its headers
        self._header_bytes = 0  # bytes of the current request's headers in earlier reads
        self._undercounted = False  # the current request began after another one's end in the same read
        self._read_fresh = True  # the current read began between requests
        self._read_size = 0
        self._messages_begun = 0  # in the current read
        self._refused = False  # answered with an error: reads are discarded until the connection closes
        self._discarded = 0

    # --- connection -----------------------------------------------------------------------------------------

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        """Count the connection against its client and the process, or refuse it at once."""
        super().connection_made(transport)
        admission = self.guard.admit(transport, self._host)
        if admission is Admission.ADMITTED:
            self.guard.mark_idle(self)
            self._start_header_clock()
            return
        self.guard.note(admission.value, self._host)
        if admission is Admission.CLIENT_FULL:
            self._refuse(
                429, error_bytes(429, "Too many connections from this client", "too_many_connections"), linger=False
            )
        else:
            self._refuse(
                503,
                error_bytes(503, "The server is at its connection limit; retry shortly", "connection_limit"),
                linger=False,
            )

    def connection_lost(self, exc: Exception | None) -> None:
        """Give the slot back and stop the timers."""
        self._cancel_timers()
        self.guard.mark_busy(self)
        self.guard.release(self.transport)
        super().connection_lost(exc)

    def evict(self) -> None:
        """Closed by the guard to make room for a new connection (this one was idle the longest)."""
        self._cancel_timers()
        self.guard.release(self.transport)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        """uvicorn's `data_received`, plus the header deadline and the count of header bytes."""
        if self._refused:
            self._discarded += len(data)
            if self._discarded > LINGER_MAX_BYTES:
                self.transport.close()
            return
        self._unset_keepalive_if_required()
        if self._awaiting_request and self._headers_due is None:
            self._start_header_clock()
        self._read_fresh = not self._in_message
        self._read_size = len(data)
        self._messages_begun = 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if not self._refused:  # not our own _RefusedError, raised from a callback after answering
                message = "Invalid HTTP request received."
                self.logger.warning(message)
                self.send_400_response(message)
            return
        if not self._in_headers or self.transport.is_closing():
            return
        # The whole read belongs to the headers being received, unless the read also held the end of an earlier
        # (pipelined) request: then its share is unknown and not counted, and on_headers_complete measures the
        # finished headers exactly.
        if self._messages_begun == 0 or not self._undercounted:
            self._header_bytes += len(data)
        if self._header_bytes > self.guard.limits.header_bytes:
            self._refuse_headers()

    def handle_websocket_upgrade(self) -> None:
        """Upgrade, unless every connection is busy (then 503): the WebSocket keeps this connection's slot."""
        if self.guard.over_capacity:
            self.guard.note("websocket_refused_at_capacity", self._host)
            self._refuse(
                503,
                error_bytes(503, "The server is at its connection limit; retry shortly", "connection_limit"),
                linger=False,
            )
            return
        super().handle_websocket_upgrade()
        self._cancel_timers()  # the socket is the WebSocket protocol's now: nothing keeps this object alive

    # --- parser callbacks -----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        """The first byte of a request: its header bytes are counted from here."""
        super().on_message_begin()
        self._messages_begun += 1
        self._in_message = True
        self._in_headers = True
        self._header_bytes = 0
        self._undercounted = self._messages_begun > 1 or not self._read_fresh

    def on_headers_complete(self) -> None:
        """Check the size of the finished headers, then run the app (or the 503 app when over capacity)."""
        self._in_headers = False
        self._awaiting_request = False
        self._headers_due = None
        limit = self.guard.limits.header_bytes
        # Bytes read since the request began bound its headers, except after an undercount: measure them then.
        if (self._undercounted or self._header_bytes + self._read_size > limit) and (
            len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) > limit
        ):
            self._refuse_headers()
            raise _RefusedError
        self.guard.mark_busy(self)
        self.app = _service_unavailable if self.guard.over_capacity and not self._for_operators() else self._app
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """The end of a request's body; after an early response, the next request's clock starts at its first byte."""
        self._in_message = False
        if self._awaiting_request:
            self._headers_due = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        """Back to waiting for a request: idle (may be closed for room), and the next headers are timed."""
        super().on_response_complete()
        if self.transport.is_closing() or not self.cycle.response_complete:
            return  # closing, or a pipelined request has started
        self._awaiting_request = True
        self.guard.mark_idle(self)
        if self._in_message:  # part of the next request is already here
            self._start_header_clock()

    # --- helpers --------------------------------------------------------------------------------------------

    @property
    def _host(self) -> str | None:
        return self.client[0] if self.client else None

    def _for_operators(self) -> bool:
        try:
            path = httptools.parse_url(self.url).path
        except httptools.HttpParserError:
            return False
        return path in OPERATOR_PATHS

    def _start_header_clock(self) -> None:
        self._headers_due = self.loop.time() + self.guard.limits.header_timeout_seconds
        if self._deadline_timer is None:
            self._deadline_timer = self.loop.call_at(self._headers_due, self._check_header_deadline)

    def _check_header_deadline(self) -> None:
        self._deadline_timer = None
        if self._headers_due is None or self._refused or self.transport.is_closing():
            return  # no headers awaited now: the next request starts the clock again
        if self.loop.time() < self._headers_due:  # the clock was restarted for a later request
            self._deadline_timer = self.loop.call_at(self._headers_due, self._check_header_deadline)
            return
        if self._in_message:
            self.guard.note("request_header_timeout", self._host)
            self._refuse(
                408, error_bytes(408, "Request headers not received in time", "request_header_timeout"), linger=True
            )
        else:  # nothing of a request arrived: close quietly, like an idle keep-alive connection
            self.guard.mark_busy(self)
            self.transport.close()

    def _cancel_timers(self) -> None:
        self._headers_due = None
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._unset_keepalive_if_required()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None

    def _refuse_headers(self) -> None:
        self.guard.note("request_headers_too_large", self._host)
        self._refuse(431, error_bytes(431, "Request header fields too large", "request_headers_too_large"), linger=True)

    def send_400_response(self, msg: str) -> None:
        """A request the HTTP parser rejects (e.g. a Content-Length that is not a number): 400 in our format."""
        self._refuse(400, error_bytes(400, f"Malformed HTTP request: {msg}", "bad_request"), linger=False)

    def _refuse(self, status: int, body: bytes, *, linger: bool) -> None:
        """Answer `status` and close; with `linger`, half-close and discard what the client still sends first."""
        self._refused = True
        self._cancel_timers()
        self.guard.mark_busy(self)
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n",
                b"connection: close\r\n",
            ]
        )
        if status in (429, 503):
            content.append(b"retry-after: " + str(RETRY_AFTER_SECONDS).encode() + b"\r\n")
        content.extend([b"\r\n", body])
        self.transport.write(b"".join(content))
        if linger and self.transport.can_write_eof():
            self.transport.write_eof()
            self._linger_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()


class CoalescingTransport:
    """A transport whose writes within one turn of the event loop reach the socket as one write.

    A streamed answer sends its words as separate WebSocket messages, often all in one turn (an extractive
    answer has them all at once): their frames, unchanged and in order, then cost one system call instead
    of one each. Everything else is the wrapped transport's; closing sends what is pending first.
    """

    __slots__ = ("_loop", "_pending", "wrapped")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.wrapped = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        """Queue `data`; the first write of a turn schedules the flush at the end of the turn."""
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(data)

    def flush(self) -> None:
        """Hand what is queued to the socket in one write (nothing once the socket is closing)."""
        pending, self._pending = self._pending, None
        if pending and not self.wrapped.is_closing():
            self.wrapped.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        """Send what is queued, then close."""
        self.flush()
        self.wrapped.close()

    def abort(self) -> None:
        """Drop what is queued and close at once."""
        self._pending = None
        self.wrapped.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


class LimitedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O `websockets` protocol that gives back, when the socket closes, the slot its HTTP
    connection took, drains at shutdown, and joins the frames sent in one turn of the loop into one write.

    The sans-I/O protocol keeps a socket with one task (the application's) and timers for its pings, where
    the older `websockets` protocol runs three more tasks per socket: about 20 KB less per idle connection.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Take the upgraded connection's transport, wrapped so that the writes of one turn go out together."""
        super().connection_made(
            cast(asyncio.Transport, CoalescingTransport(cast(asyncio.Transport, transport), self.loop))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        """Release the per-client and process slot, then close as uvicorn does."""
        connection_guard().release(cast(CoalescingTransport, self.transport).wrapped)
        super().connection_lost(exc)

    def send_receive_event_to_app(self) -> None:
        """Hand a message to the app; a text message that is not UTF-8 closes the socket with 1007, quietly.

        uvicorn's code closes with 1007 too but logs the client's bad bytes as a server error with a traceback.
        """
        if self.curr_msg_data_type == "text" and not self.close_sent:
            try:
                b"".join(self.frames).decode()
            except UnicodeDecodeError:
                self.frames = []
                logger.info("websocket_invalid_utf8", client=self.client[0] if self.client else None)
                self.conn.send_close(INVALID_FRAME_PAYLOAD_DATA, "invalid UTF-8")
                self.handle_parser_exception()
                return
        super().send_receive_event_to_app()

    def shutdown(self) -> None:
        """Drain instead of cutting: the app finishes the answer in progress, then closes with 1012.

        uvicorn's own shutdown closes an open socket at once. Here an open socket is told through
        `infrastructure.shutdown` and closed by the application; one that is still open a second before
        the graceful period ends is closed by uvicorn's code after all.
        """
        if not self.handshake_complete or self.close_sent or self.transport.is_closing():
            super().shutdown()
            return
        begin_drain()
        grace = self.config.timeout_graceful_shutdown
        deadline = max(grace - 1.0, 0.0) if grace is not None else DEFAULT_DRAIN_SECONDS
        self.loop.call_later(deadline, self._close_if_still_open)

    def _close_if_still_open(self) -> None:
        if not self.transport.is_closing():
            super().shutdown()
