"""Connection and header limits (infrastructure/http_server.py) against real servers, as a hostile client sees them.

Issue 14 items 5 and 9: oversized and unterminated headers get 431 and cost no memory; headers trickled byte by
byte are cut off at the header deadline, and idle sockets at the keep-alive timeout; one client holding thousands
of sockets cannot deny service to another; and when every connection is busy, `/health` still answers while
other requests get 503. Attackers connect from 127.0.0.2 and 127.0.0.3 (Linux routes all of 127.0.0.0/8 to
loopback), the well-behaved client from 127.0.0.1. The guard's bookkeeping is also checked in-process.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import resource
import select
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil  # type: ignore[import-untyped]
import pytest
from uvicorn.config import UvicornDeprecationWarning

from tests.conftest import ServerProcess, poll_until

with warnings.catch_warnings():  # uvicorn's `websockets` (legacy) protocol warns that it is deprecated on import
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", UvicornDeprecationWarning)
    from infrastructure.http_server import Admission, ConnectionGuard, ConnectionLimits, client_key

ATTACKER = "127.0.0.2"
SCANNER = "127.0.0.3"
HEADER_SENDER = "127.0.0.4"
ATTACKER_SOCKETS = 5000
PER_CLIENT_DEFAULT = 100
HEADER_TIMEOUT = 1.5
DEADLINE = 20.0  # generous: every wait below ends as soon as its condition holds
QUESTION = {"question": "What is impermanent loss?"}
HUGE_HEADER_BYTES = 50 * 2**20
HUGE_HEADER_CLIENTS = 10
RSS_GROWTH_BOUND = 48 * 2**20  # each connection buffers at most ~300 KB; before the limit, 10 took +478 MB


# --- servers -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(start_server: Callable[..., ServerProcess], server: ServerProcess) -> dict[str, ServerProcess]:
    """Three configured servers, started side by side once the default `server` has built the shared index.

    `short`: a 1.5 s header deadline and a 1 s keep-alive timeout. `dos`: the defaults, except a 60 s header
    deadline so the attacker's admitted sockets stay open for the whole test. `full`: at most 20 connections,
    5 more in reserve.
    """
    configs = {
        "short": {"REQUEST_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT), "KEEP_ALIVE_TIMEOUT_SECONDS": "1"},
        "dos": {"REQUEST_HEADER_TIMEOUT_SECONDS": "60"},
        "full": {"MAX_CONNECTIONS": "20", "CONNECTION_RESERVE": "5"},
    }
    with ThreadPoolExecutor(max_workers=len(configs)) as pool:
        futures = {name: pool.submit(start_server, **env) for name, env in configs.items()}
    return {name: future.result() for name, future in futures.items()}


# --- raw HTTP over sockets -----------------------------------------------------------------------------------


def connect(server: ServerProcess, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(DEADLINE)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", server.port))
    return sock


def head(server: ServerProcess, path: str = "/health", extra: bytes = b"") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n".encode() + extra


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response: (status, lower-cased headers, body), read by its content-length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response; got {data!r}")
        data += chunk
    header_block, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = header_block.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: socket.socket, timeout: float = DEADLINE) -> bool:
    """Whether the server closes the connection within `timeout` (whatever it sent before)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def held_connections(server: ServerProcess, source: str) -> int:
    """Established connections the server process holds from `source`."""
    return sum(
        1
        for conn in psutil.Process(server.pid).net_connections(kind="tcp")
        if conn.raddr and conn.raddr.ip == source and conn.status == psutil.CONN_ESTABLISHED
    )


def health(server: ServerProcess, source: str = "127.0.0.1") -> httpx.Response:
    """GET /health on a fresh connection from `source`."""
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=10.0, trust_env=False) as client:
        return client.get(f"{server.base_url}/health")


def ask(server: ServerProcess) -> httpx.Response:
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        return client.post(f"{server.base_url}/ask", json=QUESTION)


def open_websocket(server: ServerProcess, source: str) -> tuple[socket.socket, int]:
    """A WebSocket handshake on a raw socket: the socket and the status of the answer (101 when upgraded)."""
    sock = connect(server, source)
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        head(server, "/ws/ask", b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n")
        + b"Sec-WebSocket-Key: "
        + key
        + b"\r\n\r\n"
    )
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return sock, int(data.split(b" ", 2)[1]) if data else 0


