"""Structured JSON logging (structlog) for our code and for uvicorn's own loggers."""

from __future__ import annotations

import hashlib
import logging
import logging.handlers
import re
import sys
from pathlib import Path
from typing import Any

import structlog
from structlog.types import EventDict, WrappedLogger

_question_max_chars = 80
# API keys, bearer tokens, and the dashboard's `?token=` query value.
_SECRET_PATTERN = re.compile(r"(sk-[A-Za-z0-9_-]{8,}|Bearer\s+[A-Za-z0-9._~+/=-]+|(?<=[?&]token=)[^&\s\"]+)")


def truncate_for_log(text: str) -> str:
    """Shorten user text for a log line (LOG_QUESTION_MAX_CHARS)."""
    if len(text) <= _question_max_chars:
        return text
    return text[:_question_max_chars] + "…"


def session_tag(session_id: str | None) -> str | None:
    """What log lines carry for a session: a short hash, never the id itself.

    A session id is a bearer capability (whoever has it can read the conversation); the tag still lets an
    operator follow one session through the logs (`session=<tag>`).
    """
    if session_id is None:
        return None
    return hashlib.sha256(session_id.encode("utf-8", errors="surrogatepass")).hexdigest()[:12]


def _redact_secrets(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    for key, value in event_dict.items():
        if isinstance(value, str) and _SECRET_PATTERN.search(value):
            event_dict[key] = _SECRET_PATTERN.sub("[redacted]", value)
    return event_dict


def configure_logging(
    level: str, console: bool, log_dir: str | None, question_max_chars: int, service: str = "defi-qa-bot"
) -> None:
    """Send every log record, ours and uvicorn's, through one JSON formatter."""
    global _question_max_chars
    _question_max_chars = question_max_chars
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_secrets,
    ]
    structlog.configure(
        # Level first: an event below LOG_LEVEL is dropped before any other processor runs.
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    )
    handlers: list[logging.Handler] = []
    if console:
        handlers.append(logging.StreamHandler(sys.stdout))
    if log_dir:
        directory = Path(log_dir)
        directory.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                directory / f"{service}.log", maxBytes=10 * 1024 * 1024, backupCount=5, encoding="utf-8"
            )
        )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    if not handlers:
        root.addHandler(logging.NullHandler())
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    for noisy in ("httpx", "httpcore", "httpx2", "httpcore2", "openai"):  # the openai SDK uses httpx2
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
