"""`/ws/ask`: the chat protocol of the original React frontend, one session per connection.

Receiving runs concurrently with answering, so `cancel` and `ping` are honoured mid-stream; questions
sent while an answer streams wait in a bounded queue and are answered in order.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from contextlib import suppress
from typing import Any
from urllib.parse import urlsplit

import structlog
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from agents.agent import DeFiAgent, Question
from agents.events import CompleteEvent, ErrorEvent, MetadataEvent, WordEvent
from agents.validation import InvalidQuestionError
from api.deps import spend_budget
from config import Settings
from infrastructure.metrics import STREAMS_CANCELLED, WEBSOCKET_CONNECTIONS, WEBSOCKET_MESSAGES
from infrastructure.rate_limit import RateLimitExceededError
from services.sessions import Session, SessionStore, SessionStoreUnavailableError

logger = structlog.get_logger(__name__)
router = APIRouter()

PROTOCOL_VERSION = "1.0"
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011
_CLIENT_TYPES = frozenset({"question", "cancel", "ping", "heartbeat_response"})


class _PolicyViolationError(Exception):
    """The client broke a connection limit; close with 1008."""


class ChatConnection:
    """One client connection: its session, its question queue and its tasks."""

    def __init__(
        self, websocket: WebSocket, agent: DeFiAgent, sessions: SessionStore, settings: Settings, session: Session
    ) -> None:
        self.websocket = websocket
        self.agent = agent
        self.sessions = sessions
        self.settings = settings
        self.session = session
        self.questions: asyncio.Queue[Question] = asyncio.Queue(maxsize=settings.ws_max_queued_questions)
        self.current_answer: asyncio.Task[None] | None = None
        self.last_heard = time.monotonic()
        self._recent_messages: deque[float] = deque()
        self._send_lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        """Send one JSON message, stamped with the server time."""
        message = {**message, "timestamp": time.time()}
        async with self._send_lock:
            await self.websocket.send_text(json.dumps(message))
        WEBSOCKET_MESSAGES.labels(direction="out", type=str(message.get("type"))).inc()

    async def send_error(self, detail: str, code: str) -> None:
        """An `error` message (agents.events.ErrorEvent)."""
        await self.send(ErrorEvent(detail, code).to_wire())

    async def run(self) -> None:
        """Serve the connection until the client leaves or breaks a limit."""
        await self.send(
            {
                "type": "status",
                "status": "connected",
                "details": {
                    "session_id": self.session.id,
                    "capabilities": ["streaming", "cancellation"],
                    "protocol_version": PROTOCOL_VERSION,
                },
            }
        )
        tasks = [
            asyncio.create_task(self._receive_loop(), name="ws-receive"),
            asyncio.create_task(self._answer_loop(), name="ws-answer"),
            asyncio.create_task(self._heartbeat_loop(), name="ws-heartbeat"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if isinstance(error, _PolicyViolationError):
                    await self._close(POLICY_VIOLATION, str(error))
                elif error is not None and not isinstance(error, WebSocketDisconnect):
                    raise error
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with suppress(asyncio.CancelledError, Exception):
                    await task

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
            with suppress(SessionStoreUnavailableError):  # a question then reports it; other messages need no store
                await self.sessions.touch(self.session)
            self._count_message()
            text, data = message.get("text"), message.get("bytes")
            if text is None:
                WEBSOCKET_MESSAGES.labels(direction="in", type="binary").inc()
                size = len(data or b"")
                if size > self.settings.ws_max_message_bytes:
                    raise _PolicyViolationError("message too large")
                await self.send_error("Binary frames are not supported; send JSON text", "binary_not_supported")
                continue
            if len(text.encode()) > self.settings.ws_max_message_bytes:
                raise _PolicyViolationError("message too large")
            await self._handle_text(text)

    def _count_message(self) -> None:
        now = time.monotonic()
        self._recent_messages.append(now)
        while self._recent_messages and now - self._recent_messages[0] > 60.0:
            self._recent_messages.popleft()
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
            await self.send_error(detail, "invalid_json")
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
        else:
            await self.send_error(
                "Unknown message type; expected question, cancel, ping or heartbeat_response", "unknown_type"
            )

    async def _enqueue_question(self, payload: dict[str, Any]) -> None:
        data = payload.get("data")
        raw = data.get("question") if isinstance(data, dict) else payload.get("question")
        try:
            question = await self.agent.accept(raw)
        except InvalidQuestionError as error:
            await self.send_error(error.detail, error.code)
            return
        try:
            await spend_budget(self.websocket, "/ws/ask")
        except RateLimitExceededError as error:
            await self.send_error(error.detail, "rate_limited")
            return
        question = Question(question.text, self.session)
        try:
            self.questions.put_nowait(question)
        except asyncio.QueueFull:
            await self.send_error(
                f"Too many questions waiting (limit {self.settings.ws_max_queued_questions}); wait for an answer",
                "queue_full",
            )

    async def _cancel_current(self) -> None:
        task = self.current_answer
        if task is not None and not task.done():
            task.cancel()

    async def _answer_loop(self) -> None:
        while True:
            question = await self.questions.get()
            task = asyncio.create_task(self._stream_answer(question), name="ws-stream-answer")
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

    async def _stream_answer(self, question: Question) -> None:
        sent_words = 0
        confidence = 0.0
        try:
            async for event in self.agent.stream(question):
                await self.send(event.to_wire())
                if isinstance(event, MetadataEvent):
                    confidence = event.confidence
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

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.ws_heartbeat_interval_seconds
        idle_limit = interval * self.settings.ws_idle_timeout_intervals
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - self.last_heard > idle_limit:
                logger.info("websocket_idle_closed", session_id=self.session.id)
                await self._close(1000, "idle timeout")
                return
            await self.send({"type": "heartbeat"})


async def _refuse(websocket: WebSocket, detail: str) -> None:
    """No session can be created (Redis down): one `error` message, then close 1011 (clients reconnect later)."""
    message = ErrorEvent(detail, "session_store_unavailable").to_wire()
    with suppress(RuntimeError, WebSocketDisconnect):
        await websocket.send_text(json.dumps({**message, "timestamp": time.time()}))
        WEBSOCKET_MESSAGES.labels(direction="out", type="error").inc()
        await websocket.close(code=INTERNAL_ERROR, reason="session store unavailable")


def origin_allowed(websocket: WebSocket, allowed_origins: list[str]) -> bool:
    """Browsers send Origin: accept the page's own origin and ALLOWED_ORIGINS; non-browser clients send none."""
    origin = websocket.headers.get("origin")
    if origin is None or "*" in allowed_origins or origin in allowed_origins:
        return True
    return urlsplit(origin).netloc == websocket.headers.get("host")


@router.websocket("/ws/ask")
async def websocket_ask(websocket: WebSocket) -> None:
    """Chat over a WebSocket; see docs/api.md for the message protocol."""
    agent: DeFiAgent = websocket.app.state.agent
    sessions: SessionStore = websocket.app.state.sessions
    settings: Settings = websocket.app.state.settings
    if not origin_allowed(websocket, settings.allowed_origins):
        logger.warning("websocket_origin_refused", origin=websocket.headers.get("origin"))
        await websocket.close(code=POLICY_VIOLATION, reason="origin not allowed")
        return
    await websocket.accept()
    try:
        session = await sessions.get_or_create(None)
    except SessionStoreUnavailableError as error:
        await _refuse(websocket, str(error))
        return
    WEBSOCKET_CONNECTIONS.inc()
    connection = ChatConnection(websocket, agent, sessions, settings, session)
    structlog.contextvars.bind_contextvars(session_id=connection.session.id)
    try:
        await connection.run()
    except (WebSocketDisconnect, RuntimeError) as error:
        logger.debug("websocket_closed", reason=type(error).__name__)
    finally:
        WEBSOCKET_CONNECTIONS.dec()
