"""Every error leaves the service as `{"detail", "type", "code"}`: a precise 4xx, or a 500 without internals."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from agents.agent import AgentUnavailableError
from agents.validation import InvalidQuestionError
from infrastructure.rate_limit import RateLimitExceededError
from services.sessions import SessionStoreUnavailableError

logger = structlog.get_logger(__name__)

_STATUS_TYPES: dict[int, tuple[str, str]] = {
    400: ("bad_request", "bad_request"),
    401: ("authentication_error", "unauthorized"),
    403: ("permission_error", "forbidden"),
    404: ("not_found", "not_found"),
    405: ("method_not_allowed", "method_not_allowed"),
    408: ("timeout", "request_timeout"),
    413: ("payload_too_large", "payload_too_large"),
    415: ("unsupported_media_type", "unsupported_media_type"),
    422: ("validation_error", "invalid_request"),
    429: ("rate_limit_exceeded", "rate_limited"),
    503: ("service_unavailable", "service_unavailable"),
}


def error_body(status: int, detail: str, code: str | None = None) -> dict[str, Any]:
    """The project's error format."""
    error_type, default_code = _STATUS_TYPES.get(status, ("internal_error", "internal_error"))
    return {"detail": detail, "type": error_type, "code": code or default_code}


def error_response(
    status: int, detail: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A JSON error response in the project's format."""
    return JSONResponse(error_body(status, detail, code), status_code=status, headers=headers)


def _describe_validation(error: RequestValidationError) -> tuple[str, str]:
    first = error.errors()[0]
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
    return (f"{field}: {message}" if field else message), "invalid_request"


async def _validation_handler(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    detail, code = _describe_validation(error)
    return error_response(422, detail, code)


async def _invalid_question_handler(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, InvalidQuestionError)
    return error_response(422, error.detail, error.code)


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
        return error_response(422, "Request body is not valid JSON (it must be UTF-8)", "invalid_json")
    return error_response(error.status_code, detail, headers=headers)


_HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route fully matches on the request's path (asked of the router, method by method)."""
    allowed = []
    for method in _HTTP_METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


async def _unavailable_handler(request: Request, error: Exception) -> JSONResponse:
    return error_response(503, str(error), "agent_unavailable", headers={"Retry-After": "5"})


async def _session_store_handler(request: Request, error: Exception) -> JSONResponse:
    return error_response(503, str(error), "session_store_unavailable", headers={"Retry-After": "5"})


async def _rate_limited_handler(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RateLimitExceededError)
    decision = error.decision
    headers = {**decision.headers(), "Retry-After": str(decision.retry_after_seconds)}
    return error_response(429, error.detail, "rate_limited", headers=headers)


async def _unexpected_handler(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled_error", path=request.url.path)
    return error_response(500, "Internal server error", "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on `app`."""
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(InvalidQuestionError, _invalid_question_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(AgentUnavailableError, _unavailable_handler)
    app.add_exception_handler(SessionStoreUnavailableError, _session_store_handler)
    app.add_exception_handler(RateLimitExceededError, _rate_limited_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
