"""The OpenAI-compatible API: `GET /v1/models` and `POST /v1/chat/completions`, plain or streamed.

Answered by the same agent as `/ask`. The API is stateless: the last user message is the question and the
user message before it gives follow-ups their context, as a session's previous turn would. Errors take
OpenAI's shape (middleware/errors.py), so OpenAI's SDKs raise their usual exceptions. Sources, confidence and
the answer id travel in the extra top-level field `defi_qa`, which standard clients ignore.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, ConfigDict

from agents.agent import AgentResult, Question, new_answer_id
from agents.events import CompleteEvent, ErrorEvent, MetadataEvent, StreamEvent, WordEvent
from agents.validation import InvalidQuestionError, clean_question
from api.deps import AgentDep, ApiKey, EmbeddingsDep, QuestionBudget, SettingsDep
from config import Settings
from infrastructure.error_format import openai_error_body
from middleware.errors import ApiError
from services.embeddings import EmbeddingService

router = APIRouter(tags=["openai"])

MODEL = "defi-qa"
GENERATIVE_MODEL = "defi-qa-generative"
_OWNER = "defi-qa-bot"
_CREATED = int(time.time())  # a model's `created`: when this process started serving it
_ROLES = ("system", "developer", "user", "assistant")
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request (errors on /v1/* take OpenAI's shape)"},
    401: {"description": "API_KEYS is set and no valid key was presented"},
    404: {"description": "Unknown model"},
    413: {"description": "Body too large"},
    429: {"description": "Question budget spent (see Retry-After)"},
    503: {"description": "Embedding model unavailable"},
}


# --- the request ---------------------------------------------------------------------------------------------


class ContentPart(BaseModel):
    """One part of a message's content; only `text` parts are read."""

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message of the conversation (other fields, such as `name`, are ignored)."""

    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    """`stream_options`: whether a stream ends with a `usage` chunk."""

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The Chat Completions request; parameters not named here (temperature, max_tokens, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    function_call: Any = None


def served_models(settings: Settings) -> list[str]:
    """The model ids this server answers to: `defi-qa`, and `defi-qa-generative` when a chat model writes answers."""
    return [MODEL, GENERATIVE_MODEL] if settings.answer_mode == "generative" else [MODEL]


def _check_request(body: ChatCompletionRequest, settings: Settings) -> None:
    """Refuse what this model cannot honour with a 400 naming the parameter (unknown ones are ignored)."""
    if body.model not in served_models(settings):
        raise ApiError(
            404,
            f"The model {body.model[:100]!r} does not exist; GET /v1/models lists the models served here",
            "model_not_found",
            "model",
        )
    if body.n is not None and body.n != 1:
        raise ApiError(400, "n must be 1: one answer is given per question", "unsupported_parameter", "n")
    for name in ("tools", "functions"):
        if getattr(body, name):
            raise ApiError(
                400,
                f"{name} are not supported: this model answers from its knowledge base and calls no tools",
                "unsupported_parameter",
                name,
            )
    for name in ("tool_choice", "function_call"):
        if getattr(body, name) not in (None, "none"):
            raise ApiError(400, f"{name} is not supported: this model calls no tools", "unsupported_parameter", name)


def _text(message: ChatMessage, index: int) -> str:
    """A message's text: its string content, or its `text` parts joined by spaces."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise ApiError(
                400,
                f"messages[{index}] has a {part.type[:40]!r} content part: only text is supported",
                "unsupported_content",
                f"messages[{index}].content",
            )
        texts.append(part.text)
    return " ".join(texts)


def conversation(body: ChatCompletionRequest) -> tuple[str, str | None]:
    """The question (the last user message) and the user message before it, if any."""
    if not body.messages:
        raise ApiError(400, "messages must not be empty", "messages_empty", "messages")
    for index, message in enumerate(body.messages):
        if message.role in ("tool", "function"):
            raise ApiError(
                400,
                f"messages[{index}] has role {message.role!r}: this model calls no tools",
                "unsupported_role",
                f"messages[{index}].role",
            )
        if message.role not in _ROLES:
            raise ApiError(
                400,
                f"messages[{index}] has role {message.role[:40]!r}; roles are {', '.join(_ROLES)}",
                "invalid_role",
                f"messages[{index}].role",
            )
    users = [(index, message) for index, message in enumerate(body.messages) if message.role == "user"]
    if not users:
        raise ApiError(
            400, "messages must include a user message: the last one is the question", "no_user_message", "messages"
        )
    question = _text(users[-1][1], users[-1][0])
    previous = _text(users[-2][1], users[-2][0]) if len(users) > 1 else None
    return question, previous


def _context(previous: str | None, max_chars: int) -> str | None:
    """The previous user message as follow-up context, when it would be a valid question itself (else none)."""
    if previous is None:
        return None
    try:
        return clean_question(previous, max_chars)
    except InvalidQuestionError:
        return None


def prompt_tokens(body: ChatCompletionRequest, embeddings: EmbeddingService) -> int:
    """The tokens of every message's text, as the service's tokenizer counts them."""
    total = 0
    for message in body.messages:
        if isinstance(message.content, str):
            total += embeddings.count_tokens(message.content)
        elif message.content is not None:
            total += sum(embeddings.count_tokens(part.text) for part in message.content if part.text)
    return total


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# Each question is accepted in a dependency, before a stream opens: bad input is an error response, not a stream.


async def _chat_question(body: ChatCompletionRequest, agent: AgentDep, settings: SettingsDep) -> Question:
    _check_request(body, settings)
    text, previous = conversation(body)
    return await agent.accept(text, transport="openai", previous=_context(previous, settings.question_max_chars))


