"""docker-compose.yml's stack without Docker: two real replicas on one real Redis and one real PostgreSQL, behind
a real nginx running deploy/compose/nginx.conf (only the upstream addresses and the listening port changed).

It checks what the proxy must pass: a WebSocket chat, an SSE stream, a conversation whose turns land on both
replicas, and /metrics kept off the public side.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse
from websockets.sync.client import connect

from scripts.local_server import ROOT, free_port
from tests.conftest import ServerProcess, metric_value, poll_until
from tests.postgres_server import PostgresServer, unique_database_name
from tests.redis_server import RedisServer

NGINX_SITE = ROOT / "deploy" / "compose" / "nginx.conf"
HANG_GUARD_SECONDS = 60.0


class Nginx:
    """nginx in the foreground with the compose site, pointing at local replicas."""

    def __init__(self, directory: Path, upstreams: list[str]) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        site = NGINX_SITE.read_text()
        names = re.findall(r"server (app\d+:\d+);", site)
        assert len(names) == len(upstreams), names
        for name, address in zip(names, upstreams, strict=True):
            site = site.replace(f"server {name};", f"server {address};")
        site = site.replace("listen 80;", f"listen 127.0.0.1:{self.port};")
        (directory / "site.conf").write_text(site)
        temp = "\n".join(
            f"  {kind}_temp_path {directory}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (directory / "nginx.conf").write_text(
            f"worker_processes 1;\npid {directory}/nginx.pid;\nerror_log {directory}/error.log;\n"
            f"events {{ worker_connections 256; }}\n"
            f"http {{\n  access_log off;\n{temp}\n  include {directory}/site.conf;\n}}\n"
        )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.process = subprocess.Popen(
            [nginx, "-p", str(directory), "-c", str(directory / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=(directory / "stderr.log").open("wb"),
        )

        def listening() -> bool:
            assert self.process.poll() is None, (directory / "stderr.log").read_text()
            try:
                return httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        poll_until(listening, HANG_GUARD_SECONDS)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    start_server: Callable[..., ServerProcess],
    server: ServerProcess,  # first: the session's index exists, so the replicas start warm
    redis_server: RedisServer,
    postgres_server: PostgresServer,
) -> Iterator[tuple[Nginx, ServerProcess, ServerProcess]]:
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        pytest.fail("nginx is missing: `make system-deps` installs Debian's nginx")
    database = unique_database_name()
    postgres_server.create_database(database)
    env = {
        "REDIS_URL": redis_server.url,
        "DATABASE_URL": postgres_server.url(database),
        "TRUSTED_PROXIES": "127.0.0.1/32",  # the proxy's address, as docker-compose.yml trusts its proxy's
        "STREAM_WORD_DELAY_MS": "5",
    }
    first, second = start_server(**env), start_server(**env)
    proxy = Nginx(tmp_path_factory.mktemp("nginx"), [f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"])
    yield proxy, first, second
    proxy.stop()
    first.stop()
    second.stop()
    postgres_server.drop_database(database)


def test_websocket_chat_through_the_proxy(stack: tuple[Nginx, ServerProcess, ServerProcess]) -> None:
    proxy, _, _ = stack
    url = proxy.base_url.replace("http://", "ws://") + "/ws/ask"
    with connect(url, open_timeout=10, close_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=HANG_GUARD_SECONDS))["type"] == "status"
        ws.send(json.dumps({"type": "question", "question": "What is a flash loan?"}))
        received: list[dict[str, Any]] = []
        while not received or received[-1]["type"] not in {"complete", "error"}:
            message = json.loads(ws.recv(timeout=HANG_GUARD_SECONDS))
            if message["type"] != "heartbeat":
                received.append(message)
    assert received[0]["type"] == "metadata" and received[0]["sources"][0]["id"] == "what-are-flash-loans"
    words = [message for message in received if message["type"] == "word"]
    assert received[-1]["type"] == "complete" and received[-1]["total_words"] == len(words) > 0


def test_sse_stream_through_the_proxy(stack: tuple[Nginx, ServerProcess, ServerProcess]) -> None:
    proxy, _, _ = stack
    with (
        httpx.Client(base_url=proxy.base_url, timeout=HANG_GUARD_SECONDS) as client,
        connect_sse(client, "POST", "/ask-stream", json={"question": "What is MEV?"}) as events,
    ):
        assert events.response.headers["content-type"].startswith("text/event-stream")
        assert "x-accel-buffering" not in events.response.headers  # nginx obeyed the service's header and used it up
        kinds = [json.loads(event.data)["type"] for event in events.iter_sse()]
    assert kinds[0] == "metadata" and kinds[-1] == "complete" and kinds.count("word") > 0


def test_a_conversation_spans_both_replicas(
    stack: tuple[Nginx, ServerProcess, ServerProcess],
) -> None:
    proxy, first, second = stack
    served_before = [metric_value(replica, "agent_queries_total", outcome="answered") for replica in (first, second)]
    with httpx.Client(base_url=proxy.base_url, timeout=HANG_GUARD_SECONDS) as client:
        opening = client.post("/v2/ask", json={"question": "What is Aave?"})
        assert opening.status_code == 200, opening.text
        session = opening.json()["session_id"]
        # nginx takes the replicas in turn: of four follow-ups on one session, both replicas answer some.
        for _ in range(4):
            follow = client.post("/v2/ask", json={"question": "what are its risks?", "session_id": session})
            assert follow.status_code == 200 and follow.json()["session_id"] == session
            assert follow.json()["sources"][0]["id"].startswith("aave"), follow.json()["sources"][0]
        turns = client.get(f"/v2/sessions/{session}").json()
        assert len(turns["turns"]) == 5
        assert client.get("/metrics").status_code == 404  # scraped on the private network only
    served_after = [metric_value(replica, "agent_queries_total", outcome="answered") for replica in (first, second)]
    assert all(after > before for before, after in zip(served_before, served_after, strict=True))
