"""One question budget per client across /ask, /v2/ask, the SSE streams and the WebSocket."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.conftest import ServerProcess

QUESTION = {"question": "What is a liquidity pool?"}


def rejections(client: httpx.Client, route: str) -> float:
    match = re.search(
        rf'^rate_limit_rejections_total{{route="{re.escape(route)}"}} (\S+)$', client.get("/metrics").text, re.M
    )
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def limited(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server(RATE_LIMIT_REQUESTS_PER_MINUTE="5", RATE_LIMIT_WINDOW_SECONDS="60")


def test_one_budget_shared_by_every_question_endpoint(limited: ServerProcess) -> None:
    with httpx.Client(base_url=limited.base_url, timeout=30) as client:
        calls = [
            lambda: client.post("/ask", json=QUESTION),
            lambda: client.post("/v2/ask", json=QUESTION),
            lambda: client.post("/ask-stream", json=QUESTION),
            lambda: client.post("/v2/ask-stream", json=QUESTION),
            lambda: client.get("/ask-stream", params=QUESTION),
        ]
        for expected_remaining, call in zip([4, 3, 2, 1, 0], calls, strict=True):
            response = call()
            assert response.status_code == 200
            assert response.headers["x-ratelimit-limit"] == "5"
            assert response.headers["x-ratelimit-remaining"] == str(expected_remaining)
            assert int(response.headers["x-ratelimit-reset"]) > 0
        before = rejections(client, "/v2/ask-stream")
        for call in calls:
            refused = call()
            assert refused.status_code == 429
            body = refused.json()
            assert set(body) == {"detail", "type", "code", "reason"}
            assert body["code"] == 429 and body["reason"] == "rate_limited" and body["type"] == "rate_limit_exceeded"
            assert 1 <= int(refused.headers["retry-after"]) <= 60
            assert refused.headers["x-ratelimit-remaining"] == "0"
        assert rejections(client, "/v2/ask-stream") == before + 1
        for path in ("/health", "/metrics"):
            exempt = client.get(path)
            assert exempt.status_code == 200
            assert "x-ratelimit-limit" not in exempt.headers


async def test_websocket_questions_spend_the_same_budget(limited: ServerProcess) -> None:
    # The HTTP test above spent this client's budget; a WebSocket question is refused, other messages work.
    async with connect(f"{limited.ws_url}/ws/ask") as ws:
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "question", "question": "What is Aave?"}))
        error = json.loads(await ws.recv())
        assert error["type"] == "error" and error["code"] == 429 and error["reason"] == "rate_limited"
        assert error["message"] == error["error"]
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await ws.recv())["type"] == "pong"


def test_spoofed_forwarded_for_from_untrusted_peer_buys_nothing(limited: ServerProcess) -> None:
    # `limited` trusts no proxy; this client (127.0.0.3) has a budget of its own, untouched by the tests above.
    transport = httpx.HTTPTransport(local_address="127.0.0.3")
    with httpx.Client(base_url=limited.base_url, transport=transport, timeout=30) as client:
        for _ in range(5):
            assert client.post("/ask", json=QUESTION).status_code == 200
        for spoof in ({"X-Forwarded-For": "203.0.113.7"}, {"Forwarded": "for=198.51.100.9"}):
            assert client.post("/ask", json=QUESTION, headers=spoof).status_code == 429


def test_trusted_proxy_header_identifies_the_client(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(RATE_LIMIT_REQUESTS_PER_MINUTE="2", TRUSTED_PROXIES="127.0.0.1/32,10.0.0.0/8")
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        first = {"X-Forwarded-For": "203.0.113.7"}
        assert client.post("/ask", json=QUESTION, headers=first).status_code == 200
        assert client.post("/ask", json=QUESTION, headers=first).status_code == 200
        assert client.post("/ask", json=QUESTION, headers=first).status_code == 429
        # A client cannot prepend an address of its own: the rightmost untrusted hop is the client.
        prepended = {"X-Forwarded-For": "192.0.2.1, 203.0.113.7, 10.1.2.3"}
        assert client.post("/ask", json=QUESTION, headers=prepended).status_code == 429
        fresh = client.post("/ask", json=QUESTION, headers={"X-Forwarded-For": "198.51.100.9"})
        assert fresh.status_code == 200
        assert fresh.headers["x-ratelimit-remaining"] == "1"
        rfc7239 = client.post("/ask", json=QUESTION, headers={"Forwarded": 'for="[2001:db8::1]";proto=https'})
        assert rfc7239.status_code == 200
        assert rfc7239.headers["x-ratelimit-remaining"] == "1"