async def _agent_events(
    body: ChatCompletionRequest,
    agent: AgentDep,
    question: Question = Depends(_chat_question),  # noqa: B008
) -> AsyncIterator[AsyncGenerator[StreamEvent, None] | None]:
    """The agent's stream for `stream: true` (None otherwise), closed on the request's exit stack as in
    api/routes/stream.py: at once when the client is gone, or after the last event."""
    if not body.stream:
        yield None
        return
    events = agent.stream(question)
    try:
        yield events
    finally:
        await events.aclose()


# --- the responses -------------------------------------------------------------------------------------------


def _extra(
    answer_id: str | None,
    kb_version: int | None,
    confidence: float,
    stage: str,
    sources: list[dict[str, Any]],
    unknown_terms: list[str],
    error: str | None,
) -> dict[str, Any]:
    """The `defi_qa` field: what `/ask` returns beside the answer."""
    return {
        "answer_id": answer_id,
        "kb_version": kb_version,
        "confidence": confidence,
        "processing_stage": stage,
        "sources": sources,
        "unknown_terms": unknown_terms,
        "error": error,
    }


def _completion(model: str, result: AgentResult, prompt: int, embeddings: EmbeddingService) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{result.answer_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.answer, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(prompt, embeddings.count_tokens(result.answer)),
        "defi_qa": _extra(
            result.answer_id,
            result.kb_version,
            result.confidence,
            result.processing_stage,
            [source.to_wire() for source in result.sources],
            list(result.unknown_terms),
            result.error,
        ),
    }


def _sse(payload: dict[str, Any] | str) -> bytes:
    return format_sse_event(data_str=payload if isinstance(payload, str) else json.dumps(payload))


async def _chunks(
    first: StreamEvent,
    events: AsyncGenerator[StreamEvent, None],
    model: str,
    prompt: int,
    include_usage: bool,
    embeddings: EmbeddingService,
) -> AsyncIterator[bytes]:
    """`chat.completion.chunk` events: the role, whole words (with the space before each but the first), a
    chunk with `finish_reason` and `defi_qa`, the usage chunk when asked for, then `[DONE]`."""
    created = int(time.time())
    base = {"id": f"chatcmpl-{new_answer_id()}", "object": "chat.completion.chunk", "created": created, "model": model}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        usage: dict[str, Any] = {"usage": None} if include_usage else {}
        return _sse({**base, "choices": [choice], **usage, **extra})

    yield chunk({"role": "assistant"})
    pieces: list[str] = []
    metadata: MetadataEvent | None = None
    complete: CompleteEvent | None = None

    async def all_events() -> AsyncIterator[StreamEvent]:
        yield first
        async for event in events:
            yield event

    async for event in all_events():
        if isinstance(event, MetadataEvent):
            metadata = event
        elif isinstance(event, WordEvent) and not event.reference:
            pieces.append(event.content if not pieces else " " + event.content)
            yield chunk({"content": pieces[-1]})
        elif isinstance(event, CompleteEvent):
            complete = event
        elif isinstance(event, ErrorEvent):  # the status is sent already: OpenAI's SDKs raise on an `error` event
            yield _sse(openai_error_body(event.code, event.message, event.reason))
            return
    extra = _extra(
        complete.answer_id if complete else None,
        complete.kb_version if complete else None,
        complete.final_confidence if complete else 0.0,
        complete.processing_stage if complete else "cancelled",
        [source.to_wire() for source in metadata.sources] if metadata else [],
        list(metadata.unknown_terms) if metadata else [],
        complete.error if complete else None,
    )
    yield chunk({}, "stop", defi_qa=extra)
    if include_usage:
        usage = _usage(prompt, embeddings.count_tokens("".join(pieces)))
        yield _sse({**base, "choices": [], "usage": usage})
    yield _sse("[DONE]")


# --- the routes ----------------------------------------------------------------------------------------------


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": _CREATED, "owned_by": _OWNER}


@router.get("/v1/models", dependencies=[ApiKey], responses={401: _ERRORS[401]})
async def list_models(settings: SettingsDep) -> dict[str, Any]:
    """The models served here, as OpenAI lists them."""
    return {"object": "list", "data": [_model(model_id) for model_id in served_models(settings)]}


@router.get("/v1/models/{model_id}", dependencies=[ApiKey], responses={401: _ERRORS[401], 404: _ERRORS[404]})
async def get_model(model_id: str, settings: SettingsDep) -> dict[str, Any]:
    """One model served here; 404 `model_not_found` for any other id."""
    if model_id not in served_models(settings):
        raise ApiError(404, f"The model {model_id[:100]!r} does not exist", "model_not_found", "model")
    return _model(model_id)


@router.post("/v1/chat/completions", dependencies=[ApiKey, QuestionBudget], responses=_ERRORS)
async def chat_completions(
    body: ChatCompletionRequest,
    agent: AgentDep,
    embeddings: EmbeddingsDep,
    question: Question = Depends(_chat_question),  # noqa: B008
    events: AsyncGenerator[StreamEvent, None] | None = Depends(_agent_events),  # noqa: B008
) -> Response:
    """Answer the conversation's last user message: a `chat.completion`, or `chat.completion.chunk` events."""
    prompt = prompt_tokens(body, embeddings)
    if events is None:
        return JSONResponse(_completion(body.model, await agent.answer(question), prompt, embeddings))
    # The first event comes once the question is embedded and searched: a failure there is still a real 503.
    first = await anext(events, None)
    if first is None or isinstance(first, ErrorEvent):
        code, message, reason = (first.code, first.message, first.reason) if first else (503, "No answer", "no_answer")
        raise ApiError(code, message, reason, headers={"Retry-After": "5"})
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return EventSourceResponse(
        _chunks(first, events, body.model, prompt, include_usage, embeddings), headers=_STREAM_HEADERS
    )
