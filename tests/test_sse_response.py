"""api/sse.py in-process: a `: ping` comment during silence, events ready together in one send, and a reader
cancelled (and unwound) when the response is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from api import sse
from api.sse import EventStreamResponse, sse_data

SCOPE: dict[str, Any] = {"type": "http", "asgi": {"spec_version": "2.3"}}


async def _never_disconnects() -> dict[str, Any]:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


async def _run(events: AsyncIterator[bytes]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await EventStreamResponse(events)(SCOPE, _never_disconnects, send)
    return sent


def test_sse_data_is_fastapis_format() -> None:
    assert (
        sse_data({"type": "word", "content": "é", "n": 1.5})
        == b'data: {"type": "word", "content": "\\u00e9", "n": 1.5}\n\n'
    )
    assert sse_data({"x": float("nan"), "y": [float("inf")]}) == b'data: {"x": null, "y": [null]}\n\n'


async def test_ping_when_silent_and_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "PING_SECONDS", 0.05)

    async def events() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"
        await asyncio.sleep(0.12)
        yield b"data: 3\n\n"

    sent = await _run(events())
    assert sent[0]["type"] == "http.response.start"
    headers = sent[0]["headers"]
    assert (b"content-type", b"text/event-stream; charset=utf-8") in headers
    assert headers[-2:] == [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
    bodies = [message["body"] for message in sent[1:]]
    assert bodies[0] == b"data: 1\n\ndata: 2\n\n"  # ready together: one send
    assert bodies[1] == b": ping\n\n"
    assert bodies[-2:] == [b"data: 3\n\n", b""]
    assert sent[-1]["more_body"] is False


async def test_cancelled_response_unwinds_the_reader() -> None:
    unwound = asyncio.Event()

    async def events() -> AsyncIterator[bytes]:
        try:
            yield b"data: 1\n\n"
            await asyncio.sleep(60)
            yield b"data: 2\n\n"
        finally:
            unwound.set()

    task = asyncio.create_task(_run(events()))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert unwound.is_set()  # before the response returned: its owner may close the iterator at once
