"""A small, deterministic OpenAI-compatible server for the tests, with faults that can be switched on at run time.

It speaks the real wire format of `GET /v1/models`, `POST /v1/embeddings` and `POST /v1/chat/completions`
(plain JSON and `stream: true` Server-Sent Events ending with `data: [DONE]`), so the real `openai` SDK and
langchain-openai talk to it over HTTP exactly as they would to a remote API.

- Embeddings are deterministic hashed word and character-trigram vectors (fast; see `HashingEmbedder`).
- A chat completion is built from the knowledge-base entries in the prompt: the first sentence of the
  first two entries, each followed by its citation `[n]`. Streamed, it is cut into sub-word pieces with
  leading spaces (" imper", "man", "ent"), as real models stream tokens.
- A question-rewriting request (our rewrite prompt) is answered with "<follow-up> (context: <previous>)".

Admin endpoints (no key needed): `GET /_stats` (request counts, inputs per embeddings request, every chat
request's messages), `POST /_fault` with `{"target": "embeddings"|"chat"|"models"|"all", "kind": ..., "count":
n}` (n = how many matching requests fail; -1 = until cleared), `POST /_reset` (counts and faults).
Fault kinds: `401`, `404`, `429` (with `Retry-After`), `500`, `hang` (sleeps `hang_seconds`), `malformed`
(invalid JSON, or an invalid SSE chunk when streaming), `cut` (a stream closed midway), `empty` (a
completion with no content).

Run it alone with `python -m tests.fake_openai --port 8900 --api-key test-key`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import threading
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

EMBEDDING_MODELS = ("text-embedding-3-small", "text-embedding-fake")
CHAT_MODELS = ("gpt-4o-mini", "fake-chat")
PASSAGE_HEADER = "Knowledge base entries"
REWRITE_MARKER = "stand-alone"
FAULT_KINDS = ("401", "404", "429", "500", "hang", "malformed", "cut", "empty")


@dataclass
class Fault:
    """A fault applied to the next `count` matching requests (-1: until cleared)."""

    target: str
    kind: str
    count: int = -1
    retry_after: float = 1.0
    hang_seconds: float = 30.0


@dataclass
class FakeState:
    """Request counts, the chat requests received, and the active faults."""

    api_key: str
    requests: dict[str, int] = field(default_factory=dict)
    embedding_batches: list[int] = field(default_factory=list)
    chat_requests: list[dict[str, Any]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)

    def count(self, endpoint: str) -> None:
        """Count one request to `endpoint` (faulty ones included)."""
        self.requests[endpoint] = self.requests.get(endpoint, 0) + 1

    def take_fault(self, endpoint: str) -> Fault | None:
        """The fault for this request, if any (consumes one use of a counted fault)."""
        for fault in self.faults:
            if fault.target in (endpoint, "all"):
                if fault.count > 0:
                    fault.count -= 1
                    if fault.count == 0:
                        self.faults.remove(fault)
                return fault
        return None

    def reset(self) -> None:
        """Forget counts, recorded requests and faults."""
        self.requests.clear()
        self.embedding_batches.clear()
        self.chat_requests.clear()
        self.faults.clear()


class HashingEmbedder:
    """Deterministic lexical vectors: words and character trigrams hashed (CRC32, signed) into 384 dimensions.

    Fast at any load (the dataset's 3,800 texts take well under a second), unlike a neural model. Texts that
    share words land close together, unrelated ones far apart, which is all the tests rely on: they ask
    exact or near-exact phrasings of entries, and off-topic questions that share no content words.
    """

    dimension = 384

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One L2-normalised vector per text."""
        result = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            words = re.findall(r"[a-z0-9]+", text.lower())
            features = [f"w:{word}" for word in words]
            for word in words:
                padded = f" {word} "
                features.extend(f"c:{padded[index : index + 3]}" for index in range(len(padded) - 2))
            for feature in features:
                digest = zlib.crc32(feature.encode())
                result[row, digest % self.dimension] += 1.0 if digest & 0x80000000 else -1.0
        norms = np.linalg.norm(result, axis=1, keepdims=True)
        normalized: np.ndarray = result / np.clip(norms, 1e-12, None)
        return normalized


def _error(status: int, message: str, kind: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def split_into_tokens(text: str) -> list[str]:
    """Cut text into sub-word pieces of at most 4 characters, each word's first piece with its leading space."""
    tokens: list[str] = []
    for index, word in enumerate(text.split(" ")):
        pieces = [word[start : start + 4] for start in range(0, len(word), 4)] or [""]
        pieces[0] = (" " if index else "") + pieces[0]
        tokens.extend(piece for piece in pieces if piece)
    return tokens


def _first_sentence(text: str) -> str:
    match = re.match(r"(.+?[.!?])(\s|$)", text.strip(), flags=re.DOTALL)
    return " ".join((match.group(1) if match else text.strip()).split())


def compose_reply(messages: list[dict[str, Any]]) -> str:
    """The deterministic completion for a chat request."""
    system = [str(message.get("content", "")) for message in messages if message.get("role") == "system"]
    user = [str(message.get("content", "")) for message in messages if message.get("role") == "user"]
    if system and REWRITE_MARKER in system[0]:
        text = user[-1] if user else ""
        previous = re.search(r"Previous question: (.*)", text)
        follow_up = re.search(r"Follow-up question: (.*)", text)
        if previous and follow_up:
            return f"{follow_up.group(1).strip()} (context: {previous.group(1).strip()})"
        return text
    passages = next((text for text in system if text.startswith(PASSAGE_HEADER)), "")
    answers = re.findall(r"^\[(\d+)\] .*\nAnswer: (.*)$", passages, flags=re.MULTILINE)
    if not answers:
        return "I can only answer questions about decentralized finance from the knowledge base."
    return " ".join(f"{_first_sentence(answer)} [{number}]" for number, answer in answers[:2])


def create_fake_app(state: FakeState, embedder: HashingEmbedder) -> Starlette:
    """The Starlette app serving the fake API over `state`."""

    def authorized(request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {state.api_key}"

    async def fault_response(fault: Fault) -> Response | None:
        if fault.kind == "401":
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        if fault.kind == "404":
            return _error(404, "The model does not exist.", "invalid_request_error", "model_not_found")
        if fault.kind == "429":
            headers = {"retry-after": f"{fault.retry_after:g}"}
            return _error(429, "Rate limit reached.", "requests", "rate_limit_exceeded", headers)
        if fault.kind == "500":
            return _error(500, "The server had an error.", "server_error", "internal_error")
        if fault.kind == "hang":
            await asyncio.sleep(fault.hang_seconds)
            return _error(500, "Hung too long.", "server_error", "internal_error")
        if fault.kind == "malformed":
            return Response('{"object": "list", "data": [', media_type="application/json")
        return None

    async def models(request: Request) -> Response:
        state.count("models")
        if not authorized(request):
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        if (fault := state.take_fault("models")) is not None and (response := await fault_response(fault)):
            return response
        data = [
            {"id": name, "object": "model", "created": 1700000000, "owned_by": "fake"}
            for name in EMBEDDING_MODELS + CHAT_MODELS
        ]
        return JSONResponse({"object": "list", "data": data})

    async def embeddings(request: Request) -> Response:
        state.count("embeddings")
        if not authorized(request):
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        body = await request.json()
        if body.get("model") not in EMBEDDING_MODELS:
            message = f"The model `{body.get('model')}` does not exist or you do not have access to it."
            return _error(404, message, "invalid_request_error", "model_not_found")
        fault = state.take_fault("embeddings")
        if fault is not None and (response := await fault_response(fault)) is not None:
            return response
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        state.embedding_batches.append(len(texts))
        vectors = embedder.embed([str(text) for text in texts])
        data = [
            {"object": "embedding", "index": index, "embedding": [round(float(value), 7) for value in vector]}
            for index, vector in enumerate(vectors)
        ]
        usage = {"prompt_tokens": sum(len(str(text).split()) for text in texts), "total_tokens": 0}
        return JSONResponse({"object": "list", "data": data, "model": body["model"], "usage": usage})

    async def chat(request: Request) -> Response:
        state.count("chat")
        if not authorized(request):
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        body = await request.json()
        state.chat_requests.append(body)
        if body.get("model") not in CHAT_MODELS:
            return _error(
                404, f"The model `{body.get('model')}` does not exist.", "invalid_request_error", "model_not_found"
            )
        fault = state.take_fault("chat")
        if fault is not None and fault.kind == "malformed" and body.get("stream"):
            return StreamingResponse(_malformed_stream(), media_type="text/event-stream")
        if fault is not None and (response := await fault_response(fault)) is not None:
            return response
        reply = "" if fault is not None and fault.kind == "empty" else compose_reply(body.get("messages", []))
        created = int(time.time())
        if body.get("stream"):
            cut = fault is not None and fault.kind == "cut"
            return StreamingResponse(
                _stream_chunks(body["model"], reply, created, cut=cut),
                media_type="text/event-stream",
            )
        if fault is not None and fault.kind == "cut":
            return Response('{"id": "chatcmpl-fake", "choices": [{"mess', media_type="application/json")
        message = {"role": "assistant", "content": reply}
        return JSONResponse(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": created,
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 1, "completion_tokens": len(reply.split()), "total_tokens": 1},
            }
        )

    async def _stream_chunks(model: str, reply: str, created: int, *, cut: bool) -> AsyncIterator[str]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            payload = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
            return f"data: {json.dumps(payload)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        tokens = split_into_tokens(reply)
        for number, token in enumerate(tokens):
            if cut and number >= len(tokens) // 2:
                raise ConnectionAbortedError("fake stream cut midway")
            yield chunk({"content": token})
            await asyncio.sleep(0)
        yield chunk({}, "stop")
        yield "data: [DONE]\n\n"

    async def _malformed_stream() -> AsyncIterator[str]:
        yield 'data: {"id": "chatcmpl-fake", "choices": [{"delta": {"content": "Imp\n\n'
        yield "data: [DONE]\n\n"

    async def stats(_: Request) -> Response:
        return JSONResponse(
            {
                "requests": state.requests,
                "embedding_batches": state.embedding_batches,
                "chat_requests": state.chat_requests,
                "faults": [fault.__dict__ for fault in state.faults],
            }
        )

    async def set_fault(request: Request) -> Response:
        body = await request.json()
        if body.get("kind") not in FAULT_KINDS:
            return JSONResponse({"error": f"kind must be one of {FAULT_KINDS}"}, status_code=400)
        state.faults.insert(0, Fault(**body))
        return JSONResponse({"ok": True})

    async def reset(_: Request) -> Response:
        state.reset()
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/_stats", stats, methods=["GET"]),
            Route("/_fault", set_fault, methods=["POST"]),
            Route("/_reset", reset, methods=["POST"]),
        ]
    )