@pytest.fixture()
def many_files() -> Iterator[None]:
    """Raise this process's open-file soft limit to the hard limit for thousands of sockets; skip if too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = ATTACKER_SOCKETS + 500
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- header size ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(lambda s: head(s, extra=b"X-Big: " + b"a" * 65536 + b"\r\n\r\n"), id="one-64KB-header"),
        pytest.param(lambda s: head(s, extra=b"X-Big: " + b"a" * 65536), id="unterminated-64KB"),
        pytest.param(
            lambda s: head(s, extra=b"".join(b"X-%d: %s\r\n" % (i, b"v" * 20) for i in range(2000))) + b"\r\n",
            id="2000-headers",
        ),
        pytest.param(lambda s: f"GET /health?{'q' * 65536} HTTP/1.1\r\n".encode(), id="64KB-url"),
    ],
)
def test_oversized_headers_get_431_and_server_keeps_serving(
    servers: dict[str, ServerProcess], request_bytes: Callable[[ServerProcess], bytes]
) -> None:
    server = servers["short"]
    with connect(server) as sock:
        sock.sendall(request_bytes(server))
        status, headers, body = read_response(sock)
        assert status == 431, body
        assert headers["connection"] == "close"
        assert closed_by_server(sock)
    assert health(server).status_code == 200


def test_headers_under_the_cap_are_served(servers: dict[str, ServerProcess]) -> None:
    server = servers["short"]
    with connect(server) as sock:
        sock.sendall(head(server, extra=b"X-Cookie: " + b"c" * 16384 + b"\r\n\r\n"))
        status, _, _ = read_response(sock)
    assert status == 200


def test_ten_never_ending_50mb_headers_cost_the_server_no_memory(servers: dict[str, ServerProcess]) -> None:
    """The reproduction of item 5: ten connections each sending a 50 MB header line that never ends took the
    server from 359 to 837 MB. Each is now cut off at MAX_REQUEST_HEADER_BYTES (32 KiB by default, and the
    `dos` server's 60 s header deadline leaves only the size limit to end them), so memory stays flat."""
    server = servers["dos"]
    process = psutil.Process(server.pid)
    assert health(server).status_code == 200
    before = process.memory_info().rss
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.02):
            peak = max(peak, process.memory_info().rss)

    def push(_: int) -> int:
        """Send up to 50 MB of one header line; how much went out before the server closed the connection."""
        chunk = b"a" * 2**20
        sent = 0
        with connect(server, HEADER_SENDER) as sock:
            sock.sendall(head(server, extra=b"X-Big: "))
            with contextlib.suppress(OSError):  # the server answered 431 and closed: the send fails
                while sent < HUGE_HEADER_BYTES:
                    sock.sendall(chunk)
                    sent += len(chunk)
        return sent

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(max_workers=HUGE_HEADER_CLIENTS) as pool:
            sent = list(pool.map(push, range(HUGE_HEADER_CLIENTS)))
        peak = max(peak, process.memory_info().rss)
    finally:
        done.set()
        sampler.join()
    growth = peak - before
    print(
        f"\n{HUGE_HEADER_CLIENTS} x 50 MB headers: sent at most {max(sent) / 2**20:.1f} MB each before the server "
        f"closed; server RSS {before / 2**20:.0f} MB -> peak {peak / 2**20:.0f} MB (+{growth / 2**20:.1f} MB)"
    )
    assert all(amount < HUGE_HEADER_BYTES for amount in sent), sent
    assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth / 2**20:.0f} MB"
    assert health(server).status_code == 200


# --- header deadline and idle timeout ------------------------------------------------------------------------


@pytest.mark.parametrize("after_a_response", [False, True], ids=["new-connection", "kept-alive-connection"])
def test_trickled_headers_are_cut_off_at_the_deadline(
    servers: dict[str, ServerProcess], after_a_response: bool
) -> None:
    """A slowloris: one header line every 0.2 s, for ever. The server answers 408 and closes while it trickles."""
    server = servers["short"]
    with connect(server) as sock:
        if after_a_response:
            sock.sendall(head(server) + b"\r\n")
            assert read_response(sock)[0] == 200
        sock.sendall(head(server))
        started = time.monotonic()
        answer = b""
        while time.monotonic() - started < DEADLINE:
            try:
                sock.sendall(b"X-Trickle: 1\r\n")
            except OSError:
                break
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                answer = sock.recv(65536)
                break
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert closed_by_server(sock)
    assert health(server).status_code == 200


def test_idle_keep_alive_connection_is_closed(servers: dict[str, ServerProcess]) -> None:
    server = servers["short"]
    with connect(server) as sock:
        sock.sendall(head(server) + b"\r\n")
        status, headers, _ = read_response(sock)
        assert status == 200 and headers.get("connection") != "close"
        assert closed_by_server(sock)  # KEEP_ALIVE_TIMEOUT_SECONDS=1


def test_connection_that_never_sends_is_closed_quietly(servers: dict[str, ServerProcess]) -> None:
    server = servers["short"]
    with connect(server) as sock:
        sock.settimeout(DEADLINE)
        assert sock.recv(65536) == b""  # closed at the header deadline, without a 408 nobody asked for


# --- denial of service ---------------------------------------------------------------------------------------


