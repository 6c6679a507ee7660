"""What the embedding and chat clients share about OpenAI-compatible APIs: start-up checks and failure names."""

from __future__ import annotations

import json


class ProviderCheckError(RuntimeError):
    """A start-up check against the remote API failed (bad key, unknown model, unreachable server)."""


def where(base_url: str | None) -> str:
    """The server named in messages: the configured base URL, or the OpenAI default."""
    return base_url or "https://api.openai.com/v1"


def failure_reason(error: BaseException) -> str:
    """A short, stable name for why a request to the API failed (used in `error` fields and logs)."""
    import openai  # imported here: the local provider never needs the SDK

    if isinstance(error, openai.APITimeoutError | TimeoutError):
        return "timeout"
    if isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError):
        return "unauthorized"
    if isinstance(error, openai.NotFoundError):
        return "model_not_found"
    if isinstance(error, openai.RateLimitError):
        return "rate_limited"
    if isinstance(error, openai.InternalServerError):
        return "server_error"
    if isinstance(error, openai.APIStatusError):
        return f"http_{error.status_code}"
    if isinstance(error, openai.APIConnectionError):
        return "connection_error"
    if isinstance(error, json.JSONDecodeError | openai.APIResponseValidationError | ValueError | KeyError | TypeError):
        return "malformed_response"
    return "api_error"


def check_failure_message(error: BaseException, what: str, setting: str, base_url: str | None) -> str:
    """One line explaining why a start-up check of `what` failed, naming the setting to fix."""
    reason = failure_reason(error)
    if reason == "unauthorized":
        return f"{where(base_url)} rejected OPENAI_API_KEY (HTTP {_status(error)}) while checking {what}"
    if reason == "model_not_found":
        return f"{what} is not known to {where(base_url)} (HTTP 404); check {setting}"
    return f"could not check {what} at {where(base_url)}: {reason}"


def _status(error: BaseException) -> int | str:
    import openai

    return error.status_code if isinstance(error, openai.APIStatusError) else "?"
