"""The question-answering graph: understand -> search -> compose (extractive mode).

Nodes are async functions over the typed state that return only the keys they change. When the
caller streams (`streaming=True`), `compose` writes `metadata` and `word` events through LangGraph's
custom stream; `ainvoke` callers get the final state and no events. Steps are only as fine as they
need to be: each node, and each conditional edge, costs a fixed ~0.1-0.26 ms of CPU in LangGraph
(docs/performance.md), as much as the ranking of a question in a batch.

In generative mode a conditional edge after `search` sends a matched question to `generate` instead: a
chat model writes the answer from the top entries, and the node streams it as whole words while it is
generated (its `metadata` comes first, with `total_words` null because the length is not known yet). If
the model fails, the extractive answer is used and `error` says why.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import structlog
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph

from agents.followup import resolve_follow_up
from agents.state import AgentState, InputState
from agents.validation import clean_question
from agents.words import WordRegrouper
from infrastructure.metrics import AGENT_NODE_DURATION, ANSWER_GENERATIONS
from services.embeddings import EmbeddingService
from services.generation import AnswerGenerator, GenerationError, Passage
from services.retrieval import BatchedRetriever, Match

logger = structlog.get_logger(__name__)

NO_MATCH_PREFIX = "I don't have a reliable answer to that."
SUGGESTION_COUNT = 3
INTERRUPTED_NOTICE = "[The generated answer was interrupted; the knowledge base answer follows.]"


class Node(Protocol):
    """An async graph node: takes the state, returns the keys it changes."""

    def __call__(self, state: AgentState) -> Awaitable[dict[str, Any]]: ...


@dataclass(frozen=True)
class AgentSettings:
    """The knobs the graph reads."""

    similarity_threshold: float
    max_results: int
    question_max_chars: int
    word_delay_seconds: float
    context_entries: int = 3


def _timed(name: str, node: Node) -> Node:
    @functools.wraps(node)
    async def run(state: AgentState) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            return await node(state)
        finally:
            AGENT_NODE_DURATION.labels(node=name).observe(time.perf_counter() - started)

    return run


def no_match_answer(suggestions: list[Match]) -> str:
    """The honest decline, with up to three closest topics to try instead."""
    if not suggestions:
        return f"{NO_MATCH_PREFIX} I can only answer questions about decentralized finance (DeFi)."
    topics = "; ".join(f'"{match.entry.question}"' for match in suggestions[:SUGGESTION_COUNT])
    return (
        f"{NO_MATCH_PREFIX} I answer questions about decentralized finance (DeFi) from a curated "
        f"knowledge base. Closest topics I know about: {topics}"
    )


def _sources(matches: list[Match]) -> list[dict[str, object]]:
    return [
        {"id": match.entry.id, "question": match.entry.question, "score": round(match.score, 4)} for match in matches
    ]


def _unknown_citations(words: list[str], entries: int) -> list[int]:
    """Citation numbers [n] in the answer that point at no entry the model was shown."""
    numbers = {int(number) for number in re.findall(r"\[(\d+)\]", " ".join(words))}
    return sorted(number for number in numbers if not 1 <= number <= entries)


def build_graph(
    embeddings: EmbeddingService,
    retriever: BatchedRetriever,
    settings: AgentSettings,
    generator: AnswerGenerator | None = None,
) -> CompiledStateGraph[AgentState, None, InputState, AgentState]:
    """Compile the agent graph over the given services (`generator`: generative answers, else extractive)."""

    async def understand(state: AgentState) -> dict[str, Any]:
        """Validate the question again (the graph is safe on its own), then resolve a follow-up."""
        question = clean_question(state["question"], settings.question_max_chars)
        previous = state.get("previous_question")
        candidates = [resolve_follow_up(question, previous), question]
        if generator is not None and previous:
            try:
                rewritten = await generator.rewrite(question, previous)
            except GenerationError as error:
                logger.warning("follow_up_rewrite_failed", reason=error.reason)
                rewritten = None
            if rewritten:
                candidates.insert(0, rewritten[: settings.question_max_chars])
        return {"question": question, "candidates": list(dict.fromkeys(candidates))}

    async def search(state: AgentState) -> dict[str, Any]:
        """Embed every candidate (through the caches), rank them all, keep the one whose best entry scores higher."""
        candidates = state["candidates"]
        vectors = await asyncio.gather(*(embeddings.embed_query(text) for text in candidates))
        best_text, best_matches = "", list[Match]()
        ranked = await retriever.search(vectors, candidates)
        for text, matches in zip(candidates, ranked, strict=True):
            if not best_matches or (matches and matches[0].score > best_matches[0].score):
                best_text, best_matches = text, matches
        confidence = best_matches[0].score if best_matches else 0.0
        return {"resolved_question": best_text, "matches": best_matches, "confidence": round(confidence, 4)}

    def matched(state: AgentState) -> bool:
        return bool(state["matches"]) and state["confidence"] >= settings.similarity_threshold

    # async: LangGraph runs a plain function router in its thread pool, a round trip per question.
    async def decide(state: AgentState) -> Literal["compose", "generate"]:
        return "generate" if matched(state) else "compose"

    async def emit(state: AgentState, answer: str, sources: list[dict[str, object]]) -> None:
        """When streaming: one `metadata` event, then one `word` event per word of the finished answer."""
        if not state.get("streaming"):
            return
        write = get_stream_writer()
        words = answer.split()
        confidence = state["confidence"]
        write(
            {
                "type": "metadata",
                "session_id": state.get("session_id"),
                "total_words": len(words),
                "confidence": confidence,
                "sources": sources,
            }
        )
        for index, word in enumerate(words):
            if settings.word_delay_seconds > 0:
                await asyncio.sleep(settings.word_delay_seconds)
            write({"type": "word", "content": word, "index": index, "confidence": confidence})

    async def compose(state: AgentState) -> dict[str, Any]:
        """The top entry's answer when it clears the threshold, else the honest decline with suggestions."""
        if matched(state):
            answer, sources, stage = state["matches"][0].entry.answer, _sources(state["matches"]), "response_complete"
        else:
            answer, sources, stage = no_match_answer(state["matches"]), [], "no_match"
        await emit(state, answer, sources)
        return {"answer": answer, "sources": sources, "processing_stage": stage, "error": None}

    async def generate(state: AgentState) -> dict[str, Any]:
        assert generator is not None
        top = state["matches"][: settings.context_entries]
        sources = _sources(top)  # exactly the entries the model sees, so [n] is sources[n - 1]
        passages = [Passage(number, match.entry.question, match.entry.answer) for number, match in enumerate(top, 1)]
        confidence = state["confidence"]
        write = get_stream_writer() if state.get("streaming") else None
        if write is not None:
            write(
                {
                    "type": "metadata",
                    "session_id": state.get("session_id"),
                    "total_words": None,
                    "confidence": confidence,
                    "sources": sources,
                }
            )
        words: list[str] = []

        def send(new_words: list[str]) -> None:
            for word in new_words:
                if write is not None:
                    write({"type": "word", "content": word, "index": len(words), "confidence": confidence})
                words.append(word)

        regrouper = WordRegrouper()
        failure: str | None = None
        try:
            async for delta in generator.stream(state["resolved_question"], passages):
                send(regrouper.feed(delta))
            send(regrouper.finish())
            if not words:
                failure = "empty"
        except GenerationError as error:
            failure = error.reason
        ANSWER_GENERATIONS.labels(result=failure or "generated").inc()
        if failure is None and (unknown := _unknown_citations(words, len(passages))):
            logger.warning("generation_cited_unknown_entries", citations=unknown, entries=len(passages))
        if failure is not None:
            logger.warning("generation_fell_back", reason=failure, words_already_sent=len(words) if write else 0)
            # Words a client has already seen cannot be taken back: say so, then give the extractive answer.
            if write is None or not words:
                words.clear()
                send(top[0].entry.answer.split())
            else:
                send(INTERRUPTED_NOTICE.split() + top[0].entry.answer.split())
        return {
            "answer": " ".join(words),
            "sources": sources,
            "processing_stage": "response_complete",
            "error": f"generative_fallback: {failure}" if failure is not None else None,
        }

    graph = StateGraph(AgentState, input_schema=InputState)
    graph.add_node("understand", _timed("understand", understand))
    graph.add_node("search", _timed("search", search))
    graph.add_node("compose", _timed("compose", compose))
    graph.add_edge(START, "understand")
    graph.add_edge("understand", "search")
    if generator is None:
        graph.add_edge("search", "compose")
    else:
        graph.add_node("generate", _timed("generate", generate))
        graph.add_conditional_edges("search", decide, ["compose", "generate"])
        graph.add_edge("generate", END)  # streams its own events while the model writes
    graph.add_edge("compose", END)
    return graph.compile()
