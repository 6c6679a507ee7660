"""The chat page in headless Chromium, driven over the W3C WebDriver protocol (plain HTTP to chromedriver).

Needs Debian's /usr/bin/chromium and /usr/bin/chromedriver (`make system-deps`). Without them the tests skip,
except under CI (the CI variable set), where a missing browser is a failure.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, ServerProcess, free_port, poll_until

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = ROOT / "artifacts"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
CHROME_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
]
ANSWER_TIMEOUT = 20.0
FEEDBACK_TIMEOUT = 20.0


class WebDriverError(AssertionError):
    """chromedriver answered a command with an error."""


class Browser:
    """One WebDriver session: the few commands these tests need."""

    def __init__(self, http: httpx.Client, session_id: str) -> None:
        self.http = http
        self.session_id = session_id

    def command(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        response = self.http.request(method, f"/session/{self.session_id}{path}", json=payload)
        value = response.json()["value"]
        if response.status_code != 200:
            raise WebDriverError(f"{method} {path}: {value.get('error')}: {value.get('message')}")
        return value

    def open(self, url: str) -> None:
        self.command("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        element: dict[str, str] = self.command("POST", "/element", {"using": "css selector", "value": css})
        assert ELEMENT in element, element
        return element[ELEMENT]

    def click(self, css: str) -> None:
        self.command("POST", f"/element/{self.find(css)}/click", {})

    def type(self, css: str, text: str) -> None:
        self.command("POST", f"/element/{self.find(css)}/value", {"text": text})

    def run(self, script: str, *args: Any) -> Any:
        return self.command("POST", "/execute/sync", {"script": script, "args": list(args)})

    def run_async(self, script: str, *args: Any) -> Any:
        return self.command("POST", "/execute/async", {"script": script, "args": list(args)})

    def wait_for(self, script: str, timeout: float, *args: Any) -> Any:
        """Poll `script` until it returns something truthy (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.run(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for: {script}")
            time.sleep(0.05)

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.command("GET", "/screenshot")))


