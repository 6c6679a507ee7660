"""EMBEDDING_PROVIDER=openai against the fake OpenAI-compatible API on loopback (tests/fake_openai.py).

One server (the session's `openai_stack`) serves every test here; faults are switched on and off through
the fake's admin endpoint. The server runs with OPENAI_TIMEOUT_SECONDS=2 and OPENAI_MAX_RETRIES=2.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from config import PROJECT_ROOT
from services.embedding_cache import cache_key
from services.knowledge_base import load_knowledge_base
from tests.conftest import ROOT, OpenAIStack, ServerProcess, openai_env
from tests.fake_openai import FakeOpenAIServer

MAX_ATTEMPTS = 3  # OPENAI_MAX_RETRIES=2 in openai_env
CORPUS_BATCH = 256


def unique_question() -> str:
    """A DeFi question never asked before (so no cache layer has it)."""
    return f"What is impermanent loss for liquidity providers in pool {uuid.uuid4().hex[:10]}?"


def dataset_texts() -> int:
    knowledge_base = load_knowledge_base(PROJECT_ROOT / "data" / "knowledge_base.json")
    return sum(len(entry.phrasings()) for entry in knowledge_base.entries)


# --- start-up ------------------------------------------------------------------------------------------------


def test_startup_embeds_the_dataset_in_batches(openai_stack: OpenAIStack) -> None:
    batches = openai_stack.startup_stats["embedding_batches"]
    texts = dataset_texts()
    assert batches[0] == 1, "the start-up check embeds one word first"
    corpus = batches[1:]
    assert sum(corpus) == texts
    assert len(corpus) == math.ceil(texts / CORPUS_BATCH)
    assert max(corpus) <= CORPUS_BATCH
    assert openai_stack.startup_stats["requests"]["models"] == 1, "the chat model is checked once"
    assert openai_stack.startup_stats["requests"].get("chat", 0) == 0


def test_restart_reuses_the_cached_index(
    openai_stack: OpenAIStack, fake: FakeOpenAIServer, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(**openai_env(fake, openai_stack.cache_dir))
    try:
        assert fake.stats()["embedding_batches"] == [1], "only the start-up check; the index came from the cache"
    finally:
        server.stop()


def run_main(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PORT": "1", "LOG_DIR": "", "CACHE_DIR": str(tmp_path / "cache"), **env}
    return subprocess.run(
        [sys.executable, "main.py"], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"OPENAI_API_KEY": "wrong-key"}, "rejected OPENAI_API_KEY (HTTP 401)"),
        ({"OPENAI_EMBEDDING_MODEL": "no-such-model"}, "check OPENAI_EMBEDDING_MODEL"),
        ({"OPENAI_CHAT_MODEL": "no-such-chat-model"}, "check OPENAI_CHAT_MODEL"),
        ({"EMBEDDING_PROVIDER": "local", "OPENAI_API_KEY": ""}, "must be set when ANSWER_MODE=generative"),
    ],
    ids=["bad-key", "unknown-embedding-model", "unknown-chat-model", "generative-without-key"],
)
def test_bad_key_or_model_stops_startup_with_one_line(
    fake_openai: FakeOpenAIServer, tmp_path: Path, override: dict[str, str], expected: str
) -> None:
    result = run_main({**openai_env(fake_openai, tmp_path / "cache"), **override}, tmp_path)
    assert result.returncode == 2, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(("Start-up failed:", "Invalid configuration:")), lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


# --- questions -----------------------------------------------------------------------------------------------


def test_question_embeddings_are_cached_per_model(client: httpx.Client, fake: FakeOpenAIServer) -> None:
    question = unique_question()
    for _ in range(3):
        assert client.post("/ask", json={"question": question}).status_code == 200
    assert fake.stats()["embedding_batches"] == [1], "one request; the repeats came from the cache"
    keys = {cache_key(model, question) for model in ("openai:text-embedding-3-small", "openai:other", "local-model")}
    assert len(keys) == 3, "the cache key includes the model, so models never share vectors"


def test_rate_limit_is_retried_after_retry_after(client: httpx.Client, fake: FakeOpenAIServer) -> None:
    fake.fault("embeddings", "429", count=1, retry_after=1)
    started = time.monotonic()
    response = client.post("/ask", json={"question": unique_question()})
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert fake.requests("embeddings") == 2
    assert elapsed >= 1.0, "the SDK waits for Retry-After before the retry"


@pytest.mark.parametrize(
    ("kind", "attempts"),
    [("500", MAX_ATTEMPTS), ("hang", MAX_ATTEMPTS), ("malformed", 1), ("401", 1)],
    ids=["server-error", "hang-past-timeout", "malformed-json", "key-revoked"],
)
def test_embedding_failure_gives_503_then_recovers(
    client: httpx.Client, fake: FakeOpenAIServer, kind: str, attempts: int
) -> None:
    fake.fault("embeddings", kind, hang_seconds=10)
    question = unique_question()
    started = time.monotonic()
    response = client.post("/ask", json={"question": question})
    elapsed = time.monotonic() - started
    assert response.status_code == 503, response.text
    body = response.json()
    expected = {"detail": body["detail"], "type": "service_unavailable", "code": 503, "reason": "agent_unavailable"}
    assert body == expected, body
    assert response.headers["retry-after"] == "5"
    assert fake.requests("embeddings") == attempts, "retried exactly OPENAI_MAX_RETRIES times when retryable"
    assert elapsed < 15
    fake.reset()
    assert client.post("/ask", json={"question": question}).status_code == 200, "the failure was not cached"
