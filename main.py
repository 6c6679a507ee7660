"""DeFi Q&A Bot: the app factory, its lifespan, and `python main.py` to serve it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
import uvicorn
from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from api.mcp_server import build_mcp_server, mount_mcp, run_mcp
from api.monitoring import Monitoring, warn_if_operator_endpoints_open
from api.routes import admin, ask, feedback, health, knowledge_admin, openai_api, operations, stream, ui, websocket
from bootstrap import build_rate_limiter, load_seed_or_exit, start_services, stop_services
from config import APP_VERSION, Settings, get_settings
from infrastructure.http_server import LimitedHttpToolsProtocol, LimitedWebSocketProtocol
from infrastructure.logging import configure_logging
from infrastructure.metrics import mark_process_dead, multiprocess_metrics
from infrastructure.rate_limit import parse_networks
from infrastructure.system_stats import SystemSampler
from middleware.body_limit import BodySizeLimitMiddleware
from middleware.errors import install_error_handlers
from middleware.hosts import AllowedHostsMiddleware
from middleware.https_redirect import HttpsRedirectMiddleware
from middleware.request_context import RequestContextMiddleware
from middleware.security_headers import SecurityHeadersMiddleware
from middleware.unhandled import UnhandledErrorMiddleware

logger = structlog.get_logger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Build the services once (bootstrap.py), put each on `app.state`, release them at shutdown."""
    settings: Settings = app.state.settings
    services = await start_services(settings, app.state.monitoring)
    state = app.state
    state.redis = services.redis
    state.embeddings = services.embeddings
    state.knowledge = services.knowledge
    state.sessions = services.sessions
    state.answer_cache = services.answer_cache
    state.agent = services.agent
    state.database = services.database
    state.question_log = services.question_log
    state.feedback = services.feedback
    state.insights = services.insights
    state.knowledge_manager = services.knowledge_manager
    warn_if_operator_endpoints_open(settings)
    logger.info("service_ready", host=settings.host, port=settings.port, environment=settings.environment)
    mcp = build_mcp_server(services.agent, services.knowledge, services.embeddings, settings.question_max_chars)
    try:
        async with run_mcp(mcp) as state.mcp:  # the MCP session manager runs inside the services' lifetime
            yield
    finally:
        await stop_services(services)
        mark_process_dead()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the FastAPI application."""
    settings = settings or get_settings()
    configure_logging(
        settings.log_level,
        settings.enable_console_logs,
        settings.log_dir or None,
        settings.log_question_max_chars,
    )
    docs = settings.enable_docs and not settings.is_production
    app = FastAPI(
        title="DeFi Q&A Bot",
        version=APP_VERSION,
        description="Answers questions about decentralized finance from a curated knowledge base, offline.",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
        debug=settings.debug,
    )
    app.state.settings = settings
    app.state.redis = None  # the shared Redis pool, created by the lifespan when REDIS_URL is set
    app.state.rate_limiter = build_rate_limiter(settings)
    app.state.trusted_networks = parse_networks(settings.trusted_proxies)
    app.state.monitoring = Monitoring(system=SystemSampler(settings.cache_dir))
    load_seed_or_exit(settings)  # a bad dataset file stops the process (exit 2) before anything is built
    install_error_handlers(app)
    # No trailing-slash redirects: `/metrics/` is a 404, and no Location is ever built from the Host header.
    app.router.redirect_slashes = False
    # Listed innermost first. Outermost to innermost: request id, access log, security headers, allowed hosts,
    # HTTPS redirect (USE_HTTPS; its Location uses a Host already allowed), CORS, unexpected errors (a 500 passes
    # through every layer above, so it carries their headers), body limit.
    app.add_middleware(
        BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes, admin_max_bytes=settings.admin_max_body_bytes
    )
    app.add_middleware(UnhandledErrorMiddleware)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.allowed_origins,
        allow_credentials="*" not in settings.allowed_origins,
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=["Content-Type", "Authorization", "X-Request-ID"],
        expose_headers=["X-Request-ID", "X-Session-ID", "Retry-After"],
    )
    app.add_middleware(
        HttpsRedirectMiddleware,
        enabled=settings.use_https,
        trusted_networks=app.state.trusted_networks,
        allowed_hosts=settings.allowed_hosts,
    )
    app.add_middleware(AllowedHostsMiddleware, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(
        SecurityHeadersMiddleware, use_https=settings.use_https, trusted_networks=app.state.trusted_networks
    )
    app.add_middleware(RequestContextMiddleware, window=app.state.monitoring.requests)
    app.add_middleware(CorrelationIdMiddleware, header_name="X-Request-ID")
    app.include_router(health.router)
    app.include_router(ask.router)
    app.include_router(feedback.router)
    app.include_router(stream.router)
    app.include_router(openai_api.router)
    app.include_router(websocket.router)
    app.include_router(operations.router)
    app.include_router(knowledge_admin.router)
    app.include_router(admin.router)
    app.include_router(ui.router)
    mount_mcp(app)
    return app


app = create_app()


def run() -> None:
    """Serve with uvicorn on HOST:PORT, with the timeouts and limits documented in docs/deployment.md."""
    settings = get_settings()
    with multiprocess_metrics(enabled=settings.workers > 1 and not settings.reload):
        uvicorn.run(
            app if settings.workers == 1 and not settings.reload else "main:app",
            host=settings.host,
            port=settings.port,
            reload=settings.reload,
            workers=None if settings.reload else settings.workers,
            log_config=None,
            access_log=False,
            proxy_headers=False,  # forwarded headers are honoured by the app, from TRUSTED_PROXIES only
            # httptools with per-client and total connection caps, a header size cap and a header deadline
            # (infrastructure/http_server.py). It replaces uvicorn's limit_concurrency, which answered 503 to
            # every request, /health included, once idle sockets filled it: MAX_CONNECTIONS with a reserve
            # for the operator endpoints, and idle connections closed to make room.
            http=LimitedHttpToolsProtocol,
            timeout_keep_alive=settings.keep_alive_timeout_seconds,
            timeout_graceful_shutdown=settings.graceful_shutdown_seconds,
            # uvicorn's sans-I/O "websockets" implementation (one task and two timers per socket), which gives
            # the client's connection slot back when the socket closes, drains at shutdown and closes invalid
            # UTF-8 with 1007 without logging a traceback.
            ws=LimitedWebSocketProtocol,
            ws_max_size=1024 * 1024,
            ws_ping_interval=20,
            ws_ping_timeout=20,
            # A worker imports the app (model, dataset) before it can answer the supervisor's ping: the 5 s
            # default gets slow starts killed and restarted in a loop.
            timeout_worker_healthcheck=60,
        )


if __name__ == "__main__":
    run()