def _processes_mentioning(marker: str) -> list[int]:
    """Pids whose command line contains `marker` (our unique profile dir): strays to clean up."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _stop(driver: subprocess.Popen[bytes], profile: Path) -> None:
    """End chromedriver and every Chromium process it started; by pid, never by name."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(driver.pid, signal.SIGTERM)  # chromedriver leads its own process group (start_new_session)
    try:
        driver.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=5)
    deadline = time.monotonic() + 5
    while (strays := _processes_mentioning(str(profile))) and time.monotonic() < deadline:
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """Headless Chromium behind a chromedriver on a free port; both are always ended afterwards."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        message = f"headless browser tests need {' and '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)

    workdir = tmp_path_factory.mktemp("browser")
    profile = workdir / "profile"
    port = free_port()
    with (workdir / "chromedriver.log").open("wb") as log:
        driver = subprocess.Popen(
            [str(CHROMEDRIVER), f"--port={port}", "--log-level=WARNING"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as http:
            deadline = time.monotonic() + 15
            while True:
                try:
                    if http.get("/status").json()["value"]["ready"]:
                        break
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                if driver.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromedriver did not start:\n{(workdir / 'chromedriver.log').read_text()}")
                time.sleep(0.05)

            options = {"binary": str(CHROMIUM), "args": [*CHROME_ARGS, f"--user-data-dir={profile}"]}
            capabilities = {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}
            response = http.post("/session", json={"capabilities": capabilities})
            assert response.status_code == 200, response.text
            session = Browser(http, response.json()["value"]["sessionId"])
            session.command("POST", "/timeouts", {"script": int(ANSWER_TIMEOUT * 1000), "pageLoad": 15000})
            try:
                yield session
            finally:
                with contextlib.suppress(httpx.HTTPError):
                    http.delete(f"/session/{session.session_id}", timeout=10)
    finally:
        _stop(driver, profile)


def metric(server: ServerProcess, sample: str) -> float:
    for line in httpx.get(f"{server.base_url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


def rest_answer(server: ServerProcess, question: str) -> dict[str, Any]:
    response = httpx.post(f"{server.base_url}/ask", json={"question": question}, timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# --- the chat page -------------------------------------------------------------------------------------------

TRANSPORT_COUNTERS = {
    "ws": 'websocket_messages_total{direction="in",type="question"}',
    "sse": 'http_requests_total{method="POST",route="/v2/ask-stream",status="200"}',
}


@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_chat_page_answers(browser: Browser, server: ServerProcess, transport: str) -> None:
    question = "What is a health factor?"
    expected = rest_answer(server, question)
    browser.open(f"{server.base_url}/")
    assert browser.run("return document.title") == "DeFi Q&A Bot"
    # The page opens its WebSocket on load; asking before that would silently fall back to SSE.
    status = browser.wait_for(
        "const s = document.getElementById('status').textContent; return s.startsWith('Connected') && s",
        10,
    )
    assert "session" in status

    browser.click(f'#transport option[value="{transport}"]')
    assert browser.run("return document.getElementById('transport').value") == transport
    counter = TRANSPORT_COUNTERS[transport]
    before = metric(server, counter)

    browser.type("#question", question)
    browser.click("#ask-button")
    answer = browser.wait_for(
        "const a = document.querySelector('.answer[data-done=\"true\"]'); return a && a.textContent",
        ANSWER_TIMEOUT,
    )
    assert "health factor" in answer.lower()
    assert answer == expected["answer"]
    page = browser.run(
        """
        return {
          question: document.querySelector('.turn .question').textContent,
          turns: document.querySelectorAll('.turn').length,
          meta: document.querySelector('.turn .meta').textContent,
          sources: [...document.querySelectorAll('.turn .sources li')].map((li) => li.textContent),
          error: document.querySelector('.answer.error') !== null,
          input: document.getElementById('question').value,
          askDisabled: document.getElementById('ask-button').disabled,
          status: document.getElementById('status').textContent,
        };
        """
    )
    assert page["question"] == question
    assert page["turns"] == 1
    assert "response_complete" in page["meta"] and "confidence" in page["meta"]
    assert page["sources"][0].startswith(expected["sources"][0]["question"])
    assert len(page["sources"]) == len(expected["sources"])
    assert not page["error"]
    assert page["input"] == ""
    assert not page["askDisabled"]
    assert page["status"] == "Ready."
    assert metric(server, counter) == before + 1  # the answer really came over the chosen transport
    browser.screenshot(ARTIFACTS / "chat_page.png")


# --- rating answers on the chat page ------------------------------------------------------------------------

FEEDBACK_COUNTERS = {
    "ws": 'websocket_messages_total{direction="in",type="feedback"}',
    "sse": 'http_requests_total{method="POST",route="/v2/feedback",status="200"}',
}


def database_file(server: ServerProcess) -> Path:
    """The server's SQLite file (each test server gets its own `sqlite:///<dir>/defi.db`)."""
    url = server.env["DATABASE_URL"]
    scheme, _, path = url.partition(":///")
    assert scheme.startswith("sqlite") and path, url
    return Path(path)


def feedback_rows(server: ServerProcess, answer_id: str) -> list[dict[str, Any]]:
    """The server's stored ratings of one answer, read straight from its database (read-only)."""
    with contextlib.closing(sqlite3.connect(f"{database_file(server).as_uri()}?mode=ro", uri=True, timeout=10)) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute(
            "SELECT answer_id, rating, comment, entry_id FROM feedback WHERE answer_id = ? ORDER BY id", (answer_id,)
        ).fetchall()
    return [dict(row) for row in rows]


def wait_for_feedback(server: ServerProcess, answer_id: str, expected: dict[str, Any]) -> None:
    """Poll the database until the answer has exactly the one expected rating row."""
    seen: list[dict[str, Any]] = []

    def stored() -> bool:
        nonlocal seen
        seen = feedback_rows(server, answer_id)
        return seen == [expected]

    try:
        poll_until(stored, FEEDBACK_TIMEOUT)
    except AssertionError:
        raise AssertionError(f"feedback rows of {answer_id}: {seen}, expected [{expected}]") from None


def ask_on_page(browser: Browser, server: ServerProcess, transport: str, question: str) -> str:
    """Open the chat page, ask over `transport` and return the answer id of the rating control that appears."""
    browser.open(f"{server.base_url}/")
    browser.wait_for("return document.getElementById('status').textContent.startsWith('Connected')", 10)
    browser.click(f'#transport option[value="{transport}"]')
    browser.type("#question", question)
    browser.click("#ask-button")
    answer_id: str = browser.wait_for(
        "const f = document.querySelector('.turn .feedback'); return f && f.dataset.answerId", ANSWER_TIMEOUT
    )
    return answer_id


