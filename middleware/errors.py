"""Every error leaves as `{"detail", "type", "code", "reason"}`: a precise 4xx, or a 500 without internals.

Under `/v1/` (the OpenAI-compatible API) the same handlers answer in OpenAI's shape, `{"error": {"message",
"type", "param", "code"}}`, with invalid input as 400 (`infrastructure/error_format.error_for_path`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from agents.agent import AgentUnavailableError, SessionBusyError
from agents.validation import InvalidQuestionError
from infrastructure.error_format import error_body, error_for_path, openai_path
from infrastructure.rate_limit import RateLimitExceededError
from services.knowledge_admin import ChangeRefusedError
from services.sessions import SessionStoreUnavailableError

logger = structlog.get_logger(__name__)


class ApiError(Exception):
    """A refusal a route or dependency raises with its stable reason (and, for OpenAI clients, the parameter at
    fault); answered in the request's API format by the handler below."""

    def __init__(
        self,
        status: int,
        detail: str,
        reason: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.reason = reason
        self.param = param
        self.headers = headers


def internal_error_body() -> dict[str, Any]:
    """The 500 body: the project's format, nothing about the failure itself (that goes to the log)."""
    return error_body(500, "Internal server error", "internal_error")


def error_response(
    status: int, detail: str, reason: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A JSON error response in the project's format (`code` the status, `reason` the stable reason)."""
    return JSONResponse(error_body(status, detail, reason), status_code=status, headers=headers)


def error_response_for(
    request: Request,
    status: int,
    detail: str,
    reason: str | None = None,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> JSONResponse:
    """An error response in the format of the request's API: the project's, or OpenAI's under `/v1/`."""
    status, body = error_for_path(request.scope["path"], status, detail, reason, param)
    return JSONResponse(body, status_code=status, headers=headers)


def _openai_param(location: Sequence[Any]) -> str | None:
    """A pydantic error location as OpenAI names a parameter: `messages[0].role`."""
    param = ""
    for part in location:
        if part in ("body", "query", "path"):
            continue
        param += f"[{part}]" if isinstance(part, int) else f".{part}" if param else str(part)
    return param or None


# Fields whose bad values get their own reason (`rating_invalid`, `comment_too_long`, ...).
_FIELDS_WITH_REASONS = frozenset({"answer_id", "rating", "comment"})


def describe_validation(errors: Sequence[Any]) -> tuple[str, str]:
    """The sentence and stable reason for the first of pydantic's validation errors."""
    first = errors[0]
    kind = str(first.get("type", ""))
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    field = ".".join(location)
    if kind == "json_invalid":
        return "Request body is not valid JSON", "invalid_json"
    if kind == "missing":
        return (f"{field} is required" if field else "Request body is required"), "missing_field"
    if kind == "model_attributes_type" or (kind.endswith("_type") and not field):
        return 'Request body must be a JSON object such as {"question": "..."} sent as application/json', "invalid_body"
    if kind == "string_type":
        return f"{field} must be a string", f"{field}_not_string" if field == "question" else "invalid_type"
    message = str(first.get("msg", "invalid value"))
    if field in _FIELDS_WITH_REASONS:
        return f"{field}: {message}", f"{field}_too_long" if kind == "string_too_long" else f"{field}_invalid"
    return (f"{field}: {message}" if field else message), "invalid_request"


async def _validation_handler(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    errors = error.errors()
    detail, code = describe_validation(errors)
    return error_response_for(request, 422, detail, code, param=_openai_param(errors[0].get("loc", ())))


async def _invalid_question_handler(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, InvalidQuestionError)
    param = "messages" if openai_path(request.scope["path"]) else None  # a message's content is the question
    return error_response_for(request, 422, error.detail, error.code, param=param)


async def _http_handler(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    detail = error.detail if isinstance(error.detail, str) else "Request failed"
    if error.status_code == 404 and detail == "Not Found":
        detail = f"No route for {request.method} {request.url.path}"
    headers = getattr(error, "headers", None)
    if error.status_code == 405:
        # Starlette's Allow names only the first route on the path; GET and POST /ask-stream are two routes.
        headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        if detail == "Method Not Allowed":
            detail = f"Method {request.method} is not allowed on {request.url.path}"
    if error.status_code == 400 and detail == "There was an error parsing the body":
        # FastAPI's answer to a JSON body that is not UTF-8: it is invalid JSON, reported like any other.
        return error_response_for(request, 422, "Request body is not valid JSON (it must be UTF-8)", "invalid_json")
    return error_response_for(request, error.status_code, detail, headers=headers)


_HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route fully matches on the request's path (asked of the router, method by method)."""
    allowed = []
    for method in _HTTP_METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


async def _api_error_handler(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return error_response_for(request, error.status, error.detail, error.reason, error.headers, error.param)


async def _unavailable_handler(request: Request, error: Exception) -> JSONResponse:
    return error_response_for(request, 503, str(error), "agent_unavailable", headers={"Retry-After": "5"})


async def _session_store_handler(request: Request, error: Exception) -> JSONResponse:
    return error_response_for(request, 503, str(error), "session_store_unavailable", headers={"Retry-After": "5"})


async def _change_refused_handler(request: Request, error: Exception) -> JSONResponse:
    """A knowledge-base change that was not applied: the error format, plus `errors` or `eval` when there are."""
    assert isinstance(error, ChangeRefusedError)
    body = {**error_body(error.status, error.detail, error.reason), **error.extra}
    return JSONResponse(body, status_code=error.status)


async def _database_handler(request: Request, error: Exception) -> JSONResponse:
    logger.warning("database_error", path=request.url.path, error=type(error).__name__)
    detail = "The database cannot be reached; retry shortly"
    return error_response_for(request, 503, detail, "database_unavailable", headers={"Retry-After": "5"})


async def _session_busy_handler(request: Request, error: Exception) -> JSONResponse:
    return error_response_for(request, 409, str(error), "session_busy", headers={"Retry-After": "1"})


async def _rate_limited_handler(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RateLimitExceededError)
    decision = error.decision
    headers = {**decision.headers(), "Retry-After": str(decision.retry_after_seconds)}
    return error_response_for(request, 429, error.detail, "rate_limited", headers=headers)


async def _unexpected_handler(request: Request, error: Exception) -> JSONResponse:
    # Last resort, for a failure in the outer middlewares themselves: errors of the app proper are turned into
    # 500s by `UnhandledErrorMiddleware` (middleware/unhandled.py), inside the request-id and security headers.
    logger.exception("unhandled_error", path=request.url.path)
    return error_response_for(request, 500, "Internal server error", "internal_error")  # internal_error_body()


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on `app`."""
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(InvalidQuestionError, _invalid_question_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(AgentUnavailableError, _unavailable_handler)
    app.add_exception_handler(SessionStoreUnavailableError, _session_store_handler)
    app.add_exception_handler(SessionBusyError, _session_busy_handler)
    app.add_exception_handler(SQLAlchemyError, _database_handler)
    app.add_exception_handler(ChangeRefusedError, _change_refused_handler)
    app.add_exception_handler(RateLimitExceededError, _rate_limited_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
