"""The MCP server at `/mcp` (official `mcp` SDK, streamable HTTP): the agent and the knowledge base as tools.

Tools `ask_defi` (the agent's answer, as `/v2/ask` gives it) and `search_knowledge_base` (ranked entries with
their scores), and the resource `defi://topics` (the categories and their entries' questions). The lifespan
builds the server from the services (`build_mcp_server`) and runs its session manager (`run_mcp`);
`McpEndpoint` answers `/mcp` and `/mcp/` with it, after the same API-key rule as `/v1/*`.

The transport is stateless with JSON responses: every request stands alone, so any worker or replica can
serve it. A conversation is the agent's own session, named by the `session_id` each answer returns.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import structlog
from fastapi import FastAPI
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.resources import FunctionResource
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from agents.agent import AgentUnavailableError, DeFiAgent, SessionBusyError
from agents.graph import in_source_order
from agents.validation import InvalidQuestionError, clean_question
from api.deps import api_key_required, charge_request, client_key
from api.schemas import answer_fields
from config import APP_VERSION
from infrastructure.error_format import error_body
from infrastructure.rate_limit import RateLimitExceededError
from services.embedding_providers import EmbeddingError
from services.embeddings import EmbeddingService
from services.knowledge import LiveKnowledge
from services.sessions import SessionStoreUnavailableError
from services.sources import ProcessingStage, Source

logger = structlog.get_logger(__name__)

MCP_PATH = "/mcp"
TOPICS_URI = "defi://topics"
SEARCH_MAX_RESULTS = 20
_SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
# The app checks the Host header (ALLOWED_HOSTS) and this module the Origin (ALLOWED_ORIGINS); the SDK's own check
# would allow only loopback host names.
_APP_CHECKS_HOSTS = TransportSecuritySettings(enable_dns_rebinding_protection=False)


class McpAnswer(BaseModel):
    """What `ask_defi` returns: the fields of `/v2/ask`'s answer."""

    answer: str
    confidence: float = Field(description="The best entry's similarity in [0, 1].")
    processing_stage: ProcessingStage = Field(description="`response_complete`, or `no_match` for a decline.")
    sources: list[Source] = Field(description="The knowledge-base entries the answer was drawn from, best first.")
    session_id: str | None = Field(description="Pass it back with the next question to ask a follow-up.")
    answer_id: str = Field(description="This answer's id (for POST /v2/feedback).")
    kb_version: int | None = Field(description="The knowledge-base version that answered.")
    unknown_terms: list[str] = Field(description="Names in the question the knowledge base never mentions.")
    error: str | None = None


class KnowledgeMatch(BaseModel):
    """One ranked knowledge-base entry."""

    id: str
    category: str
    question: str
    subjects: list[str]
    score: float = Field(description="Similarity to the query in [0, 1] (what the agent's threshold is applied to).")


class KnowledgeSearch(BaseModel):
    """What `search_knowledge_base` returns."""

    query: str
    kb_version: int
    results: list[KnowledgeMatch] = Field(
        description="The entry the agent would answer from first, then the others by score, highest first."
    )


def build_mcp_server(
    agent: DeFiAgent, knowledge: LiveKnowledge, embeddings: EmbeddingService, question_max_chars: int
) -> MCPServer[Any]:
    """The MCP server over the app's services (built by the lifespan once they exist)."""
    server: MCPServer[Any] = MCPServer(
        "defi-qa",
        title="DeFi Q&A Bot",
        version=APP_VERSION,
        instructions=(
            "Answers questions about decentralized finance from a curated knowledge base. Use ask_defi for an "
            "answer with its sources (pass the returned session_id back for follow-up questions), "
            f"search_knowledge_base to see which entries match a query, and the {TOPICS_URI} resource for the "
            "topics covered."
        ),
    )

    async def ask_defi(
        question: Annotated[str, Field(description="The question (at most QUESTION_MAX_CHARS characters).")],
        ctx: Context[Any, Any],
        session_id: Annotated[
            str | None,
            Field(
                pattern=_SESSION_ID_PATTERN,
                description="The session_id of an earlier answer, to ask a follow-up; omit it to start a session.",
            ),
        ] = None,
    ) -> McpAnswer:
        """Answer a question about DeFi from the knowledge base, with the entries it was drawn from.

        Follow-ups ("what are its risks?") resolve against the previous question of the same session_id.
        Questions outside DeFi are declined (processing_stage `no_match`). Each call spends one question of
        the client's rate-limit budget.
        """
        request = await _charge(ctx)
        try:
            accepted = await agent.accept(
                question, session_id, new_session=True, owner=client_key(request), transport="mcp"
            )
            return McpAnswer.model_validate(answer_fields(await agent.answer(accepted)))
        except InvalidQuestionError as error:
            raise ToolError(f"{error.code}: {error.detail}") from None
        except SessionBusyError as error:
            raise ToolError(f"session_busy: {error}") from None
        except (AgentUnavailableError, SessionStoreUnavailableError) as error:
            raise ToolError(f"service_unavailable: {error}") from None

    async def search_knowledge_base(
        query: Annotated[str, Field(description="What to look for (at most QUESTION_MAX_CHARS characters).")],
        ctx: Context[Any, Any],
        k: Annotated[
            int, Field(ge=1, le=SEARCH_MAX_RESULTS, description=f"How many entries, 1 to {SEARCH_MAX_RESULTS}.")
        ] = 5,
    ) -> KnowledgeSearch:
        """The knowledge-base entries that best match a query, with their similarity scores.

        In the order of an answer's sources: first the entry the agent would answer from, then the others by
        score, highest first. Each call spends one question of the client's rate-limit budget.
        """
        await _charge(ctx)
        try:
            text = clean_question(query, question_max_chars)
            vector = await embeddings.embed_query(text)
        except InvalidQuestionError as error:
            raise ToolError(f"{error.code}: {error.detail.replace('question', 'query', 1)}") from None
        except EmbeddingError:
            raise ToolError("service_unavailable: the embedding model is unavailable; retry shortly") from None
        snapshot = knowledge.current
        matches = await asyncio.to_thread(snapshot.retriever.search, vector, text, k)
        return KnowledgeSearch(
            query=text,
            kb_version=snapshot.version,
            results=[
                KnowledgeMatch(
                    id=match.entry.id,
                    category=match.entry.category,
                    question=match.entry.question,
                    subjects=list(match.entry.subjects),
                    score=round(match.score, 4),
                )
                for match in in_source_order(matches)
            ],
        )

    def topics() -> str:
        """The categories of the knowledge base, each with its entries (id, question, subjects)."""
        snapshot = knowledge.current
        categories: dict[str, list[dict[str, Any]]] = {}
        for entry in snapshot.knowledge_base.entries:
            categories.setdefault(entry.category, []).append(
                {"id": entry.id, "question": entry.question, "subjects": list(entry.subjects)}
            )
        listing = [{"category": name, "entries": entries} for name, entries in sorted(categories.items())]
        return json.dumps({"kb_version": snapshot.version, "categories": listing}, ensure_ascii=False)

    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)
    for tool, title in ((ask_defi, "Ask the DeFi Q&A Bot"), (search_knowledge_base, "Search the DeFi knowledge base")):
        server.add_tool(tool, title=title, description=inspect.getdoc(tool), annotations=read_only)
    server.add_resource(
        FunctionResource.from_function(
            topics, uri=TOPICS_URI, name="topics", title="DeFi topics covered", mime_type="application/json"
        )
    )
    return server


