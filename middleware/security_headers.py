"""Security headers on every HTTP response; a strict Content-Security-Policy on HTML pages.

With USE_HTTPS=true, `Strict-Transport-Security` goes on responses to requests that arrived over TLS (judged
as in middleware/https_redirect.py): RFC 6797 section 7.2 forbids it on plain-HTTP responses, which browsers
ignore anyway.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infrastructure.rate_limit import Network
from middleware.https_redirect import is_secure

_BASE_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
_HTML_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; "
    b"connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HSTS = (b"strict-transport-security", b"max-age=31536000; includeSubDomains")


class SecurityHeadersMiddleware:
    """Pure ASGI, so streaming responses pass through untouched."""

    def __init__(self, app: ASGIApp, use_https: bool, trusted_networks: list[Network] | None = None) -> None:
        self.app = app
        self.use_https = use_https
        self.trusted_networks = trusted_networks or []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hsts = self.use_https and is_secure(scope, self.trusted_networks)

        async def add_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(header for header in _BASE_HEADERS if header[0] not in present)
                content_type = next((value for name, value in headers if name.lower() == b"content-type"), b"")
                if content_type.startswith(b"text/html"):
                    headers.append((b"content-security-policy", _HTML_CSP))
                if hsts:
                    headers.append(_HSTS)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, add_headers)
