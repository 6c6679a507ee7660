"""With USE_HTTPS=true, plain HTTP is redirected to HTTPS and insecure WebSocket handshakes are refused.

Whether a request came over TLS is judged by the connection's own scheme, or, when the peer is one of
TRUSTED_PROXIES, by what the proxy says the client used (`Forwarded: proto=` or `X-Forwarded-Proto`, the
first entry: the hop the client connected to). A header from any other peer is ignored, so a client cannot
talk its way past the redirect.

- GET and HEAD get `301 Moved Permanently`, every other method `308 Permanent Redirect`, which keeps the
  method and the body (a 301 lets clients turn a POST into a GET).
- The target is `https://<host><path>?<query>`. The host is the request's `Host`, which AllowedHostsMiddleware
  (outside this one) has already checked against ALLOWED_HOSTS; behind a trusted proxy, its
  `X-Forwarded-Host` when that passes ALLOWED_HOSTS too. The port is dropped (HTTPS on 443), and a host that
  is not a plain name or address literal gets 400 instead of a redirect.
- WebSocket handshakes over `ws://` are refused (the client sees 403): browsers do not follow redirects on
  a handshake, and a socket must not silently stay on plain text.
- `/health` and `/health-status` answer over plain HTTP, for probes that address the pod directly.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

from infrastructure.error_format import error_bytes
from infrastructure.rate_limit import Network, from_trusted_proxy
from middleware.hosts import PROBE_PATHS, host_allowed, host_name, parse_allowed_hosts

SECURE_SCHEMES = frozenset({"https", "wss"})
KEEP_METHOD_STATUS = 308
GET_STATUS = 301
# A host name or an IPv4/IPv6 literal, optionally with a port: nothing that could change the URL's meaning.
_PLAIN_HOST = re.compile(r"(?i)^(\[[0-9a-f:.]+\]|[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?)(:[0-9]{1,5})?$")
_FORWARDED_PROTO = re.compile(r'proto="?([a-z][a-z0-9+.-]*)', re.IGNORECASE)


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of request header `name`, decoded as latin-1, or None."""
    return next((value.decode("latin-1") for key, value in scope["headers"] if key == name), None)


def _peer(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


def forwarded_scheme(scope: Scope, trusted: list[Network]) -> str | None:
    """The scheme a trusted proxy says the client used (lower case), or None when there is no such word."""
    if not from_trusted_proxy(_peer(scope), trusted):
        return None
    if (forwarded := _header(scope, b"forwarded")) and (match := _FORWARDED_PROTO.search(forwarded)):
        return match.group(1).lower()
    if proto := _header(scope, b"x-forwarded-proto"):
        return proto.split(",")[0].strip().lower() or None
    return None


def is_secure(scope: Scope, trusted: list[Network]) -> bool:
    """Whether the client reached us over TLS: a trusted proxy's word, else the connection's own scheme."""
    scheme = forwarded_scheme(scope, trusted) or str(scope.get("scheme", "http"))
    return scheme in SECURE_SCHEMES


class HttpsRedirectMiddleware:
    """Pure ASGI. Off unless `enabled` (USE_HTTPS); place it inside AllowedHostsMiddleware."""

    def __init__(self, app: ASGIApp, enabled: bool, trusted_networks: list[Network], allowed_hosts: str) -> None:
        self.app = app
        self.enabled = enabled
        self.trusted_networks = trusted_networks
        self.host_patterns = parse_allowed_hosts(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.enabled or scope["type"] not in ("http", "websocket") or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        if is_secure(scope, self.trusted_networks):
            # Downstream (request.url, url_for) sees the scheme the client used.
            scope["scheme"] = "https" if scope["type"] == "http" else "wss"
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "use wss://"})
            return
        host = self._redirect_host(scope)
        if host is None:
            body = error_bytes(400, "Use HTTPS; this Host cannot be redirected to (see ALLOWED_HOSTS)", "invalid_host")
            await self._respond(send, 400, [(b"content-type", b"application/json")], body)
            return
        target = f"https://{host}{_path_and_query(scope)}"
        status = GET_STATUS if scope["method"] in ("GET", "HEAD") else KEEP_METHOD_STATUS
        await self._respond(send, status, [(b"location", target.encode("latin-1"))], b"")

    def _redirect_host(self, scope: Scope) -> str | None:
        """The host name to redirect to (port dropped), from headers ALLOWED_HOSTS accepts; None if unusable."""
        candidates = []
        if from_trusted_proxy(_peer(scope), self.trusted_networks) and (
            forwarded_host := _header(scope, b"x-forwarded-host")
        ):
            candidates.append(forwarded_host.split(",")[0].strip())
        candidates.append((_header(scope, b"host") or "").strip())
        for candidate in candidates:
            if _PLAIN_HOST.match(candidate) and host_allowed(host_name(candidate), self.host_patterns):
                return host_name(candidate)
        return None

    @staticmethod
    async def _respond(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _path_and_query(scope: Scope) -> str:
    """The request's path (as sent, percent-encoding kept) and query string."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) and raw.startswith(b"/") else scope["path"]
    if not path.startswith("/"):
        path = "/" + path
    query = scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path
