"""The documentation and the code do not drift apart.

- Every upper-case name the docs put in backticks, or set on a `NAME=` line, is a field of `config.Settings`,
  a constant the code defines (named as such), or one of the explicit non-settings below.
- Every endpoint docs/api.md names (`GET /x`, `POST /y`, `WS /ws/…`, a bare `/ws/…`) is a route of the app,
  built by `main.create_app` without serving it, for that method.
- Every field each streamed event carries is named in docs/api.md's event table (the SSE `error` event's
  `code` and `reason` included).
- Markdown tables are not broken by a blank line (a row after one would render as a paragraph).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from fastapi import FastAPI
from starlette.routing import Match

from agents.events import CompleteEvent, ErrorEvent, MetadataEvent, StreamEvent, WordEvent
from config import Settings
from services.sources import Source
from tests.conftest import ROOT

DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md", ROOT / "environment_template.txt"]
SETTINGS = {name.upper() for name in Settings.model_fields}
CODE_DIRS = ("agents", "api", "services", "infrastructure", "middleware", "scripts")

# Upper-case words the docs use that are not this service's settings, each for a stated reason.
NOT_SETTINGS = {
    # Environment variables read by libraries or the image, not by config.Settings
    "HF_HUB_OFFLINE",  # Hugging Face libraries: no downloads (set in the image)
    "OPENBLAS_NUM_THREADS",  # NumPy's BLAS thread count (set in the image)
    "PYTHONMALLOC",  # the interpreter's allocator (docs/performance.md: memory after a burst)
    "PROMETHEUS_MULTIPROC_DIR",  # prometheus-client's multiprocess directory (main.run sets it for WORKERS>1)
    "GRAFANA_ADMIN_PASSWORD",  # docker-compose.yml: Grafana's admin password, passed through from the shell
    # Shell variables of the README's curl examples
    "SID",
    # HTTP methods
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "OPTIONS",
    # Redis commands
    "EXISTS",
    "EXPIRE",
    "MULTI",
    "PING",
    "RPUSH",
    "LTRIM",
    "TIME",
    # Dockerfile instructions
    "CMD",
    "EXPOSE",
    "HEALTHCHECK",
    "USER",
    # Log levels (the values of LOG_LEVEL)
    "DEBUG",
    "INFO",
    "WARNING",
    "ERROR",
    "CRITICAL",
    # Signals
    "SIGTERM",
    "SIGSTOP",
    "SIGKILL",
}

_BACKTICKED = re.compile(r"`([A-Z][A-Z0-9_]*[A-Z0-9])(?:=[^`]*)?`")
_ASSIGNED = re.compile(r"(?m)^\s*(?:export\s+|-e\s+)?([A-Z][A-Z0-9_]*[A-Z0-9])=")
_OPTION = re.compile(r"\s-e\s+([A-Z][A-Z0-9_]*[A-Z0-9])=")
_METHOD = r"(?:GET|POST|DELETE|HEAD|PUT|PATCH|WS)"
_ENDPOINT = re.compile(rf"((?:{_METHOD}`?/`?)*)({_METHOD})\s+(/(?:\{{[^}}]*\}}|[^\s`,;)|?…{{])*)")
_BARE_WEBSOCKET = re.compile(r"`(/ws/[A-Za-z0-9_/-]*)`")


def named_in_docs() -> dict[str, set[str]]:
    """Upper-case names -> the documents that name them (backticked, `NAME=` lines, `-e NAME=`)."""
    names: dict[str, set[str]] = {}
    for path in DOCS:
        text = path.read_text()
        for pattern in (_BACKTICKED, _ASSIGNED, _OPTION):
            for match in pattern.finditer(text):
                names.setdefault(match.group(1), set()).add(path.name)
    return names


def code_constants() -> set[str]:
    """Upper-case names the project's code assigns at module or class level (constants, prompts, limits)."""
    found: set[str] = set()
    files = [ROOT / "main.py", ROOT / "bootstrap.py", ROOT / "config.py"]
    files += [path for folder in CODE_DIRS for path in (ROOT / folder).rglob("*.py")]
    for path in files:
        found.update(re.findall(r"(?m)^(?:    )?([A-Z][A-Z0-9_]*[A-Z0-9])\s*(?::[^=\n]*)?=", path.read_text()))
    return found


def test_every_variable_the_docs_name_is_a_setting() -> None:
    names = named_in_docs()
    constants = code_constants()
    unknown = {
        name: sorted(where)
        for name, where in names.items()
        if name not in SETTINGS and name not in NOT_SETTINGS and name not in constants
    }
    assert not unknown, f"named in the docs but not a setting (config.Settings) or a known non-setting: {unknown}"
    assert "FORWARDED_ALLOW_IPS" not in names  # uvicorn's, not ours: the app reads TRUSTED_PROXIES only


def test_template_and_configuration_doc_list_every_setting() -> None:
    documented = {name for name, where in named_in_docs().items() if "configuration.md" in where}
    assert documented >= SETTINGS, sorted(SETTINGS - documented)


