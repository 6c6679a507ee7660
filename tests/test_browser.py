"""The chat page in headless Chromium, driven over the W3C WebDriver protocol (plain HTTP to chromedriver).

Needs Debian's /usr/bin/chromium and /usr/bin/chromedriver (`make system-deps`). Without them the tests skip,
except under CI (the CI variable set), where a missing browser is a failure.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, ServerProcess, free_port

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
