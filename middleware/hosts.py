"""Serve only the host names in ALLOWED_HOSTS; any other `Host` header gets 400 in the project's error format.

Like Starlette's `TrustedHostMiddleware`, but with the project's JSON body, IPv6 literals (`[::1]:8000`)
understood, no `www.` redirect, and the probe paths exempt: orchestrators probe a pod by its IP address,
and `/health` / `/health-status` build nothing from the Host header.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from infrastructure.error_format import send_error

PROBE_PATHS = frozenset({"/health", "/health-status"})
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})


def parse_allowed_hosts(value: str) -> tuple[str, ...]:
    """ALLOWED_HOSTS (comma list) as lower-case patterns: `name`, `[v6]`, `*.domain` (any subdomain), `*` (any).

    A port given with a name is ignored: the check is on names.
    """
    items = (item.strip().lower() for item in value.split(","))
    return tuple(item if item.startswith("*") else host_name(item) for item in items if item)


def host_name(header: str) -> str:
    """The name part of a Host header, lower case, without port or trailing dot (`[::1]` kept bracketed)."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end != -1 else value
    return value.partition(":")[0].rstrip(".")


def host_allowed(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether `name` matches one of `patterns` (`*.example.com` matches `a.example.com`, not `example.com`)."""
    for pattern in patterns:
        if pattern == "*" or pattern == name:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
            return True
    return False


class AllowedHostsMiddleware:
    """Pure ASGI. HTTP: 400 `invalid_host`; WebSocket: closed before the handshake (the client sees 403)."""

    def __init__(self, app: ASGIApp, allowed_hosts: str) -> None:
        self.app = app
        self.patterns = parse_allowed_hosts(allowed_hosts)
        self.any_host = "*" in self.patterns

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.any_host or scope["type"] not in ("http", "websocket") or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        header = next((value for name, value in scope["headers"] if name == b"host"), b"")
        name = host_name(header.decode("latin-1"))
        if host_allowed(name, self.patterns):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        shown = name[:100] or "(none)"
        await send_error(send, 400, f"Host {shown!r} is not served here (see ALLOWED_HOSTS)", "invalid_host")
