"""Property-based input tests (Hypothesis) against one real server, at every question entry point.

Arbitrary Unicode (lone surrogates included: JSON bodies are written with `ensure_ascii=True`, so a lone
surrogate travels as a `\\udxxx` escape, and some bodies carry it as raw CESU-8 bytes), arbitrary JSON values
(nested, huge integers, floats, NaN, null, lists, objects) and sizes go to `POST /ask`, `POST /v2/ask`,
`POST /ask-stream`, `POST /v2/ask-stream`, `GET /ask-stream?question=` and the WebSocket `/ws/ask`.

The properties: HTTP answers 200 with a proper answer or a 4xx in the error format, never a 5xx, never an empty
200 stream (an SSE 200 ends with `complete` or `error`); which of the two is decided by an oracle written here
from the documented rules, independently of the server's code. The WebSocket answers every message (an answer
ending in `complete`, an `error`, or a `pong`) and closes only with a clean code (1008 or 1009 for an oversized
frame), never an abnormal 1006. After each batch of examples the server still serves `/health` and its log has no
traceback. Explicit regression tests cover issue 14, items 1 and 2.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, note, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from agents.validation import InvalidQuestionError, clean_question
from services.embedding_cache import cache_key
from services.text import normalize_text
from tests.conftest import ServerProcess

Event = dict[str, Any]

QUESTION_MAX_CHARS = 1000
MAX_BODY_BYTES = 16_384
WS_MAX_MESSAGE_BYTES = 16_384
MAX_URL_CHARS = 16_000  # well below the HTTP server's request-line limit
CLEAN_CLOSE_CODES = {1000, 1008, 1009}
ABNORMAL_CLOSURE = 1006
RECV_TIMEOUT = 10.0
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
SERVER_TYPES = {"status", "metadata", "word", "complete", "error", "pong", "heartbeat"}
POST_PATHS = ["/ask", "/v2/ask", "/ask-stream", "/v2/ask-stream"]
PING = json.dumps({"type": "ping"})
LONE_SURROGATE_QUESTION = {"question": "what is aave \ud800"}
HUGE_INTEGER = "9" * 5000  # past Python's 4300-digit limit for int(str)

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    database=None,  # no example database in the work tree: a failure prints its minimal example instead
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


# --- the server ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prop_server(start_server: Callable[..., ServerProcess], server: ServerProcess) -> ServerProcess:
    """One server for the module (started after `server`, so its index cache is warm); limits out of the way."""
    return start_server(
        RATE_LIMIT_REQUESTS_PER_MINUTE="1000000000",
        WS_MAX_MESSAGES_PER_MINUTE="1000000000",
        QUESTION_MAX_CHARS=str(QUESTION_MAX_CHARS),
        MAX_BODY_BYTES=str(MAX_BODY_BYTES),
        WS_MAX_MESSAGE_BYTES=str(WS_MAX_MESSAGE_BYTES),
    )


@pytest.fixture(scope="module")
def http(prop_server: ServerProcess) -> Iterator[httpx.Client]:
    """One HTTP client for the module."""
    with httpx.Client(base_url=prop_server.base_url, timeout=30.0) as client:
        yield client


def assert_server_healthy(server: ServerProcess, http: httpx.Client) -> None:
    """The server still serves /health, and nothing it was sent ended in an unhandled error."""
    assert http.get("/health").status_code == 200
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
    assert '"unhandled_error"' not in log, log[-3000:]


# --- the error format (one place to adapt if it changes) -----------------------------------------------------


def assert_refused(response: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """A 4xx (exactly `status` when given) in the project's error format; return the body."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    if status is not None:
        assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.headers["content-type"]
    body = response.json()
    assert isinstance(body, dict), body
    assert isinstance(body.get("detail"), str) and body["detail"], body
    assert isinstance(body.get("type"), str) and body["type"], body
    assert "Traceback" not in response.text
    return body


# --- the oracle: what the server must do, from the documented rules ------------------------------------------


def must_refuse(raw: object) -> bool:
    """Whether a question value is invalid: not a string, blank, too long, NUL, or not valid Unicode."""
    if not isinstance(raw, str):
        return True
    text = raw.strip()
    return (
        not text
        or len(text) > QUESTION_MAX_CHARS
        or "\x00" in text
        or any("\ud800" <= char <= "\udfff" for char in text)
    )


