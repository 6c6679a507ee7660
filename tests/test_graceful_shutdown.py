"""SIGTERM on a real server: answers in progress finish, WebSockets then close with 1012, the process exits.

This is the drain that Kubernetes' preStop hook and `terminationGracePeriodSeconds` are sized for
(deploy/kubernetes, docs/deployment.md).
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import ServerProcess, log_records

QUESTION = "What is impermanent loss?"
HANG_GUARD_SECONDS = 120.0  # only against a hang: the drain itself is bounded by GRACEFUL_SHUTDOWN_SECONDS


async def next_message(ws: ClientConnection) -> dict[str, Any]:
    """The next message that is not a heartbeat."""
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), HANG_GUARD_SECONDS))
        if message["type"] != "heartbeat":
            return dict(message)


async def messages_until_closed(ws: ClientConnection) -> tuple[list[dict[str, Any]], int | None]:
    """Every message until the server closes the socket, and the close code it sent."""
    received: list[dict[str, Any]] = []
    try:
        while True:
            received.append(await next_message(ws))
    except ConnectionClosed as closed:
        return received, closed.rcvd.code if closed.rcvd is not None else None


async def test_sigterm_finishes_answers_in_progress_then_closes_sockets_with_1012(
    start_server: Callable[..., ServerProcess],
) -> None:
    # 20 ms between words keeps each answer streaming for seconds; a long grace keeps a slow machine from
    # reaching the fallback close, which would be a different behaviour from the one tested here.
    server = start_server(STREAM_WORD_DELAY_MS="20", GRACEFUL_SHUTDOWN_SECONDS="60")
    async with (
        connect(f"{server.ws_url}/ws/ask", open_timeout=10) as busy,
        connect(f"{server.ws_url}/ws/ask", open_timeout=10) as idle,
        httpx.AsyncClient(base_url=server.base_url, timeout=HANG_GUARD_SECONDS) as http,
        aconnect_sse(http, "POST", "/ask-stream", json={"question": QUESTION}) as sse,
    ):
        assert (await next_message(busy))["type"] == "status"
        assert (await next_message(idle))["type"] == "status"
        await busy.send(json.dumps({"type": "question", "question": QUESTION}))
        before: list[dict[str, Any]] = []
        while not before or before[-1]["type"] != "word":
            before.append(await next_message(busy))
        sse_events = sse.aiter_sse()
        first_sse = await anext(sse_events)
        assert json.loads(first_sse.data)["type"] == "metadata"

        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)

        after, busy_code = await messages_until_closed(busy)
        idle_messages, idle_code = await messages_until_closed(idle)
        sse_rest = [event async for event in sse_events]

    # The answer that was streaming when SIGTERM came finished, then the socket closed as "service restart".
    assert busy_code == 1012
    assert after[-1]["type"] == "complete", after[-3:]
    words = [m for m in before + after if m["type"] == "word"]
    assert len(words) == after[-1]["total_words"]
    # A socket with nothing in progress was closed the same way, with nothing else said.
    assert idle_code == 1012
    assert idle_messages == []
    # The SSE stream was finished by the server too.
    assert json.loads(sse_rest[-1].data)["type"] == "complete"
    # The process drained and exited on its own after a complete shutdown (uvicorn re-raises the signal it
    # caught once it is done, so the exit status is the signal's).
    assert server.process.wait(timeout=HANG_GUARD_SECONDS) == -signal.SIGTERM
    assert "Application shutdown complete." in [record.get("event") for record in log_records(server)]
    drained = [record for record in log_records(server) if record.get("event") == "websocket_drained"]
    assert len(drained) == 2


@pytest.mark.parametrize("seconds", ["0", "301", "soon"])
def test_graceful_shutdown_seconds_out_of_range_stops_start_up(seconds: str, tmp_path: Any) -> None:
    from scripts.local_server import LocalServer

    server = LocalServer({"GRACEFUL_SHUTDOWN_SECONDS": seconds, "CACHE_DIR": str(tmp_path)}, tmp_path / "log")
    server.start()
    assert server.process is not None
    assert server.process.wait(timeout=HANG_GUARD_SECONDS) == 2
    assert "GRACEFUL_SHUTDOWN_SECONDS" in server.log()
