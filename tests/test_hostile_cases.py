"""The remaining reproductions of the hostile-client review, each against a real server: a damaged index
file, a malformed vector in the shared cache, and what a refused question costs (budget and headers).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect

from services.embedding_cache import SharedCache, cache_key
from services.embedding_providers import LocalMiniLMProvider
from tests.conftest import ROOT, ServerProcess, log_records, poll_until
from tests.redis_server import RedisServer


def lending_dataset(directory: Path) -> Path:
    """The seed's lending entries alone (health-factor among its neighbours): an index built in seconds."""
    seed = json.loads((ROOT / "data" / "knowledge_base.json").read_text())
    path = directory / "lending" / "knowledge_base.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps([entry for entry in seed if entry["category"] == "lending"]))
    return path


def test_a_flipped_byte_in_the_index_file_is_detected_and_rebuilt(
    start_server: Callable[..., ServerProcess], server: ServerProcess, shared_cache_dir: Path, tmp_path: Path
) -> None:
    assert server.port  # the default server wrote the seed's index file into the shared cache
    cache_dir = tmp_path / "cache"
    shutil.copytree(shared_cache_dir / "index", cache_dir / "index")
    # A dataset of its own, the seed's 28 lending entries of 353: rebuilt in seconds where the seed takes a minute.
    env = {"CACHE_DIR": str(cache_dir), "DATASET_PATH": str(lending_dataset(tmp_path))}
    before = set((cache_dir / "index").glob("*.npz"))
    start_server(**env).stop()
    (written,) = set((cache_dir / "index").glob("*.npz")) - before  # the dataset's index, beside the seed's
    # Every index file there (the seed's, and other tests' knowledge-base versions beside it) is damaged.
    damaged: dict[Path, bytes] = {}
    for index_file in (cache_dir / "index").glob("*.npz"):
        content = bytearray(index_file.read_bytes())
        content[len(content) // 2] ^= 0xFF  # inside a zip member: its CRC no longer matches
        index_file.write_bytes(bytes(content))
        damaged[index_file] = bytes(content)
    assert len(damaged) >= 2
    damaged_server = start_server(**env)
    answer = httpx.post(
        f"{damaged_server.base_url}/ask", json={"question": "What is a health factor?"}, timeout=30
    ).json()
    assert answer["sources"][0]["id"] == "health-factor"
    events = log_records(damaged_server)
    unreadable = [event for event in events if event["event"] == "index_cache_unreadable"]
    assert unreadable and "CRC" in unreadable[0]["error"]
    assert any(event["event"] == "agent_built" and event["index_from_cache"] is False for event in events)
    rewritten = [path for path, content in damaged.items() if path.read_bytes() != content]
    assert rewritten == [written]  # the dataset's index, rewritten whole; the others left alone


@pytest.fixture(scope="module")
def shared_tier_server(start_server: Callable[..., ServerProcess], redis_server: RedisServer) -> ServerProcess:
    """A server whose shared embedding tier is this module's Redis (`redis_server`, tests/conftest.py)."""
    return start_server(REDIS_URL=redis_server.url)


@pytest.mark.parametrize(
    ("blob", "question"),
    [
        # the wrong size
        (np.ones(7, dtype="<f4").tobytes(), "How is the health factor on a lending market worked out?"),
        # not finite
        (np.full(384, np.nan, dtype="<f4").tobytes(), "How is a health factor on a lending market worked out?"),
        # not a unit vector
        ((np.ones(384, dtype="<f4") * 3).tobytes(), "How is the health factor on a lending protocol worked out?"),
    ],
    ids=["wrong-size", "nan", "not-unit"],
)
def test_a_malformed_shared_vector_is_a_miss_and_never_copied(
    shared_tier_server: ServerProcess, redis_server: RedisServer, blob: bytes, question: str
) -> None:
    # One server for the three cases: each asks a question of its own, which no cache layer has seen.
    server = shared_tier_server
    with redis_server.client() as redis:
        redis.set(SharedCache.PREFIX + cache_key(LocalMiniLMProvider.model_id, question), blob)

    def rejections() -> list[dict[str, Any]]:
        return [event for event in log_records(server) if event["event"] == "embedding_cache_entry_rejected"]

    earlier = len(rejections())
    for _ in range(2):  # the second time would hit the memory cache, had the bad vector been copied there
        response = httpx.post(f"{server.base_url}/ask", json={"question": question}, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["sources"][0]["id"] == "health-factor"
    rejected = rejections()[earlier:]
    assert len(rejected) == 1 and rejected[0]["layer"] == "shared"
    with redis_server.client() as redis:  # replaced by the model's own vector
        stored = redis.get(SharedCache.PREFIX + cache_key(LocalMiniLMProvider.model_id, question))
    assert isinstance(stored, bytes) and len(stored) == 384 * 4


def test_refused_questions_cost_no_budget_and_charged_ones_say_so(start_server: Callable[..., ServerProcess]) -> None:
    # 15 ms between words: an answer streams for over a second, while the six questions arrive within milliseconds.
    server = start_server(RATE_LIMIT_REQUESTS_PER_MINUTE="50", WS_MAX_QUEUED_QUESTIONS="1", STREAM_WORD_DELAY_MS="15")
    too_long = httpx.post(f"{server.base_url}/ask", json={"question": "a" * 1001}, timeout=10)
    assert too_long.status_code == 422 and too_long.json()["reason"] == "question_too_long"
    assert too_long.headers["x-ratelimit-limit"] == "50"  # charged, and told so like any other answer
    remaining = int(too_long.headers["x-ratelimit-remaining"])

    async def flood() -> list[dict[str, Any]]:
        async with connect(f"{server.ws_url}/ws/ask", open_timeout=10) as ws:
            await ws.recv()
            for _ in range(6):  # one streams, at most one waits, the rest are refused as queue_full
                await ws.send(json.dumps({"type": "question", "question": "What is Aave?"}))
            replies: list[dict[str, Any]] = []

            def settled() -> int:
                return sum(reply.get("type") == "complete" or reply.get("reason") == "queue_full" for reply in replies)

            while settled() < 6:
                replies.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            return replies

    replies = asyncio.run(flood())
    refused = [reply for reply in replies if reply.get("reason") == "queue_full"]
    answered = sum(reply.get("type") == "complete" for reply in replies)
    assert len(refused) >= 4 and answered + len(refused) == 6
    assert all(reply["code"] == 429 for reply in refused)
    after = httpx.post(f"{server.base_url}/ask", json={"question": "What is Aave?"}, timeout=30)
    # The answered WebSocket questions and this one were charged; the refused ones were not.
    assert int(after.headers["x-ratelimit-remaining"]) == remaining - answered - 1


def test_the_session_id_never_reaches_the_log(server: ServerProcess) -> None:
    response = httpx.post(f"{server.base_url}/v2/ask", json={"question": "What is Aave?"}, timeout=30)
    session_id = response.json()["session_id"]
    poll_until(lambda: any(e.get("event") == "request_finished" for e in log_records(server)), 10)
    assert session_id not in server.log()