def valid_session_id(value: object) -> bool:
    """Whether `value` has the documented session id format."""
    return isinstance(value, str) and SESSION_ID.fullmatch(value) is not None


def expected_post_status(path: str, body: bytes) -> int:
    """The status a POST of `body` to a question endpoint must get (json.loads decodes bytes as the server does)."""
    if len(body) > MAX_BODY_BYTES:
        return 413
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return 422
    if not isinstance(payload, dict) or "question" not in payload:
        return 422
    session_id = payload.get("session_id")
    if path.startswith("/v2/") and session_id is not None and not valid_session_id(session_id):
        return 422
    return 422 if must_refuse(payload["question"]) else 200


WsOutcome = Literal["answer", "refused", "error", "pong", "silent", "close"]


def expected_ws_outcome(text: str) -> WsOutcome:
    """How the WebSocket must react to one text message (mirrors the documented protocol)."""
    if len(text.encode()) > WS_MAX_MESSAGE_BYTES:
        return "close"
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        return "error"
    kind = payload.get("type") if isinstance(payload, dict) else None
    if kind == "question":
        data = payload.get("data")
        raw = data.get("question") if isinstance(data, dict) else payload.get("question")
        return "refused" if must_refuse(raw) else "answer"
    if kind == "ping":
        return "pong"
    if kind in ("cancel", "heartbeat_response"):
        return "silent"
    return "error"


# --- strategies ----------------------------------------------------------------------------------------------

REAL_QUESTIONS = ["What is Aave?", "what is impermanent loss", "How does a flash loan work?", "best lasagna recipe?"]
TRICKY = [
    "\ud800",
    "\udfff",
    "\ud83d",  # a high surrogate alone
    "\ude00",  # a low surrogate alone
    "\ud83d\ude00",  # a pair: JSON's escapes make it 😀 again
    "\x00",
    "\ufeff",
    "\u202e",
    "\u200b",
    "\ufffe",
    "\uffff",
    "\U0010ffff",
    "\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\u2028\u2029\u3000",  # whitespace to str.strip()
    '"\\',
    "\\ud800",  # the escape as literal text
]
ANY_CHAR = st.one_of(
    st.characters(),  # any code point but surrogates
    st.characters(categories=["Cs"]),  # lone surrogates
    st.characters(max_codepoint=0x7F),  # ASCII, controls and NUL included
    st.sampled_from(TRICKY),
)
ENCODABLE_CHAR = st.one_of(st.characters(), st.characters(max_codepoint=0x7F))
TEXT = st.lists(ANY_CHAR, max_size=30).map("".join)
ENCODABLE_TEXT = st.lists(ENCODABLE_CHAR, max_size=40).map("".join)
QUESTION_TEXT = st.one_of(
    TEXT,
    st.tuples(st.sampled_from(REAL_QUESTIONS), TEXT).map(" ".join),  # often answerable, sometimes poisoned
    st.sampled_from(REAL_QUESTIONS),
    st.tuples(st.lists(ANY_CHAR, min_size=1, max_size=3).map("".join), st.integers(0, 6000)).map(
        lambda unit_count: unit_count[0] * unit_count[1]  # sizes, far past every limit
    ),
    st.integers(QUESTION_MAX_CHARS - 2, QUESTION_MAX_CHARS + 2).map(lambda size: "a" * size),
)


def jstr(text: str) -> str:
    """A JSON string literal; lone surrogates become `\\udxxx` escapes."""
    return json.dumps(text, ensure_ascii=True)


def jobject(pairs: list[tuple[str, str]]) -> str:
    """A JSON object from (key, JSON text) pairs (duplicate keys allowed: the last wins, as in json.loads)."""
    return "{" + ",".join(f"{jstr(key)}: {value}" for key, value in pairs) + "}"