FEEDBACK_STATE = """
const group = document.querySelector('.feedback[data-answer-id="' + arguments[0] + '"]');
const button = (rating) => group.querySelector('button[data-rating="' + rating + '"]');
return {
  role: group.getAttribute('role'),
  label: group.getAttribute('aria-label'),
  helpful: button('helpful').getAttribute('aria-pressed'),
  wrong: button('wrong').getAttribute('aria-pressed'),
  helpfulLabel: button('helpful').getAttribute('aria-label'),
  wrongLabel: button('wrong').getAttribute('aria-label'),
  commentOpen: !group.querySelector('.feedback-comment').hidden,
  commentMax: group.querySelector('textarea').maxLength,
  status: group.querySelector('.feedback-status').textContent,
  statusError: group.querySelector('.feedback-status').classList.contains('error'),
};
"""


def status_says(browser: Browser, answer_id: str, text: str) -> None:
    browser.wait_for(
        f"const s = document.querySelector('.feedback[data-answer-id=\"{answer_id}\"] .feedback-status');"
        " return s && s.textContent.includes(arguments[0]) && !s.classList.contains('error')",
        FEEDBACK_TIMEOUT,
        text,
    )


@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_chat_page_rates_answer(browser: Browser, server: ServerProcess, transport: str) -> None:
    """Wrong (with a comment), then Helpful: one stored rating of the page's answer, sent over the page's transport."""
    question = "What is impermanent loss?"
    expected = rest_answer(server, question)
    other = FEEDBACK_COUNTERS["sse" if transport == "ws" else "ws"]
    own_before, other_before = metric(server, FEEDBACK_COUNTERS[transport]), metric(server, other)

    answer_id = ask_on_page(browser, server, transport, question)
    entry_id = browser.run("return document.querySelector('.turn .sources li').dataset.entryId")
    assert entry_id == expected["sources"][0]["id"]
    state = browser.run(FEEDBACK_STATE, answer_id)
    assert state["role"] == "group" and state["label"] == "Rate this answer"
    assert (state["helpful"], state["wrong"]) == ("false", "false")
    assert "helpful" in state["helpfulLabel"].lower() and "wrong" in state["wrongLabel"].lower()
    assert not state["commentOpen"]
    assert state["commentMax"] == 1000

    browser.click(f'.feedback[data-answer-id="{answer_id}"] button[data-rating="wrong"]')
    status_says(browser, answer_id, "recorded as wrong")
    wait_for_feedback(
        server, answer_id, {"answer_id": answer_id, "rating": "wrong", "comment": None, "entry_id": entry_id}
    )
    state = browser.run(FEEDBACK_STATE, answer_id)
    assert (state["helpful"], state["wrong"]) == ("false", "true")
    assert state["commentOpen"]

    comment = f"The answer misses the {transport} fee case."
    browser.type(f'.feedback[data-answer-id="{answer_id}"] textarea', comment)
    browser.click(f'.feedback[data-answer-id="{answer_id}"] .feedback-send')
    browser.screenshot(ARTIFACTS / f"chat_feedback_comment_{transport}.png")
    status_says(browser, answer_id, "comment sent")
    wait_for_feedback(
        server, answer_id, {"answer_id": answer_id, "rating": "wrong", "comment": comment, "entry_id": entry_id}
    )

    browser.click(f'.feedback[data-answer-id="{answer_id}"] button[data-rating="helpful"]')
    status_says(browser, answer_id, "recorded as helpful")
    wait_for_feedback(
        server, answer_id, {"answer_id": answer_id, "rating": "helpful", "comment": None, "entry_id": entry_id}
    )
    state = browser.run(FEEDBACK_STATE, answer_id)
    assert (state["helpful"], state["wrong"]) == ("true", "false")
    assert not state["commentOpen"]
    assert not state["statusError"]

    # All three ratings went over the transport the page asked with, none over the other.
    assert metric(server, FEEDBACK_COUNTERS[transport]) == own_before + 3
    assert metric(server, other) == other_before
    browser.screenshot(ARTIFACTS / f"chat_feedback_{transport}.png")


