"""HTTPS enforcement (USE_HTTPS) and the read-at-scrape-time metrics, against real servers.

- `https_server`: USE_HTTPS=true, TRUSTED_PROXIES=127.0.0.2/32 and a few allowed host names. Requests from
  127.0.0.1 are an ordinary client's; requests from 127.0.0.2 are the TLS-ending proxy's (Linux routes the
  whole of 127.0.0.0/8 to the loopback interface, so the test picks its source address).
- the shared default server: `cache_entries{layer}` read from the very caches /performance-stats describes;
- `two_worker_server` (WORKERS=2, tests/conftest.py): `process_*{pid}` and `cache_entries{layer,pid}` for each
  worker.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import ServerProcess, poll_until

PROXY = "127.0.0.2"
ALLOWED_HOSTS = "bot.example.com,*.example.com,127.0.0.1,localhost"
HSTS = "strict-transport-security"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --- servers and clients -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def https_server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server(USE_HTTPS="true", TRUSTED_PROXIES=f"{PROXY}/32", ALLOWED_HOSTS=ALLOWED_HOSTS)


@pytest.fixture()
def client(https_server: ServerProcess) -> Iterator[httpx.Client]:
    """An ordinary client (127.0.0.1), never following redirects."""
    with httpx.Client(base_url=https_server.base_url, timeout=30, trust_env=False) as http:
        yield http


@pytest.fixture()
def proxy(https_server: ServerProcess) -> Iterator[httpx.Client]:
    """The trusted TLS-ending proxy (127.0.0.2)."""
    transport = httpx.HTTPTransport(local_address=PROXY)
    with httpx.Client(base_url=https_server.base_url, transport=transport, timeout=30, trust_env=False) as http:
        yield http


def scrape(server: ServerProcess) -> Samples:
    response = httpx.get(f"{server.base_url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def by_label(samples: Samples, name: str, label: str, **fixed: str) -> dict[str, float]:
    """{value of `label`: sample} for the samples of `name` whose other labels are exactly `fixed`."""
    found = {}
    for (sample_name, labels), value in samples.items():
        rest = {key: val for key, val in labels if key != label}
        if sample_name == name and rest == fixed and label in dict(labels):
            found[dict(labels)[label]] = value
    return found


def unique_question() -> str:
    return f"What is a flash loan, {uuid.uuid4().hex[:10]}?"


# --- HTTPS --------------------------------------------------------------------------------------------------------


def test_plain_http_is_redirected_to_https_keeping_path_and_query(client: httpx.Client) -> None:
    host = {"Host": "bot.example.com:8080"}
    response = client.get("/v2/sessions/abc?x=1&y=%20z", headers=host)
    assert response.status_code == 301
    assert response.headers["location"] == "https://bot.example.com/v2/sessions/abc?x=1&y=%20z"  # port dropped
    assert response.content == b"" and HSTS not in response.headers
    assert client.head("/", headers=host).status_code == 301
    for method in ("POST", "DELETE"):  # 308: the client repeats the same method, with its body
        response = client.request(method, "/ask", json={"question": "What is MEV?"}, headers=host)
        assert (response.status_code, response.headers["location"]) == (308, "https://bot.example.com/ask")
    assert "x-request-id" in response.headers  # the redirect passes through the outer middleware


def test_a_client_cannot_declare_itself_secure(client: httpx.Client) -> None:
    for claim in ({"X-Forwarded-Proto": "https"}, {"Forwarded": "proto=https"}):
        response = client.post("/ask", json={"question": "What is MEV?"}, headers={"Host": "bot.example.com", **claim})
        assert response.status_code == 308, claim


def test_the_trusted_proxy_decides_the_scheme(proxy: httpx.Client) -> None:
    secure = {"Host": "bot.example.com", "X-Forwarded-Proto": "https"}
    response = proxy.post("/ask", json={"question": "What is a flash loan?"}, headers=secure)
    assert response.status_code == 200 and response.json()["processing_stage"] == "response_complete"
    assert response.headers[HSTS] == "max-age=31536000; includeSubDomains"
    forwarded = proxy.get("/health-status", headers={"Host": "bot.example.com", "Forwarded": "for=1.2.3.4;proto=https"})
    assert forwarded.status_code == 200 and HSTS in forwarded.headers
    plain = proxy.post("/ask", json={"question": "What is MEV?"}, headers={**secure, "X-Forwarded-Proto": "http"})
    assert (plain.status_code, plain.headers["location"]) == (308, "https://bot.example.com/ask")


def test_the_redirect_host_is_one_allowed_hosts_accepts(client: httpx.Client, proxy: httpx.Client) -> None:
    refused = client.get("/", headers={"Host": "evil.test"})
    assert refused.status_code == 400 and refused.json()["reason"] == "invalid_host"
    assert "location" not in refused.headers
    # Allowed by the `*.example.com` pattern, but not a plain host name: no Location is built from it.
    odd = client.get("/", headers={"Host": "user@evil.example.com"})
    assert odd.status_code == 400 and "location" not in odd.headers
    plain = {"Host": "bot.example.com", "X-Forwarded-Proto": "http"}
    # The proxy's X-Forwarded-Host is used when ALLOWED_HOSTS accepts it, and the Host otherwise.
    assert proxy.get("/", headers={**plain, "X-Forwarded-Host": "api.example.com"}).headers["location"] == (
        "https://api.example.com/"
    )
    assert proxy.get("/", headers={**plain, "X-Forwarded-Host": "evil.test"}).headers["location"] == (
        "https://bot.example.com/"
    )
    # A client's X-Forwarded-Host is ignored.
    assert client.get("/", headers={**plain, "X-Forwarded-Host": "api.example.com"}).headers["location"] == (
        "https://bot.example.com/"
    )


def test_probes_answer_over_plain_http(client: httpx.Client) -> None:
    for path in ("/health", "/health-status"):
        response = client.get(path, headers={"Host": "10.1.2.3:8000"})  # a probe addressing the pod
        assert response.status_code == 200, path
        assert "location" not in response.headers and HSTS not in response.headers


def test_an_insecure_websocket_handshake_is_refused(https_server: ServerProcess) -> None:
    for path in ("/ws/ask", "/ws/test"):
        with pytest.raises(InvalidStatus) as refused, connect(f"{https_server.ws_url}{path}", open_timeout=10):
            pass
        assert refused.value.response.status_code == 403, path
        # The same handshake through the proxy, which says the client used TLS, opens.
        sock = socket.create_connection(("127.0.0.1", https_server.port), timeout=10, source_address=(PROXY, 0))
        headers = {"X-Forwarded-Proto": "https"}
        with connect(f"{https_server.ws_url}{path}", sock=sock, additional_headers=headers, open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=10))["status"] == "connected"


# --- cache sizes ---------------------------------------------------------------------------------------------------


def cache_figures(server: ServerProcess) -> dict[str, Any]:
    perf = httpx.get(f"{server.base_url}/performance-stats", timeout=10).json()
    layers = perf["cache"]["layers"]
    return {
        "pid": perf["worker_pid"],
        "memory": layers["memory"]["entries"],
        "disk": layers["disk"]["entries"],
        "answer": perf["answer_cache"]["entries"],
    }


@pytest.fixture(scope="module")
def cache_server(
    start_server: Callable[..., ServerProcess],
    server: ServerProcess,  # started first, so the shared cache already holds the dataset's index
    shared_cache_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> ServerProcess:
    """A server whose question caches start empty (the index is copied, so it starts in seconds)."""
    cache = tmp_path_factory.mktemp("cache-sizes")
    shutil.copytree(shared_cache_dir / "index", cache / "index")
    return start_server(CACHE_DIR=str(cache))


def test_cache_entries_are_read_from_the_caches(cache_server: ServerProcess) -> None:
    def gauge() -> dict[str, float]:
        return by_label(scrape(cache_server), "cache_entries", "layer")

    def caches() -> dict[str, float]:
        figures = cache_figures(cache_server)
        return {layer: float(figures[layer]) for layer in ("memory", "disk", "answer")}

    assert gauge() == caches() == {"memory": 0.0, "disk": 0.0, "answer": 0.0}
    question = unique_question()
    for _ in range(2):  # the second time it comes from the answer cache and adds nothing
        response = httpx.post(f"{cache_server.base_url}/ask", json={"question": question}, timeout=30)
        assert response.status_code == 200
    # The disk write runs in a thread after the answer.
    expected = {"memory": 1.0, "disk": 1.0, "answer": 1.0}
    poll_until(lambda: gauge() == expected, timeout=15)
    assert caches() == expected


# --- several workers -----------------------------------------------------------------------------------------------


def test_each_worker_reports_its_process_figures(two_worker_server: tuple[ServerProcess, set[int]]) -> None:
    server, pids = two_worker_server
    pid_labels = {str(pid) for pid in pids}
    samples = scrape(server)
    resident = by_label(samples, "process_resident_memory_bytes", "pid")
    assert set(resident) == pid_labels, resident
    assert all(value > 50e6 for value in resident.values())  # each worker holds the model and the index
    cpu = by_label(samples, "process_cpu_seconds_total", "pid")
    assert set(cpu) == pid_labels and all(value > 0 for value in cpu.values())
    started = by_label(samples, "process_start_time_seconds", "pid")
    assert all(time.time() - 3600 < value <= time.time() for value in started.values())
    assert set(by_label(samples, "process_open_fds", "pid")) == pid_labels
    # The figures are each worker's own: compare with what that worker says of itself.
    own: dict[int, int] = {}

    def every_worker_described_itself() -> bool:
        figures = httpx.get(f"{server.base_url}/system-metrics", timeout=10).json()["process"]
        own[figures["pid"]] = figures["rss_bytes"]
        return set(own) == pids

    poll_until(every_worker_described_itself, timeout=30, interval=0.01)
    for pid, rss in own.items():
        assert abs(resident[str(pid)] - rss) < 0.25 * rss, (pid, resident[str(pid)], rss)
    promtool = shutil.which("promtool")
    if promtool:
        text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
        result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr


def test_each_worker_reports_its_own_cache_sizes(two_worker_server: tuple[ServerProcess, set[int]]) -> None:
    """Questions on new connections reach both workers; each worker's `cache_entries{pid}` is its own cache."""
    server, pids = two_worker_server
    for _ in range(8):
        httpx.post(f"{server.base_url}/ask", json={"question": unique_question()}, timeout=30)
    figures: dict[int, dict[str, Any]] = {}

    def gauges_match_each_worker() -> bool:
        seen = cache_figures(server)
        figures[seen["pid"]] = seen
        gauge = scrape(server)
        return set(figures) == pids and all(
            by_label(gauge, "cache_entries", "pid", layer=layer)
            == {str(pid): float(fig[layer]) for pid, fig in figures.items()}
            for layer in ("memory", "answer")
        )

    poll_until(gauges_match_each_worker, timeout=30, interval=0.2)
    assert sum(fig["memory"] for fig in figures.values()) >= 8