# Integers' lengths, often around Python's 4300-digit limit for int(str) (sys.get_int_max_str_digits).
DIGITS = st.one_of(st.integers(1, 6000), st.sampled_from([4299, 4300, 4301, 5000]))
# Values are built as JSON text, so they can hold what json.dumps cannot write (integers past 4300 digits).
JSON_LEAVES = st.one_of(
    st.sampled_from(["null", "true", "false", "[]", "{}", '""']),
    st.integers().map(str),
    DIGITS.map(lambda digits: "9" * digits),
    DIGITS.map(lambda digits: "-1" + "0" * digits),
    st.floats(allow_nan=True, allow_infinity=True).map(json.dumps),  # NaN and Infinity as Python writes them
    st.sampled_from(["1e999", "-1e999", "1.5e-400", "-0.0", "0." + "1" * 5000]),
    QUESTION_TEXT.map(jstr),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
        st.lists(st.tuples(TEXT, children), max_size=4).map(jobject),
    ),
    max_leaves=8,
)
QUESTION_VALUES = st.one_of(QUESTION_TEXT.map(jstr), QUESTION_TEXT.map(jstr), JSON_VALUES)
SESSION_IDS = st.one_of(
    st.sampled_from(["null", jstr("abc"), jstr("0" * 32), jstr("../../etc/passwd"), jstr(""), jstr("a" * 129)]),
    TEXT.map(jstr),
    JSON_LEAVES,
)
MESSAGE_TYPES = st.one_of(
    st.sampled_from(["question", "ping", "cancel", "heartbeat_response", "pong", "complete", "QUESTION"]).map(jstr),
    TEXT.map(jstr),
    JSON_LEAVES,
)
MESSAGE_FIELDS = st.lists(
    st.tuples(st.one_of(st.sampled_from(["question", "data", "session_id", "id", "type"]), TEXT), QUESTION_VALUES),
    max_size=3,
)


@st.composite
def question_bodies(draw: st.DrawFn, path: str) -> bytes:
    """A request body asking `X`, sometimes with a session id (/v2) or sent as raw (CESU-8) bytes."""
    if draw(st.integers(0, 4)) == 0:  # not escaped: lone surrogates travel as raw (CESU-8) bytes
        question = json.dumps(draw(QUESTION_TEXT), ensure_ascii=False)
    else:
        question = draw(QUESTION_VALUES)
    pairs = [("question", question)]
    if path.startswith("/v2/") and draw(st.booleans()):
        pairs.append(("session_id", draw(SESSION_IDS)))
    return jobject(pairs).encode("utf-8", errors="surrogatepass")


@st.composite
def ws_messages(draw: st.DrawFn) -> str:
    """A whole WebSocket text message: any JSON, text that is not JSON, or (mostly) an object with a `type`."""
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return draw(JSON_VALUES)
    if choice == 1:
        return draw(ENCODABLE_TEXT)
    if choice == 2:
        kind = draw(MESSAGE_TYPES)
    else:
        kind = jstr(draw(st.sampled_from(["question", "ping", "cancel", "heartbeat_response"])))
    fields = draw(MESSAGE_FIELDS)
    if draw(st.booleans()):
        fields.append(("data", jobject([("question", draw(QUESTION_VALUES))])))
    return jobject([("type", kind), *fields])


# --- checks --------------------------------------------------------------------------------------------------


def sse_events(response: httpx.Response) -> list[Event]:
    """The JSON events of an SSE response."""
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers["content-type"]
    return [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]


def assert_answer_events(events: list[Event]) -> None:
    """`metadata`, `word`... and `complete`, consistent with each other.

    On the WebSocket, reference lines (`word` events flagged `reference: true`) may follow the answer's
    words; `total_words` counts the answer's words only.
    """
    assert events, "no events"
    metadata, words, complete = events[0], events[1:-1], events[-1]
    assert metadata["type"] == "metadata", metadata
    assert complete["type"] == "complete", complete
    assert complete["processing_stage"] in {"response_complete", "no_match"}, complete
    assert all(word["type"] == "word" for word in words), [word["type"] for word in words]
    answer_words = [word for word in words if not word.get("reference")]
    assert words[: len(answer_words)] == answer_words, "reference lines must follow the answer's words"
    assert complete["total_words"] == len(answer_words), (complete, len(answer_words))