ENTER, CONTROL, RELEASE_ALL = "\ue007", "\ue009", "\ue000"


def test_chat_page_rating_by_keyboard(browser: Browser, server: ServerProcess) -> None:
    """Enter on a focused rating button rates; Wrong moves focus to the comment box, Ctrl+Enter sends it."""
    answer_id = ask_on_page(browser, server, "ws", "What is a flash loan?")
    group = f'.feedback[data-answer-id="{answer_id}"]'
    entry_id = browser.run("return document.querySelector('.turn .sources li').dataset.entryId")

    browser.type(f'{group} button[data-rating="wrong"]', ENTER)
    status_says(browser, answer_id, "recorded as wrong")
    assert browser.run("return document.activeElement.tagName") == "TEXTAREA"
    comment = "x" * 1005  # the box keeps the first 1,000 characters (the server's limit)
    browser.type(f"{group} textarea", comment + CONTROL + ENTER + RELEASE_ALL)
    status_says(browser, answer_id, "comment sent")
    assert browser.run(f"return document.querySelector('{group} .feedback-counter').textContent") == "1000/1000"
    wait_for_feedback(
        server, answer_id, {"answer_id": answer_id, "rating": "wrong", "comment": "x" * 1000, "entry_id": entry_id}
    )

    browser.type(f'{group} button[data-rating="helpful"]', ENTER)
    status_says(browser, answer_id, "recorded as helpful")
    wait_for_feedback(
        server, answer_id, {"answer_id": answer_id, "rating": "helpful", "comment": None, "entry_id": entry_id}
    )
    assert browser.run(FEEDBACK_STATE, answer_id)["helpful"] == "true"


def test_no_rating_control_without_answer_id(browser: Browser, start_server: Callable[..., ServerProcess]) -> None:
    """A stream stopped half-way has no answer id, so the page offers nothing to rate."""
    slow = start_server(STREAM_WORD_DELAY_MS="300")
    browser.open(f"{slow.base_url}/")
    browser.wait_for("return document.getElementById('status').textContent.startsWith('Connected')", 10)
    browser.type("#question", "What is impermanent loss?")
    browser.click("#ask-button")
    browser.wait_for(
        "return document.querySelector('.turn .answer').textContent.split(' ').length >= 2", ANSWER_TIMEOUT
    )
    browser.click("#cancel-button")
    browser.wait_for("return document.getElementById('status').textContent === 'Ready.'", ANSWER_TIMEOUT)
    page = browser.run(
        "return {meta: document.querySelector('.turn .meta').textContent,"
        " controls: document.querySelectorAll('.feedback').length}"
    )
    assert "cancelled" in page["meta"]
    assert page["controls"] == 0


# --- EventSource against GET /ask-stream ---------------------------------------------------------------------

EVENT_SOURCE_SCRIPT = """
const question = arguments[0];
const done = arguments[arguments.length - 1];
const words = [];
const types = [];
const source = new EventSource('/ask-stream?question=' + encodeURIComponent(question));
source.onmessage = (message) => {
  const event = JSON.parse(message.data);
  types.push(event.type);
  if (event.type === 'word') words.push(event.content);
  if (event.type === 'complete' || event.type === 'error') {
    source.close();
    done({text: words.join(' '), last: event, types: types});
  }
};
source.onerror = () => {
  source.close();
  done({text: words.join(' '), last: null, types: types, failed: true});
};
"""


@pytest.mark.parametrize(
    ("question", "stage"),
    [("What is a health factor?", "response_complete"), ("best lasagna recipe?", "no_match")],
)
def test_event_source_get_stream(browser: Browser, server: ServerProcess, question: str, stage: str) -> None:
    expected = rest_answer(server, question)
    browser.open(f"{server.base_url}/")  # same origin as /ask-stream
    result = browser.run_async(EVENT_SOURCE_SCRIPT, question)
    assert not result.get("failed"), result
    assert result["text"] == expected["answer"]
    assert result["last"]["type"] == "complete"
    assert result["last"]["processing_stage"] == stage == expected["processing_stage"]
    assert result["types"] == ["metadata"] + ["word"] * result["last"]["total_words"] + ["complete"]