@asynccontextmanager
async def run_mcp(server: MCPServer[Any]) -> AsyncIterator[StreamableHTTPSessionManager]:
    """Run the server's streamable-HTTP session manager for the lifespan of the app, and yield it.

    A manager runs once: each run gets a fresh one (the SDK builds it with `streamable_http_app`, whose
    Starlette wrapper is not used). Leaving cancels the MCP requests still in flight.
    """
    # The transport logs "Terminating session: None" at INFO after every stateless request: the access log says it.
    logging.getLogger("mcp.server.streamable_http").setLevel(logging.WARNING)
    server.streamable_http_app(stateless_http=True, json_response=True, transport_security=_APP_CHECKS_HOSTS)
    manager = server.session_manager
    async with manager.run():
        yield manager


class McpEndpoint:
    """The ASGI app at `/mcp` and `/mcp/`: API key (with API_KEYS) and Origin checks, then the session manager
    the lifespan put on `app.state.mcp`.

    Only POST is served: a stateless server has no stream of its own to offer on GET (the SDK would hold
    one open that never carries anything) and no session to end on DELETE, so both get MCP's 405.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        connection = HTTPConnection(scope)
        if api_key_required(connection):
            detail = "This endpoint requires an API key: 'Authorization: Bearer <key>'"
            response = JSONResponse(error_body(401, detail), 401, headers={"WWW-Authenticate": "Bearer"})
        elif not _origin_allowed(connection):
            response = JSONResponse(error_body(403, "Origin not allowed (ALLOWED_ORIGINS)"), 403)
        elif scope["method"] != "POST":
            detail = f"Method {scope['method']} is not allowed on {scope['path']}: MCP requests are POSTed"
            response = JSONResponse(error_body(405, detail), 405, headers={"Allow": "POST"})
        elif not connection.headers.get("content-type", "").lower().startswith("application/json"):
            response = JSONResponse(error_body(415, "MCP requests are JSON ('Content-Type: application/json')"), 415)
        else:
            manager: StreamableHTTPSessionManager = connection.app.state.mcp
            await manager.handle_request(scope, receive, send)
            return
        await response(scope, receive, send)


def mount_mcp(app: FastAPI) -> None:
    """Serve MCP at `/mcp` and `/mcp/` alike (the app never redirects slashes)."""
    endpoint = McpEndpoint()
    app.router.routes.extend(
        [Route(MCP_PATH, endpoint, include_in_schema=False), Route(f"{MCP_PATH}/", endpoint, include_in_schema=False)]
    )


def _origin_allowed(connection: HTTPConnection) -> bool:
    """No Origin (not a browser), or one of ALLOWED_ORIGINS: MCP's defence against DNS rebinding."""
    origin = connection.headers.get("origin")
    allowed: list[str] = connection.app.state.settings.allowed_origins
    return origin is None or "*" in allowed or origin in allowed


async def _charge(ctx: Context[Any, Any]) -> Request:
    """Spend one question of the caller's budget (ToolError `rate_limited` when it is spent); the HTTP request.

    The X-RateLimit-* headers go on the HTTP response, as on the question endpoints.
    """
    request = ctx.request_context.request
    if not isinstance(request, Request):  # pragma: no cover - this server is only reachable over HTTP
        raise ToolError("this tool is served over HTTP only")
    try:
        await charge_request(request, MCP_PATH)
    except RateLimitExceededError as error:
        raise ToolError(f"rate_limited: {error.detail}") from None
    return request
