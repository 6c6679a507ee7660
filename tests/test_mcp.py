"""The MCP server at /mcp, driven over streamable HTTP by the `mcp` SDK's own client against a real server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, TextContent, TextResourceContents

from tests.conftest import ServerProcess

LIQUIDATIONS = "How does Aave handle liquidations?"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}},
}
MCP_ACCEPT = {"Accept": "application/json, text/event-stream"}


@asynccontextmanager
async def mcp_session(url: str, headers: dict[str, str] | None = None) -> AsyncIterator[ClientSession]:
    """An initialized MCP client session on `url` (streamable HTTP), with extra HTTP headers."""
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def structured(result: CallToolResult) -> dict[str, Any]:
    """A successful tool result's structured content, checked against its JSON text."""
    assert not result.is_error, result.content
    assert result.structured_content is not None
    text = result.content[0]
    assert isinstance(text, TextContent)
    assert json.loads(text.text) == result.structured_content
    return result.structured_content


def error_text(result: CallToolResult) -> str:
    """A failed tool result's message."""
    assert result.is_error
    text = result.content[0]
    assert isinstance(text, TextContent)
    return text.text


def ask(server: ServerProcess, question: str) -> dict[str, Any]:
    response = httpx.post(f"{server.base_url}/ask", json={"question": question}, timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# --- the default server -----------------------------------------------------------------------------------------


async def test_both_tools_are_listed_with_their_input_schemas(server: ServerProcess) -> None:
    async with mcp_session(f"{server.base_url}/mcp") as session:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
    assert set(tools) == {"ask_defi", "search_knowledge_base"}
    ask_schema = tools["ask_defi"].input_schema
    assert ask_schema["required"] == ["question"]
    assert set(ask_schema["properties"]) == {"question", "session_id"}
    search_schema = tools["search_knowledge_base"].input_schema
    assert search_schema["required"] == ["query"]
    k = search_schema["properties"]["k"]
    assert (k["type"], k["minimum"], k["maximum"], k["default"]) == ("integer", 1, 20, 5)
    assert all(tool.description and tool.output_schema for tool in tools.values())


async def test_ask_defi_answers_as_ask_does(server: ServerProcess) -> None:
    question = "What is impermanent loss?"
    expected = ask(server, question)
    async with mcp_session(f"{server.base_url}/mcp") as session:
        answer = structured(await session.call_tool("ask_defi", {"question": question}))
    assert answer["answer"] == expected["answer"]
    assert answer["confidence"] == expected["confidence"]
    assert answer["processing_stage"] == "response_complete"
    assert answer["sources"] and answer["sources"] == expected["sources"]
    assert answer["session_id"] and answer["answer_id"] and answer["kb_version"] == expected["kb_version"]


async def test_a_follow_up_with_the_session_id_keeps_the_subject(server: ServerProcess) -> None:
    async with mcp_session(f"{server.base_url}/mcp") as session:
        first = structured(await session.call_tool("ask_defi", {"question": LIQUIDATIONS}))
        follow_up = structured(
            await session.call_tool("ask_defi", {"question": "what are its risks?", "session_id": first["session_id"]})
        )
    assert follow_up["session_id"] == first["session_id"]
    assert follow_up["sources"][0]["id"] == "aave-risks"
    turns = httpx.get(f"{server.base_url}/v2/sessions/{first['session_id']}", timeout=10).json()["turns"]
    assert [turn["question"] for turn in turns] == [LIQUIDATIONS, "what are its risks?"]


@pytest.mark.parametrize("query", ["What is impermanent loss?", "how do flash loans work", "is lido safe"])
async def test_search_ranks_entries_as_the_answers_sources(server: ServerProcess, query: str) -> None:
    sources = ask(server, query)["sources"]  # AGENT_MAX_RESULTS (5) entries, the answer's first
    async with mcp_session(f"{server.base_url}/mcp") as session:
        found = structured(await session.call_tool("search_knowledge_base", {"query": query, "k": 3}))
        default = structured(await session.call_tool("search_knowledge_base", {"query": query}))
        most = structured(await session.call_tool("search_knowledge_base", {"query": query, "k": 20}))
    assert [len(result["results"]) for result in (found, default, most)] == [3, 5, 20]
    assert [(hit["id"], hit["score"]) for hit in default["results"]] == [(s["id"], s["score"]) for s in sources]
    for search in (found, default, most):
        results = search["results"]
        assert results[0]["id"] == sources[0]["id"]  # the entry the agent answers from comes first
        scores = [hit["score"] for hit in results[1:]]
        assert scores == sorted(scores, reverse=True) and all(0 <= score <= 1 for score in scores)
        assert all(hit["category"] and hit["question"] for hit in results)


async def test_the_topics_resource_lists_every_entry_by_category(server: ServerProcess) -> None:
    async with mcp_session(f"{server.base_url}/mcp") as session:
        listed = [str(resource.uri) for resource in (await session.list_resources()).resources]
        read = await session.read_resource("defi://topics")
    assert listed == ["defi://topics"]
    content = read.contents[0]
    assert isinstance(content, TextResourceContents) and content.mime_type == "application/json"
    topics = json.loads(content.text)
    entries = [entry for category in topics["categories"] for entry in category["entries"]]
    health = httpx.get(f"{server.base_url}/health", timeout=10).json()
    assert f"with {len(entries)} knowledge-base entries" in health["message"]
    assert len({category["category"] for category in topics["categories"]}) == len(topics["categories"]) > 1
    assert "aave-risks" in {entry["id"] for entry in entries}
    assert all(entry["question"] for entry in entries)


@pytest.mark.parametrize(
    ("tool", "arguments", "message"),
    [
        ("ask_defi", {"question": "   "}, "question_empty"),
        ("ask_defi", {"question": "x" * 1001}, "question_too_long"),
        ("ask_defi", {"question": 42}, "question"),
        ("ask_defi", {}, "question"),
        ("ask_defi", {"question": "What is Aave?", "session_id": "not a valid id!"}, "session_id"),
        ("search_knowledge_base", {"query": ""}, "question_empty"),
        ("search_knowledge_base", {"query": "aave", "k": 0}, "k"),
        ("search_knowledge_base", {"query": "aave", "k": 21}, "k"),
        ("search_knowledge_base", {"query": "aave", "k": "many"}, "k"),
        ("no_such_tool", {"question": "What is Aave?"}, "Unknown tool"),
    ],
)
async def test_bad_tool_input_is_a_tool_error(
    server: ServerProcess, tool: str, arguments: dict[str, Any], message: str
) -> None:
    async with mcp_session(f"{server.base_url}/mcp") as session:
        result = await session.call_tool(tool, arguments)
        assert message in error_text(result)
        # the session and the server go on serving
        assert structured(await session.call_tool("search_knowledge_base", {"query": "aave", "k": 1}))["results"]


async def test_an_unknown_resource_is_a_json_rpc_error(server: ServerProcess) -> None:
    async with mcp_session(f"{server.base_url}/mcp") as session:
        with pytest.raises(MCPError):
            await session.read_resource("defi://nothing-here")
        assert (await session.list_tools()).tools


def test_malformed_requests_get_json_rpc_errors_never_a_500(server: ServerProcess) -> None:
    url = f"{server.base_url}/mcp"
    headers = {**MCP_ACCEPT, "Content-Type": "application/json"}
    with httpx.Client(timeout=30) as http:
        bad_json = http.post(url, content=b"{not json", headers=headers)
        unknown_method = http.post(url, json={"jsonrpc": "2.0", "id": 7, "method": "no/such/method"}, headers=headers)
        bad_params = http.post(
            url, json={"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": 5}}, headers=headers
        )
        not_json = http.post(url, content=b"{}", headers={**MCP_ACCEPT, "Content-Type": "text/plain"})
        stream = http.get(url, headers=MCP_ACCEPT)
        end_session = http.delete(url, headers=MCP_ACCEPT)
        assert http.get(f"{server.base_url}/health").status_code == 200
    for response in (bad_json, unknown_method, bad_params):
        assert response.status_code < 500, response.text
        assert response.json()["error"]["code"] < 0  # a JSON-RPC error object
    assert unknown_method.json()["id"] == 7
    # refused before the SDK, in the app's error format: no body type, no stream on GET, no session to DELETE
    assert (not_json.status_code, not_json.json()["reason"]) == (415, "unsupported_media_type")
    for response in (stream, end_session):
        assert (response.status_code, response.headers["Allow"]) == (405, "POST")
        assert response.json()["reason"] == "method_not_allowed"