def shown(data: str | bytes) -> str:
    """`data` for a failure report (Hypothesis does not always show a drawn value), shortened when huge."""
    return f"{len(data)} long: {data[:2000]!r}{' ...' if len(data) > 2000 else ''}"


def check_http(response: httpx.Response, expected: int, streaming: bool) -> None:
    """A 200 with a proper answer or a 4xx in the error format, as the oracle says; never 5xx or an empty stream."""
    note(f"{response.request.method} {shown(str(response.request.url))}; body {shown(response.request.content)}")
    event(f"HTTP {response.status_code}")  # the mix, shown by --hypothesis-show-statistics
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code != 200:
        assert_refused(response)
    assert response.status_code == expected, (expected, response.status_code, response.text[:300])
    if expected != 200:
        return
    if streaming:
        events = sse_events(response)
        assert events, "an empty 200 stream"
        assert events[-1]["type"] in {"complete", "error"}, events[-1]
        assert_answer_events(events)
    else:
        body = response.json()
        assert isinstance(body.get("answer"), str) and body["answer"], body
        assert body["processing_stage"] in {"response_complete", "no_match"}, body


# --- HTTP properties -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", POST_PATHS)
def test_post_question_values(prop_server: ServerProcess, http: httpx.Client, path: str) -> None:
    """Any question value (Unicode, surrogates, JSON of any shape, any size) in a POST body."""

    @PROPERTY
    @given(body=question_bodies(path))
    def check(body: bytes) -> None:
        response = http.post(path, content=body, headers={"content-type": "application/json"})
        check_http(response, expected_post_status(path, body), streaming="stream" in path)

    check()
    assert_server_healthy(prop_server, http)


def test_post_arbitrary_bodies(prop_server: ServerProcess, http: httpx.Client) -> None:
    """Any JSON document or text (raw lone surrogates included) as a whole POST body."""

    @PROPERTY
    @given(path=st.sampled_from(POST_PATHS), text=st.one_of(JSON_VALUES, TEXT))
    def check(path: str, text: str) -> None:
        body = text.encode("utf-8", errors="surrogatepass")
        response = http.post(path, content=body, headers={"content-type": "application/json"})
        check_http(response, expected_post_status(path, body), streaming="stream" in path)

    check()
    assert_server_healthy(prop_server, http)


