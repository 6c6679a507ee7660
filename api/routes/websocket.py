"""`/ws/ask`: the chat protocol of the original React frontend, one session per connection.

Receiving runs concurrently with answering, so `cancel` and `ping` are honoured mid-stream; questions
sent while an answer streams wait in a bounded queue and are answered in order.

An idle connection holds one task (the route's, receiving) and one timer (the heartbeat): the answering
task exists only while questions are answered, and shutdown reaches a connection through a listener
(infrastructure/shutdown.py). Ten thousand idle sockets are the norm for a chat service (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import json
import time
from collections.abc import Coroutine
from contextlib import aclosing, suppress
from typing import Any
from urllib.parse import urlsplit

import structlog
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from prometheus_client import Counter
from pydantic import ValidationError
from starlette.websockets import WebSocketState

from agents.agent import DeFiAgent, Question
from agents.events import CompleteEvent, ErrorEvent, MetadataEvent, WordEvent
from agents.validation import InvalidQuestionError
from api.deps import AgentDep, FeedbackDep, SessionsDep, SettingsDep, api_key_required, client_key, spend_budget
from api.routes.feedback import FeedbackRefusedError, submit_feedback
from api.schemas import FeedbackRequest
from config import Settings
from infrastructure.logging import session_tag
from infrastructure.metrics import STREAMS_CANCELLED, WEBSOCKET_CONNECTIONS, WEBSOCKET_MESSAGES
from infrastructure.rate_limit import RateLimitExceededError, from_trusted_proxy
from infrastructure.shutdown import SERVICE_RESTART, on_drain
from middleware.errors import describe_validation
from services.feedback import FeedbackStore
from services.sessions import Session, SessionStore, SessionStoreUnavailableError, new_session_id
from services.sources import Source

logger = structlog.get_logger(__name__)
router = APIRouter()

PROTOCOL_VERSION = "1.0"
REFERENCE_PREFIX = "\n\n📚 **Reference**: "
POLICY_VIOLATION = 1008
_CLIENT_TYPES = frozenset({"question", "cancel", "ping", "heartbeat_response", "feedback"})
_background: set[asyncio.Task[None]] = set()  # short tasks started from callbacks (heartbeats, drains)


@functools.cache
def _sent_counter(kind: str) -> Counter:
    """The sent-messages counter of one message type, looked up once (a type is one of the protocol's few)."""
    return WEBSOCKET_MESSAGES.labels(direction="out", type=kind)


def _in_background(coroutine: Coroutine[Any, Any, None], name: str) -> None:
    """Run `coroutine` as a task kept referenced until it ends."""
    task = asyncio.create_task(coroutine, name=name)
    _background.add(task)
    task.add_done_callback(_background.discard)


class _PolicyViolationError(Exception):
    """The client broke a connection limit; close with 1008."""


class ChatConnection:
    """One client connection: its session, its question queue and its tasks.

    The session id is announced at connect, but the session is created only with the first question
    (counted against the client's budget and its session cap). If it is deleted meanwhile, it stays
    deleted: the next question starts a new session, whose id its `metadata` carries.
    """

    def __init__(
        self,
        websocket: WebSocket,
        agent: DeFiAgent,
        sessions: SessionStore,
        settings: Settings,
        feedback: FeedbackStore | None = None,
    ) -> None:
        self.websocket = websocket
        self.agent = agent
        self.sessions = sessions
        self.settings = settings
        self.feedback = feedback
        self.client = client_key(websocket)
        self.session_id = new_session_id()
        self.session: Session | None = None
        # (question, whether to append reference lines: only for the original frontend's `data` form)
        self.questions: list[tuple[str, bool]] = []  # a few at most (WS_MAX_QUEUED_QUESTIONS): a list is smallest
        self.current_answer: asyncio.Task[None] | None = None
        self.last_heard = time.monotonic()
        self._recent_messages: list[float] = []  # arrival times within the last minute, oldest first
        self._send_lock = asyncio.Lock()
        self._answering: asyncio.Task[None] | None = None  # answers the queued questions, while there are any
        self._heartbeat: asyncio.TimerHandle | None = None
        self._failure: BaseException | None = None  # an unexpected error of the answering task

    async def send(self, message: dict[str, Any]) -> None:
        """Send one JSON message, stamped with the server time."""
        message = {**message, "timestamp": time.time()}
        async with self._send_lock:
            await self.websocket.send_text(json.dumps(message))
        _sent_counter(str(message.get("type"))).inc()

    async def send_error(self, detail: str, reason: str, status: int) -> None:
        """An `error` message (agents.events.ErrorEvent): `code` the status REST would answer, `reason` why."""
        await self.send(ErrorEvent(detail, reason, status).to_wire())

    async def run(self) -> None:
        """Serve the connection until the client leaves or breaks a limit."""
        await self.send(
            {
                "type": "status",
                "status": "connected",
                "details": {
                    "session_id": self.session_id,
                    "capabilities": ["streaming", "cancellation"],
                    "protocol_version": PROTOCOL_VERSION,
                },
            }
        )
        self._schedule_heartbeat()
        stop_listening = on_drain(self._begin_drain)
        try:
            await self._receive_loop()
        except _PolicyViolationError as error:
            await self._close(POLICY_VIOLATION, str(error))
        except WebSocketDisconnect:
            pass
        finally:
            stop_listening()
            if self._heartbeat is not None:
                self._heartbeat.cancel()
            answering = self._answering
            if answering is not None and not answering.done():
                answering.cancel()
                with suppress(asyncio.CancelledError, Exception):
                    await answering
        if self._failure is not None:
            raise self._failure

    async def _close(self, code: int, reason: str) -> None:
        if self.websocket.application_state == WebSocketState.CONNECTED:
            with suppress(RuntimeError, WebSocketDisconnect):
                await self.websocket.close(code=code, reason=reason[:120])

    async def _receive_loop(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            self.last_heard = time.monotonic()
            if self.session is not None:  # keeps a live session alive; never recreates a deleted one
                with suppress(SessionStoreUnavailableError):  # a question then reports it
                    await self.sessions.touch(self.session)
            self._count_message()
            text, data = message.get("text"), message.get("bytes")
            if text is None:
                WEBSOCKET_MESSAGES.labels(direction="in", type="binary").inc()
                size = len(data or b"")
                if size > self.settings.ws_max_message_bytes:
                    raise _PolicyViolationError("message too large")
                await self.send_error("Binary frames are not supported; send JSON text", "binary_not_supported", 415)
                continue
            if len(text.encode()) > self.settings.ws_max_message_bytes:
                raise _PolicyViolationError("message too large")
            await self._handle_text(text)

    def _count_message(self) -> None:
        now = time.monotonic()
        self._recent_messages.append(now)
        del self._recent_messages[: bisect.bisect_left(self._recent_messages, now - 60.0)]
        if len(self._recent_messages) > self.settings.ws_max_messages_per_minute:
            raise _PolicyViolationError("too many messages")

    async def _handle_text(self, text: str) -> None:
        try:
            payload = json.loads(text)
        except (ValueError, RecursionError) as error:
            # JSONDecodeError is a ValueError, and so is an integer longer than Python's digit limit
            # (sys.get_int_max_str_digits): JSON this server cannot read, refused like malformed JSON.
            WEBSOCKET_MESSAGES.labels(direction="in", type="invalid").inc()
            detail = "Message is not valid JSON"
            if isinstance(error, ValueError) and not isinstance(error, json.JSONDecodeError):
                detail = "Message cannot be read: a number in it has too many digits"
            await self.send_error(detail, "invalid_json", 400)
            return
        kind = payload.get("type") if isinstance(payload, dict) else None
        if not isinstance(kind, str) or kind not in _CLIENT_TYPES:
            kind = "unknown"
        WEBSOCKET_MESSAGES.labels(direction="in", type=kind).inc()
        if kind == "question":
            await self._enqueue_question(payload)
        elif kind == "cancel":
            await self._cancel_current()
        elif kind == "ping":
            await self.send({"type": "pong"})
        elif kind == "heartbeat_response":
            return
        elif kind == "feedback":
            await self._record_feedback(payload)
        else:
            await self.send_error(
                "Unknown message type; expected question, cancel, ping, heartbeat_response or feedback",
                "unknown_type",
                400,
            )

    async def _enqueue_question(self, payload: dict[str, Any]) -> None:
        data = payload.get("data")
        raw = data.get("question") if isinstance(data, dict) else payload.get("question")
        try:
            question = await self.agent.accept(
                raw, transport="websocket"
            )  # validation only: the session is resolved when it is answered
        except InvalidQuestionError as error:
            await self.send_error(error.detail, error.code, 422)
            return
        if len(self.questions) >= self.settings.ws_max_queued_questions:  # refused before it costs any budget
            await self.send_error(
                f"Too many questions waiting (limit {self.settings.ws_max_queued_questions}); wait for an answer",
                "queue_full",
                429,
            )
            return
        try:
            await spend_budget(self.websocket, "/ws/ask")
        except RateLimitExceededError as error:
            await self.send_error(error.detail, "rate_limited", 429)
            return
        self.questions.append((question.text, isinstance(data, dict)))
        if self._answering is None or self._answering.done():  # done: its callback has not run yet
            self._answering = asyncio.create_task(self._answer_queued(), name="ws-answer")
            self._answering.add_done_callback(self._answering_ended)

    async def _record_feedback(self, payload: dict[str, Any]) -> None:
        """A rating of an answer given on this connection (or any other): `feedback_recorded`, or an `error`."""
        fields = {key: payload[key] for key in ("answer_id", "rating", "comment") if key in payload}
        try:
            request = FeedbackRequest.model_validate({**fields, "session_id": self.session_id})
        except ValidationError as error:
            detail, reason = describe_validation(error.errors())
            await self.send_error(detail, reason, 422)
            return
        if self.feedback is None:
            await self.send_error("Feedback is not available on this server", "feedback_disabled", 409)
            return
        try:
            await spend_budget(self.websocket, "/ws/ask")
            recorded = await submit_feedback(self.feedback, request)
        except RateLimitExceededError as error:
            await self.send_error(error.detail, "rate_limited", 429)
            return
        except FeedbackRefusedError as refused:
            await self.send_error(refused.detail, refused.reason, refused.status)
            return
        await self.send({"type": "feedback_recorded", "answer_id": recorded.answer_id, "rating": recorded.rating})

    async def _cancel_current(self) -> None:
        task = self.current_answer
        if task is not None and not task.done():
            task.cancel()

    async def _answer_queued(self) -> None:
        """Answer the waiting questions in order, each as its own task (so `cancel` stops only that one)."""
        while self.questions:
            text, with_references = self.questions.pop(0)
            task = asyncio.create_task(self._stream_answer(text, with_references), name="ws-stream-answer")
            self.current_answer = task
            try:
                await asyncio.wait([task])
            finally:
                if not task.done():
                    task.cancel()
                    await asyncio.wait([task])
                self.current_answer = None
                if not task.cancelled():
                    task.exception()  # retrieved here even when this loop is being cancelled
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error

    def _answering_ended(self, task: asyncio.Task[None]) -> None:
        """The queue is empty (the next question starts a new task), or answering failed: then close (1011)."""
        if self._answering is task:
            self._answering = None
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and not isinstance(error, WebSocketDisconnect | RuntimeError):
            self._failure = error  # raised by `run` once the socket has closed
            _in_background(self._close(1011, "internal error"), "ws-close-failed")

    async def _resolve(self, text: str) -> Question | None:
        """The question inside this connection's session (created with the first question); None if refused."""
        try:
            question = await self.agent.accept(
                text,
                self.session_id,
                new_session=True,
                owner=self.client,
                adopt_id=self.session is None,
                transport="websocket",
            )
        except SessionStoreUnavailableError as error:
            await self.send_error(str(error), "session_store_unavailable", 503)
            return None
        self.session = question.session
        if self.session is not None:
            self.session_id = self.session.id
        return question

    async def _stream_answer(self, text: str, with_references: bool) -> None:
        question = await self._resolve(text)
        if question is None:
            return
        sent_words = 0
        confidence = 0.0
        sources: tuple[Source, ...] = ()
        try:
            async with aclosing(self.agent.stream(question)) as events:  # a cancel releases the session at once
                async for event in events:
                    if with_references and isinstance(event, CompleteEvent) and event.processing_stage != "no_match":
                        for line in self._reference_lines(sources, confidence, sent_words):
                            await self.send(line.to_wire())
                    await self.send(event.to_wire())
                    if isinstance(event, MetadataEvent):
                        confidence, sources = event.confidence, event.sources
                    elif isinstance(event, WordEvent):
                        sent_words += 1
        except WebSocketDisconnect:
            STREAMS_CANCELLED.labels(transport="websocket").inc()
            logger.info("stream_cancelled", transport="websocket", reason="client_disconnected")
            raise
        except asyncio.CancelledError:
            STREAMS_CANCELLED.labels(transport="websocket").inc()
            logger.info("stream_cancelled", transport="websocket", reason="client_cancelled")
            with suppress(Exception):
                await self.send(CompleteEvent(confidence, "cancelled", sent_words).to_wire())
            raise

    def _reference_lines(self, sources: tuple[Source, ...], confidence: float, after: int) -> list[WordEvent]:
        """The original frontend's references panel: one `\n\n📚 **Reference**: <question>` line per entry.

        The original backend delivered its sources as these trailing lines, and its React frontend renders
        them in a panel; they are sent only here (`/ws/ask`), as `word` events flagged `reference: true`,
        after the answer's words and before `complete` (whose `total_words` counts the answer's words only).
        Up to WS_REFERENCE_LINES entries that clear the no-match threshold, best first.
        """
        threshold = self.settings.agent_similarity_threshold
        cited = [source for source in sources if source.score >= threshold][: self.settings.ws_reference_lines]
        return [
            WordEvent(f"{REFERENCE_PREFIX}{source.question}", after + offset, confidence, reference=True)
            for offset, source in enumerate(cited)
        ]

    def _begin_drain(self) -> None:
        _in_background(self._close_when_drained(), "ws-drain")

    async def _close_when_drained(self) -> None:
        """At shutdown, let the answer being streamed finish, then close with 1012 (infrastructure/shutdown.py)."""
        current = self.current_answer
        if current is not None and not current.done():
            await asyncio.wait([current])
        logger.info("websocket_drained", session=session_tag(self.session_id))
        await self._close(SERVICE_RESTART, "server restarting")

    def _schedule_heartbeat(self) -> None:
        interval = self.settings.ws_heartbeat_interval_seconds
        self._heartbeat = asyncio.get_running_loop().call_later(interval, self._heartbeat_due)

    def _heartbeat_due(self) -> None:
        """Every WS_HEARTBEAT_INTERVAL_SECONDS: a `heartbeat`, or close (1000) a client silent for too long."""
        idle_limit = self.settings.ws_heartbeat_interval_seconds * self.settings.ws_idle_timeout_intervals
        if time.monotonic() - self.last_heard > idle_limit:
            logger.info("websocket_idle_closed", session=session_tag(self.session_id))
            _in_background(self._close(1000, "idle timeout"), "ws-idle-close")
            return
        _in_background(self._send_heartbeat(), "ws-heartbeat")
        self._schedule_heartbeat()

    async def _send_heartbeat(self) -> None:
        with suppress(WebSocketDisconnect, RuntimeError):  # the client left: the receiving side ends the connection
            await self.send({"type": "heartbeat"})


def _host_name(authority: str) -> str:
    """The host name of a `host[:port]` authority, lower case (IPv6 brackets kept)."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority.split("]", 1)[0] + "]"
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def origin_allowed(websocket: WebSocket, allowed_origins: list[str]) -> bool:
    """Browsers send Origin: accept ALLOWED_ORIGINS and the page's own site; non-browser clients send none.

    The page's own site is judged by host name, not port: a reverse proxy that forwards `Host $host` (the
    original frontend's nginx) drops the port. Behind a trusted proxy, `X-Forwarded-Host` names the host the
    browser used. A page on another host is refused.
    """
    origin = websocket.headers.get("origin")
    if origin is None or "*" in allowed_origins or origin in allowed_origins:
        return True
    origin_host = urlsplit(origin).hostname
    if not origin_host:
        return False
    host = websocket.headers.get("host", "")
    peer = websocket.client.host if websocket.client else None
    if from_trusted_proxy(peer, websocket.app.state.trusted_networks):
        host = websocket.headers.get("x-forwarded-host", host).split(",")[0]
    origin_name = f"[{origin_host}]" if ":" in origin_host else origin_host
    return bool(host) and origin_name == _host_name(host)


@router.websocket("/ws/test")
async def websocket_test(websocket: WebSocket, settings: SettingsDep) -> None:
    """The original frontend's "Test WS" button: accept, say so, close cleanly (1000)."""
    if not origin_allowed(websocket, settings.allowed_origins):
        await websocket.close(code=POLICY_VIOLATION, reason="origin not allowed")
        return
    await websocket.accept()
    message = {"type": "status", "status": "connected", "message": "WebSocket connection test succeeded"}
    with suppress(RuntimeError, WebSocketDisconnect):
        await websocket.send_text(json.dumps({**message, "timestamp": time.time()}))
        await websocket.close(code=1000, reason="test complete")


@router.websocket("/ws/ask")
async def websocket_ask(
    websocket: WebSocket, agent: AgentDep, sessions: SessionsDep, settings: SettingsDep, feedback: FeedbackDep
) -> None:
    """Chat over a WebSocket; see docs/api.md for the message protocol."""
    if not origin_allowed(websocket, settings.allowed_origins):
        logger.warning("websocket_origin_refused", origin=websocket.headers.get("origin"))
        await websocket.close(code=POLICY_VIOLATION, reason="origin not allowed")
        return
    if api_key_required(websocket, everywhere=True):  # browsers cannot set headers here: `?api_key=` also works
        await websocket.close(code=POLICY_VIOLATION, reason="api key required")
        return
    await websocket.accept()
    WEBSOCKET_CONNECTIONS.inc()
    connection = ChatConnection(websocket, agent, sessions, settings, feedback)
    structlog.contextvars.bind_contextvars(session=session_tag(connection.session_id))
    try:
        await connection.run()
    except (WebSocketDisconnect, RuntimeError) as error:
        logger.debug("websocket_closed", reason=type(error).__name__)
    finally:
        WEBSOCKET_CONNECTIONS.dec()