def test_both_paths_serve_with_the_apps_headers(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        for path in ("/mcp", "/mcp/"):
            response = http.post(path, json=INITIALIZE, headers={**MCP_ACCEPT, "X-Request-ID": "a" * 32})
            assert response.status_code == 200, (path, response.text)
            assert response.json()["result"]["serverInfo"]["name"] == "defi-qa"
            assert response.headers["X-Request-ID"] == "a" * 32
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        # a browser page from an origin outside ALLOWED_ORIGINS (DNS rebinding) is refused; an allowed one is served
        foreign = http.post("/mcp", json=INITIALIZE, headers={**MCP_ACCEPT, "Origin": "http://evil.example"})
        allowed = http.post("/mcp", json=INITIALIZE, headers={**MCP_ACCEPT, "Origin": "http://localhost:3000"})
        assert (foreign.status_code, foreign.json()["reason"]) == (403, "forbidden")
        assert allowed.status_code == 200
        # a tool call is a question: its response carries the budget, as /ask's does
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call"}
        call["params"] = {"name": "ask_defi", "arguments": {"question": "What is Aave?"}}
        answered = http.post("/mcp", json=call, headers=MCP_ACCEPT)
        assert answered.json()["result"]["structuredContent"]["answer"]
        assert int(answered.headers["X-RateLimit-Remaining"]) < int(answered.headers["X-RateLimit-Limit"])
        # the routes next to it are untouched
        assert http.get("/mcpx").status_code == 404
        assert http.post("/ask", json={"question": "What is Aave?"}).status_code == 200


# --- API keys and the question budget -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """A server with client keys and a budget of three questions per client."""
    return start_server(API_KEYS="alpha-key,beta-key,gamma-key", RATE_LIMIT_REQUESTS_PER_MINUTE="3")


async def test_without_a_valid_key_mcp_is_refused(keyed: ServerProcess) -> None:
    url = f"{keyed.base_url}/mcp"
    with httpx.Client(timeout=30) as http:
        missing = http.post(url, json=INITIALIZE, headers=MCP_ACCEPT)
        wrong = http.post(url, json=INITIALIZE, headers={**MCP_ACCEPT, "Authorization": "Bearer nope"})
        good = http.post(url, json=INITIALIZE, headers={**MCP_ACCEPT, "Authorization": "Bearer alpha-key"})
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.json()["reason"] == "unauthorized"
    assert good.status_code == 200
    # the SDK's client reports the refused handshake as an MCPError (inside its task groups' exception groups)
    with pytest.raises(BaseExceptionGroup) as refused:
        async with mcp_session(url) as session:
            await session.list_tools()
    assert refused.value.subgroup(lambda error: isinstance(error, MCPError)) is not None


async def test_with_a_key_the_tools_work_and_spend_its_budget(keyed: ServerProcess) -> None:
    url = f"{keyed.base_url}/mcp"
    async with mcp_session(url, {"Authorization": "Bearer beta-key"}) as session:
        answer = structured(await session.call_tool("ask_defi", {"question": "What is Aave?"}))
        found = structured(await session.call_tool("search_knowledge_base", {"query": "aave", "k": 2}))
        again = structured(await session.call_tool("ask_defi", {"question": "What is Aave?"}))
        refused = await session.call_tool("ask_defi", {"question": "What is Aave?"})
        assert (await session.read_resource("defi://topics")).contents  # reading is not a question
    assert answer["answer"] == again["answer"] and len(found["results"]) == 2
    assert "rate_limited" in error_text(refused)
    # the budget is the key's: another key still has its own
    async with mcp_session(url, {"Authorization": "Bearer gamma-key"}) as session:
        assert structured(await session.call_tool("ask_defi", {"question": "What is Aave?"}))["answer"]
    # and the REST endpoints need no key (API_KEYS_REQUIRED_EVERYWHERE is off)
    assert httpx.post(f"{keyed.base_url}/ask", json={"question": "What is Aave?"}, timeout=30).status_code == 200