def test_one_client_holding_5000_sockets_cannot_deny_service(
    servers: dict[str, ServerProcess], many_files: None
) -> None:
    """5,000 idle sockets from one address, more than the old 4,000 `limit_concurrency`: the first 100 are held,
    the rest get 429 and are closed, and another client's /health and questions are answered meanwhile."""
    server = servers["dos"]
    attacker: list[socket.socket] = []
    try:
        for _ in range(ATTACKER_SOCKETS):
            attacker.append(connect(server, ATTACKER))
        by_fd = {sock.fileno(): sock for sock in attacker}
        poller = select.poll()
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        refused: list[socket.socket] = []  # readable: the server answered and closed
        deadline = time.monotonic() + DEADLINE
        while len(refused) < ATTACKER_SOCKETS - PER_CLIENT_DEFAULT and time.monotonic() < deadline:
            for fd, _ in poller.poll(200):
                poller.unregister(fd)
                refused.append(by_fd[fd])
        assert len(refused) == ATTACKER_SOCKETS - PER_CLIENT_DEFAULT
        assert all(sock.recv(65536).startswith(b"HTTP/1.1 429 ") for sock in refused)
        assert held_connections(server, ATTACKER) == PER_CLIENT_DEFAULT
        with connect(server, ATTACKER) as one_more:
            assert read_response(one_more)[0] == 429

        assert health(server).status_code == 200
        answer = ask(server)
        assert answer.status_code == 200, answer.text
        assert answer.json()["answer"]
    finally:
        for sock in attacker:
            sock.close()
    poll_until(lambda: held_connections(server, ATTACKER) == 0, DEADLINE)
    assert health(server, ATTACKER).status_code == 200  # the attacker's slots were all given back
    assert health(server).status_code == 200


def test_busy_server_still_answers_health_and_sheds_the_rest(servers: dict[str, ServerProcess]) -> None:
    """MAX_CONNECTIONS=20 held by WebSockets: /health is served from the reserve, questions and new WebSockets
    get 503, idle sockets are closed to make room for newcomers; once the WebSockets go, questions are answered."""
    server = servers["full"]
    sockets: list[socket.socket] = []
    try:
        for _ in range(20):
            sock, status = open_websocket(server, ATTACKER)
            sockets.append(sock)
            assert status == 101
        assert health(server).status_code == 200
        shed = ask(server)
        assert shed.status_code == 503 and shed.headers["retry-after"] and shed.headers["connection"] == "close"
        sock, status = open_websocket(server, "127.0.0.1")
        sockets.append(sock)
        assert status == 503

        idle = [connect(server, SCANNER) for _ in range(30)]  # each newcomer closes the longest-idle one
        sockets.extend(idle)
        assert sum(closed_by_server(sock, timeout=5.0) for sock in idle[:25]) == 25
        assert health(server).status_code == 200
    finally:
        for sock in sockets:
            sock.close()
    poll_until(lambda: ask(server).status_code == 200, DEADLINE)


# --- the guard's bookkeeping, in process ---------------------------------------------------------------------


class FakeConnection:
    """A connection for the guard: its transport is itself; eviction gives the slot back."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.evicted = False

    def evict(self) -> None:
        self.evicted = True
        self.guard.release(self)


def test_client_key_counts_ipv6_by_its_64() -> None:
    assert client_key("203.0.113.7") == "203.0.113.7"
    assert client_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")


def test_guard_caps_each_client_and_gives_slots_back() -> None:
    guard = ConnectionGuard(ConnectionLimits(per_client=2, uncapped_networks=(ipaddress.ip_network("10.0.0.0/8"),)))
    first, second, third = (FakeConnection(guard) for _ in range(3))
    assert guard.admit(first, "198.51.100.1") is Admission.ADMITTED
    assert guard.admit(second, "198.51.100.1") is Admission.ADMITTED
    assert guard.admit(third, "198.51.100.1") is Admission.CLIENT_FULL
    assert guard.admit(third, "198.51.100.2") is Admission.ADMITTED  # another client
    guard.release(first)
    guard.release(first)  # twice: counted once
    assert guard.connections_from("198.51.100.1") == 1
    proxy = [FakeConnection(guard) for _ in range(5)]
    assert all(guard.admit(conn, "10.1.2.3") is Admission.ADMITTED for conn in proxy)  # TRUSTED_PROXIES
    assert guard.admit(FakeConnection(guard), None) is Admission.ADMITTED  # a Unix socket
    assert guard.open_connections == 2 + 5 + 1


def test_guard_closes_idle_connections_for_room_then_uses_the_reserve() -> None:
    guard = ConnectionGuard(ConnectionLimits(max_connections=2, reserve=1, per_client=100))
    idle, busy, newcomer, extra, refused = (FakeConnection(guard) for _ in range(5))
    for conn in (idle, busy):
        assert guard.admit(conn, "192.0.2.1") is Admission.ADMITTED
    guard.mark_idle(idle)
    assert guard.admit(newcomer, "192.0.2.2") is Admission.ADMITTED  # at the cap: the idle one made room
    assert idle.evicted
    assert (guard.open_connections, guard.over_capacity) == (2, False)
    guard.mark_busy(newcomer)
    assert guard.admit(extra, "192.0.2.3") is Admission.ADMITTED  # nothing idle: the reserve
    assert (guard.open_connections, guard.over_capacity) == (3, True)
    assert guard.admit(refused, "192.0.2.4") is Admission.SERVER_FULL
    assert not busy.evicted and not newcomer.evicted