class FakeOpenAIServer:
    """The fake API served by uvicorn on a background thread, on 127.0.0.1 and a free port."""

    def __init__(self, api_key: str = "test-key", port: int = 0) -> None:
        self.state = FakeState(api_key=api_key)
        self.embedder = HashingEmbedder()
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_fake_app(self.state, self.embedder),
            host="127.0.0.1",
            port=self.port,
            log_level="critical",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fake-openai", daemon=True)

    @property
    def base_url(self) -> str:
        """What OPENAI_BASE_URL should be set to."""
        return f"{self.url}/v1"

    def start(self) -> FakeOpenAIServer:
        """Start serving and wait until the socket accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake OpenAI server did not start")
            time.sleep(0.02)
        return self

    def stats(self) -> dict[str, Any]:
        """`GET /_stats`: request counts, embedding batch sizes, chat requests received."""
        response = httpx.get(f"{self.url}/_stats", timeout=10)
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    def requests(self, endpoint: str) -> int:
        """How many requests `endpoint` (`embeddings`, `chat`, `models`) received since the last reset."""
        return int(self.stats()["requests"].get(endpoint, 0))

    def fault(self, target: str, kind: str, count: int = -1, **options: float) -> None:
        """`POST /_fault`: fail the next `count` requests to `target` with `kind` (-1: until reset)."""
        body = {"target": target, "kind": kind, "count": count, **options}
        httpx.post(f"{self.url}/_fault", json=body, timeout=10).raise_for_status()

    def reset(self) -> None:
        """`POST /_reset`: clear counts, recorded requests and faults."""
        httpx.post(f"{self.url}/_reset", timeout=10).raise_for_status()

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for the thread."""
        self._server.should_exit = True
        self._thread.join(timeout=10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    """Serve the fake API in the foreground."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--api-key", default="test-key")
    arguments = parser.parse_args()
    server = FakeOpenAIServer(api_key=arguments.api_key, port=arguments.port).start()
    print(f"fake OpenAI API on {server.base_url} (key {arguments.api_key!r})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