def test_the_check_sees_a_made_up_variable() -> None:
    """The extraction itself: a made-up name in backticks or on a NAME= line would be reported."""
    assert _BACKTICKED.findall("set `MADE_UP_SETTING=1` or `PORT`") == ["MADE_UP_SETTING", "PORT"]
    assert _ASSIGNED.findall("FOO_BAR=1\n  export BAZ_QUX=2\n") == ["FOO_BAR", "BAZ_QUX"]
    assert "MADE_UP_SETTING" not in SETTINGS | NOT_SETTINGS | code_constants()


# --- endpoints ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app() -> FastAPI:
    """The app as `python main.py` builds it, not started (no lifespan, no services)."""
    from main import create_app

    return create_app(Settings(_env_file=None, environment="test", log_dir=""))  # type: ignore[call-arg]


def expand_braces(path: str) -> list[str]:
    """`/static/{chat,dashboard}.{js,css}` -> the four paths; `{session_id}` (a parameter) stays as it is."""
    parts = re.split(r"(\{[^}]*,[^}]*\})", path)
    options = [part[1:-1].split(",") if part.startswith("{") and "," in part else [part] for part in parts]
    return ["".join(choice) for choice in itertools.product(*options)]


def documented_endpoints() -> set[tuple[str, str]]:
    """(method, path) pairs docs/api.md names; `WS` for WebSocket routes."""
    text = (ROOT / "docs" / "api.md").read_text()
    found: set[tuple[str, str]] = set()
    for match in _ENDPOINT.finditer(text):
        methods = [*re.findall(_METHOD, match.group(1)), match.group(2)]
        for method, path in itertools.product(methods, expand_braces(match.group(3).rstrip("."))):
            found.add((method, path))
    found.update(("WS", path) for path in _BARE_WEBSOCKET.findall(text))
    return found


def route_match(app: FastAPI, method: str, path: str) -> Match:
    """How well the app's routes match `method path` (FULL: route and method; PARTIAL: the path only)."""
    kind = "websocket" if method == "WS" else "http"
    scope: dict[str, object] = {"type": kind, "path": path, "root_path": "", "headers": [], "query_string": b""}
    scope["method"] = "GET" if kind == "websocket" else method
    return max((route.matches(scope)[0] for route in app.routes), key=lambda match: match.value)


def test_every_endpoint_in_api_md_is_a_route(app: FastAPI) -> None:
    endpoints = documented_endpoints()
    assert {("POST", "/ask"), ("WS", "/ws/ask"), ("HEAD", "/health"), ("GET", "/static/chat.js")} <= endpoints
    missing = sorted((method, path) for method, path in endpoints if route_match(app, method, path) is not Match.FULL)
    assert not missing, f"docs/api.md names endpoints the app does not serve: {missing}"


def test_the_route_check_can_fail(app: FastAPI) -> None:
    assert route_match(app, "POST", "/health") is Match.PARTIAL  # the path exists, not for POST
    assert route_match(app, "GET", "/v3/ask") is Match.NONE
    assert route_match(app, "WS", "/ws/chat") is Match.NONE


# --- streamed events ---------------------------------------------------------------------------------------------


def event_rows() -> dict[str, str]:
    """docs/api.md's `| Event | Fields |` table: event type -> its row."""
    lines = (ROOT / "docs" / "api.md").read_text().splitlines()
    start = lines.index("| Event | Fields |")
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        name = re.match(r"\| `([a-z_]+)` \|", line)
        assert name, line
        rows[name.group(1)] = line
    return rows


def test_every_field_of_every_streamed_event_is_documented() -> None:
    source = Source(id="what-is-aave", question="What is Aave?", score=0.8)
    events: list[StreamEvent] = [
        MetadataEvent("sid", 12, 0.8, (source,), ("zorblax",)),  # optional fields present
        WordEvent("Aave", 0, 0.8),
        CompleteEvent(0.8, "response_complete", 12, "generative_fallback: timeout"),
        ErrorEvent("The embedding model is unavailable", "embedding_unavailable", 503),
    ]
    rows = event_rows()
    for event in events:
        wire = event.to_wire()
        row = rows[wire["type"]]
        undocumented = [key for key in wire if key != "type" and f"`{key}`" not in row]
        assert not undocumented, (wire["type"], undocumented)
    assert "`code`" in rows["error"] and "`reason`" in rows["error"]


# --- tables ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [path for path in DOCS if path.suffix == ".md"], ids=lambda path: path.name)
def test_tables_are_not_broken_by_blank_lines(path: Path) -> None:
    """A table row right after a blank line must start a new table (a header and its `|---` line)."""
    lines = path.read_text().splitlines()
    in_code = False
    broken = []
    for index, line in enumerate(lines):
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("|") or index == 0 or lines[index - 1].strip():
            continue
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if not re.match(r"^\|[\s:|-]+\|\s*$", following):
            broken.append(index + 1)
    assert not broken, f"{path.name}: table rows after a blank line at lines {broken}"