def test_get_ask_stream_query(prop_server: ServerProcess, http: httpx.Client) -> None:
    """Any question as the query string of `GET /ask-stream` (lone surrogates as their raw UTF-8 bytes)."""

    @PROPERTY
    @given(question=QUESTION_TEXT)
    def check(question: str) -> None:
        raw = question.encode("utf-8", errors="surrogatepass")
        while len(quote(raw, safe="")) > MAX_URL_CHARS:
            raw = raw[: len(raw) // 2]
        # The server decodes the query as UTF-8, replacing what is not (so a surrogate arrives as U+FFFD).
        expected = 422 if must_refuse(raw.decode("utf-8", errors="replace")) else 200
        response = http.get(f"/ask-stream?question={quote(raw, safe='')}")
        check_http(response, expected, streaming=True)

    check()
    assert_server_healthy(prop_server, http)


# --- WebSocket properties ------------------------------------------------------------------------------------


@dataclass
class Exchange:
    """What the server sent after one message (and a `ping` behind it), and its close code if it closed."""

    replies: list[Event] = field(default_factory=list)
    close_code: int | None = None

    def of_type(self, *kinds: str) -> list[Event]:
        """The replies of these types."""
        return [reply for reply in self.replies if reply["type"] in kinds]


class Chat:
    """One connection to /ws/ask, reopened when the server has closed it (or an example failed mid-way)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws: ClientConnection | None = None
        self._stack = contextlib.ExitStack()

    def connection(self) -> ClientConnection:
        """The open connection (its `status` message read)."""
        if self.ws is None:
            self.ws = self._stack.enter_context(connect(self.url, open_timeout=10, close_timeout=2, max_size=None))
            assert self.receive(self.ws)["type"] == "status"
        return self.ws

    @staticmethod
    def receive(ws: ClientConnection) -> Event:
        """The next server message, checked to be a well-formed protocol message."""
        raw = ws.recv(timeout=RECV_TIMEOUT)
        message = json.loads(raw)
        assert isinstance(message, dict) and message.get("type") in SERVER_TYPES, raw[:300]
        assert isinstance(message.get("timestamp"), float), raw[:300]
        return message

    def exchange(self, text: str, outcome: WsOutcome) -> Exchange:
        """Send `text` then a `ping`; read until the replies owed are in, or the server closed."""
        ws = self.connection()
        result = Exchange()
        pongs_owed = 2 if outcome == "pong" else 1
        try:
            ws.send(text)
            ws.send(PING)
            while len(result.of_type("pong")) < pongs_owed or (
                outcome in ("answer", "refused") and not result.of_type("complete", "error")
            ):
                message = self.receive(ws)
                if message["type"] != "heartbeat":
                    result.replies.append(message)
        except ConnectionClosed:
            result.close_code = self._closed(ws)
        except BaseException:
            self.drop()
            raise
        return result

    def _closed(self, ws: ClientConnection) -> int:
        """Drain what was sent before the close; the code the server sent (1006: no close frame)."""
        with contextlib.suppress(ConnectionClosed):
            while True:
                ws.recv(timeout=RECV_TIMEOUT)
        frame = ws.protocol.close_rcvd
        self.drop()
        return frame.code if frame is not None else ABNORMAL_CLOSURE

    def drop(self) -> None:
        """Close the connection (if any); the next exchange opens a new one."""
        self.ws = None
        stack, self._stack = self._stack, contextlib.ExitStack()
        with contextlib.suppress(ConnectionClosed, OSError):
            stack.close()


@pytest.fixture(scope="module")
def chat(prop_server: ServerProcess) -> Iterator[Chat]:
    """One WebSocket client for the module."""
    client = Chat(f"{prop_server.ws_url}/ws/ask")
    yield client
    client.drop()


def check_ws(chat: Chat, text: str) -> None:
    """The server reacts to `text` as the oracle says; a close is clean; the connection otherwise lives on."""
    outcome = expected_ws_outcome(text)
    if currently_in_test_context():
        note(f"message {shown(text)}; expected {outcome}")
        event(f"WebSocket {outcome}")  # the mix, shown by --hypothesis-show-statistics
    result = chat.exchange(text, outcome)
    if result.close_code is not None:
        assert result.close_code in CLEAN_CLOSE_CODES, result.close_code
        assert outcome == "close", (outcome, result.close_code, result.replies[-3:])
        return
    assert outcome != "close", result.replies[-3:]
    answer = [reply for reply in result.replies if reply["type"] != "pong"]
    if outcome == "answer":
        assert_answer_events(answer)
    elif outcome in ("refused", "error"):
        assert [reply["type"] for reply in answer] == ["error"], answer
        assert isinstance(answer[0]["message"], str) and answer[0]["message"], answer
    else:
        assert answer == [], answer


@pytest.mark.parametrize("envelope", ["question", "data"])
def test_ws_question_values(prop_server: ServerProcess, http: httpx.Client, chat: Chat, envelope: str) -> None:
    """Any question value in `{"type": "question", "question": X}` or `{..., "data": {"question": X}}`."""

    @PROPERTY
    @given(value=QUESTION_VALUES)
    def check(value: str) -> None:
        if envelope == "question":
            text = jobject([("type", jstr("question")), ("question", value)])
        else:
            text = jobject([("type", jstr("question")), ("data", jobject([("question", value)]))])
        check_ws(chat, text)

    check()
    check_ws(chat, json.dumps({"type": "question", "question": "What is Aave?"}))
    assert_server_healthy(prop_server, http)


def test_ws_arbitrary_messages(prop_server: ServerProcess, http: httpx.Client, chat: Chat) -> None:
    """Any whole text message: JSON of any shape, objects with any `type` and fields, text that is not JSON."""

    @PROPERTY
    @given(text=ws_messages())
    def check(text: str) -> None:
        check_ws(chat, text)

    check()
    check_ws(chat, json.dumps({"type": "question", "data": {"question": "What is a flash loan?"}}))
    assert_server_healthy(prop_server, http)


# --- pure properties -----------------------------------------------------------------------------------------


@PROPERTY
@given(text=TEXT)
def test_cache_key_never_raises(text: str) -> None:
    """Any `str`, lone surrogates included, has a key; valid text keeps the key plain UTF-8 gives."""
    key = cache_key("model", text)
    assert len(key) == 64
    if not any("\ud800" <= char <= "\udfff" for char in text):
        assert key == hashlib.sha256(f"model\n{normalize_text(text)}".encode()).hexdigest()


PY_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), QUESTION_TEXT),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(TEXT, children, max_size=3)),
    max_leaves=6,
)


@PROPERTY
@given(value=st.one_of(QUESTION_TEXT, PY_VALUES))
def test_clean_question_agrees_with_the_oracle(value: object) -> None:
    """`clean_question` refuses exactly what the oracle refuses, and what it accepts is encodable text."""
    try:
        question = clean_question(value, QUESTION_MAX_CHARS)
    except InvalidQuestionError as error:
        assert must_refuse(value), (value, error.code)
        return
    assert not must_refuse(value)
    question.encode("utf-8")


# --- regressions (issue 14, items 1 and 2) -------------------------------------------------------------------


@pytest.mark.parametrize("path", POST_PATHS)
@pytest.mark.parametrize("encoding", ["escaped", "raw_bytes"])
def test_lone_surrogate_is_refused_over_http(http: httpx.Client, path: str, encoding: str) -> None:
    """`{"question": "what is aave \\ud800"}`: was a 500 on /ask and an empty 200 stream on /v2/ask-stream."""
    if encoding == "escaped":
        body = json.dumps(LONE_SURROGATE_QUESTION, ensure_ascii=True).encode()
    else:
        body = json.dumps(LONE_SURROGATE_QUESTION, ensure_ascii=False).encode("utf-8", errors="surrogatepass")
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    detail = assert_refused(response, 422)["detail"]
    assert "surrogate" in detail and "U+D800" in detail, detail


def test_lone_surrogate_is_refused_on_the_websocket(prop_server: ServerProcess) -> None:
    """The same question over the WebSocket: was a connection dropped without a close frame."""
    with connect(f"{prop_server.ws_url}/ws/ask", open_timeout=10, close_timeout=2) as ws:
        assert Chat.receive(ws)["type"] == "status"
        for message in (
            {"type": "question", **LONE_SURROGATE_QUESTION},
            {"type": "question", "data": LONE_SURROGATE_QUESTION},
        ):
            ws.send(json.dumps(message, ensure_ascii=True))
            reply = Chat.receive(ws)
            assert reply["type"] == "error" and "surrogate" in reply["message"], reply
        ws.send(PING)
        assert Chat.receive(ws)["type"] == "pong"


def test_huge_integer_question(prop_server: ServerProcess, http: httpx.Client) -> None:
    """A 5,000-digit integer: a 422 over REST; over the WebSocket an `error` (it dropped the connection)."""
    body = f'{{"question": {HUGE_INTEGER}}}'
    assert_refused(http.post("/ask", content=body, headers={"content-type": "application/json"}), 422)
    with connect(f"{prop_server.ws_url}/ws/ask", open_timeout=10, close_timeout=2) as ws:
        assert Chat.receive(ws)["type"] == "status"
        for text in (
            f'{{"type":"question","question": {HUGE_INTEGER}}}',
            f'{{"type":"question","data":{{"question": {HUGE_INTEGER}}}}}',
        ):
            ws.send(text)
            reply = Chat.receive(ws)
            assert reply["type"] == "error" and "digits" in reply["message"], reply
        ws.send(json.dumps({"type": "question", "question": "What is Aave?"}))
        answer = [Chat.receive(ws)]
        while answer[-1]["type"] not in ("complete", "error"):
            answer.append(Chat.receive(ws))
        assert_answer_events([message for message in answer if message["type"] != "heartbeat"])


def test_cache_key_of_a_lone_surrogate() -> None:
    """The key that raised UnicodeEncodeError; valid text keeps its old key (existing caches stay valid)."""
    assert len(cache_key("m1", "what is aave \ud800")) == 64
    assert cache_key("m1", "What is Aave?") == hashlib.sha256(b"m1\nwhat is aave?").hexdigest()
