"""A Server-Sent Events response that writes the events ready together in one send.

The bytes are those FastAPI's native SSE (`fastapi.sse.EventSourceResponse` with a generator endpoint)
writes: `data: <json.dumps(event)>` blocks, `Cache-Control: no-cache`, `X-Accel-Buffering: no`, and a
`: ping` comment after 15 s without an event. The cost is not: FastAPI passes every event through two
one-slot memory streams, a task switch each and a timer per event, then one `http.response.body` per
event. Here one task per stream reads the events into a list, and the response sends whatever the list
holds at once: an extractive answer's words, ready together, go out in one write. HTTP chunk boundaries
are not part of the SSE format, so a client cannot tell.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterable, Mapping
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Send

PING_SECONDS = 15.0
"""Silence after which a `: ping` comment is sent (FastAPI's interval), so proxies keep the stream open."""
PING = b": ping\n\n"
ITEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0},
    },
}
"""One event, as OpenAPI 3.2 describes text/event-stream (the `itemSchema` FastAPI gives a native SSE route)."""


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(value) for value in data]
    return data


def sse_data(payload: Mapping[str, Any]) -> bytes:
    """One `data:` event, as FastAPI writes a `ServerSentEvent(data=payload)` (a non-finite float is null)."""
    try:
        text = json.dumps(payload, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(payload))
    return b"data: " + text.encode("ascii") + b"\n\n"


class EventStreamResponse(StreamingResponse):
    """`text/event-stream` from an async iterable of encoded events; the ones ready together go in one send.

    Disconnects are handled as by any StreamingResponse (its `__call__`). Events are read by one task per
    stream, so waiting for the next event can time out into a ping without cancelling the iterator; the
    task is cancelled, and waited for, when the response ends early.

    The class declares no media type: routes using it as `response_class` document their 200 in
    `responses` (FastAPI would otherwise describe the body as a plain string).
    """

    media_type = None

    def __init__(
        self, events: AsyncIterable[bytes], status_code: int = 200, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        super().__init__(events, status_code, media_type="text/event-stream")
        self.raw_headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"), *(headers or [])]

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        ready: list[bytes] = []
        finished = False
        failure: Exception | None = None
        wake = anyio.Event()

        async def read() -> None:
            nonlocal finished, failure
            try:
                async for chunk in self.body_iterator:
                    ready.append(chunk.encode() if isinstance(chunk, str) else bytes(chunk))
                    wake.set()
            except Exception as error:  # sent after the events before it, as FastAPI's stream does
                failure = error
            finally:
                finished = True
                wake.set()

        reader = asyncio.create_task(read())  # not in a task group: its errors would come out wrapped in a group
        try:
            while True:
                if ready:
                    body = b"".join(ready) if len(ready) > 1 else ready[0]
                    ready.clear()
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                elif finished:
                    break
                else:
                    wake = anyio.Event()
                    with anyio.move_on_after(PING_SECONDS) as silence:
                        await wake.wait()
                    if silence.cancelled_caught:
                        await send({"type": "http.response.body", "body": PING, "more_body": True})
        finally:
            if (
                not reader.done()
            ):  # the client is gone: stop reading, and let the iterator unwind before its owner closes it
                reader.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.wait([reader])
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        if failure is not None:
            raise failure
