"""The original frontend's contract over real sockets: its WebSocket protocol with reference lines, the
"Test WS" handshake on /ws/test, and the origin check behind a reverse proxy that drops the port from Host.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import ServerProcess

REFERENCE = "\n\n📚 **Reference**: "


@asynccontextmanager
async def host_dropping_proxy(upstream_port: int, forwarded_host: str | None = None) -> AsyncIterator[int]:
    """A tiny HTTP/WebSocket reverse proxy on loopback that forwards `Host: <name>` without the port, as the
    original frontend's nginx does (`proxy_set_header Host $host`), optionally adding X-Forwarded-Host."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        head = await client_reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        rewritten = []
        for line in lines:
            if line.lower().startswith("host:"):
                name = line.split(":", 1)[1].strip().rsplit(":", 1)[0]
                line = f"Host: {name}"
                if forwarded_host is not None:
                    rewritten.append(f"X-Forwarded-Host: {forwarded_host}")
            rewritten.append(line)
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        upstream_writer.write("\r\n".join(rewritten).encode("latin-1"))
        await upstream_writer.drain()
        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0, family=socket.AF_INET)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()


async def frontend_answer(url: str, question: str, origin: str | None = None) -> list[dict[str, Any]]:
    """Ask the way the original React frontend does: `data` form, heartbeat responses, until complete."""
    headers = {"Origin": origin} if origin else None
    async with connect(url, additional_headers=headers, open_timeout=10) as ws:
        status = json.loads(await ws.recv())
        assert status["type"] == "status" and status["status"] == "connected" and status["details"]["session_id"]
        await ws.send(json.dumps({"type": "question", "data": {"question": question}}))
        events: list[dict[str, Any]] = []
        while not events or events[-1]["type"] not in ("complete", "error"):
            message = json.loads(await asyncio.wait_for(ws.recv(), 20))
            if message["type"] == "heartbeat":
                await ws.send(json.dumps({"type": "heartbeat_response"}))
                continue
            events.append(message)
        return events


def frontend_text(events: list[dict[str, Any]]) -> str:
    """The text the original frontend builds: every non-empty `word` content, joined with single spaces."""
    return " ".join(event["content"] for event in events if event["type"] == "word" and event["content"])


async def test_the_original_frontend_sees_reference_lines(server: ServerProcess) -> None:
    rest = httpx.post(f"{server.base_url}/ask", json={"question": "What is a health factor?"}, timeout=30).json()
    events = await frontend_answer(f"{server.ws_url}/ws/ask", "What is a health factor?")
    assert events[-1]["type"] == "complete" and events[-1]["total_words"] == len(rest["answer"].split())
    text = frontend_text(events)
    answer, *lines = text.split(REFERENCE)
    references = [line.rstrip() for line in lines]  # the frontend joins every word with a space
    assert answer.rstrip() == rest["answer"]
    assert references and references[0] == rest["sources"][0]["question"]
    assert references == [source["question"] for source in rest["sources"] if source["score"] >= 0.4][:3]
    # A declined question gets no reference lines.
    declined = await frontend_answer(f"{server.ws_url}/ws/ask", "best lasagna recipe?")
    assert REFERENCE not in frontend_text(declined)


async def test_ws_test_answers_and_closes_cleanly(server: ServerProcess) -> None:
    async with connect(f"{server.ws_url}/ws/test", open_timeout=10) as ws:
        message = json.loads(await ws.recv())
        assert message["type"] == "status" and message["status"] == "connected"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000


async def test_origin_check_behind_a_proxy_that_drops_the_port(server: ServerProcess) -> None:
    port = int(server.base_url.rsplit(":", 1)[1])
    async with host_dropping_proxy(port) as proxy_port:
        page = f"http://127.0.0.1:{proxy_port}"  # the page and the socket share the proxy's origin
        events = await frontend_answer(f"ws://127.0.0.1:{proxy_port}/ws/ask", "What is Aave?", origin=page)
        assert events[-1]["type"] == "complete"
        with pytest.raises(InvalidStatus) as refused:
            await frontend_answer(f"ws://127.0.0.1:{proxy_port}/ws/ask", "What is Aave?", origin="http://evil.example")
        assert refused.value.response.status_code == 403


async def test_forwarded_host_is_honoured_only_from_trusted_proxies(
    start_server: Callable[..., ServerProcess], server: ServerProcess
) -> None:
    trusting = start_server(TRUSTED_PROXIES="127.0.0.1/32")
    for target, accepted in ((trusting, True), (server, False)):
        port = int(target.base_url.rsplit(":", 1)[1])
        async with host_dropping_proxy(port, forwarded_host="chat.example.org") as proxy_port:
            url = f"ws://127.0.0.1:{proxy_port}/ws/ask"
            if accepted:
                events = await frontend_answer(url, "What is Aave?", origin="https://chat.example.org")
                assert events[-1]["type"] == "complete"
            else:
                with pytest.raises(InvalidStatus):
                    await frontend_answer(url, "What is Aave?", origin="https://chat.example.org")
