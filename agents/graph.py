"""The question-answering graph: understand -> search -> compose, or -> generate in generative mode.

Read top to bottom: the async nodes over the typed state (each returns only the keys it changes), the
router after `search`, then the `StateGraph` wiring. Run-time dependencies (settings, embedder, ranker,
chat model) arrive through LangGraph's runtime context (`agents.context.GraphContext`), so each node
can be called on its own.

When the caller streams (`streaming=True`), `compose` and `generate` write typed stream events
(`agents.events`) through the runtime's stream writer (the words of an extractive answer, all ready at
once, as one tuple); `ainvoke` callers get the final state only.
Steps are only as fine as they need to be: each node, and each conditional edge, costs a fixed
~0.1-0.26 ms of CPU in LangGraph (docs/performance.md).

In generative mode a matched question goes to `generate`: a chat model writes the answer from the top
entries and the node streams it as whole words while it is generated (its `metadata` comes first, with
`total_words` null because the length is not known yet). If the model fails, the extractive answer is
used and `error` says why.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol

import structlog
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime

from agents.context import GraphContext
from agents.events import MetadataEvent, WordEvent
from agents.followup import best_scoring, choose, conversation_subjects, plan_follow_up, resolve_follow_up
from agents.state import AgentState, InputState
from agents.validation import clean_question
from agents.words import WordRegrouper
from infrastructure.metrics import AGENT_NODE_DURATION, ANSWER_GENERATIONS
from services.generation import GenerationError, Passage
from services.retrieval import Match
from services.sources import Source

logger = structlog.get_logger(__name__)

NO_MATCH_PREFIX = "I don't have a reliable answer to that."
SUGGESTION_COUNT = 3
INTERRUPTED_NOTICE = "[The generated answer was interrupted; the knowledge base answer follows.]"

Update = dict[str, Any]


class Node(Protocol):
    """An async graph node: takes the state (and the run's context), returns the keys it changes."""

    def __call__(self, state: AgentState, *, runtime: Runtime[GraphContext]) -> Awaitable[Update]: ...


def timed(name: str) -> Callable[[Node], Node]:
    """Record the node's duration in `agent_node_seconds{node=name}`."""

    def decorate(node: Node) -> Node:
        @functools.wraps(node)
        async def run(state: AgentState, *, runtime: Runtime[GraphContext]) -> Update:
            started = time.perf_counter()
            try:
                return await node(state, runtime=runtime)
            finally:
                AGENT_NODE_DURATION.labels(node=name).observe(time.perf_counter() - started)

        return run

    return decorate


def no_match_answer(suggestions: list[Match]) -> str:
    """The honest decline, with up to three closest topics to try instead."""
    if not suggestions:
        return f"{NO_MATCH_PREFIX} I can only answer questions about decentralized finance (DeFi)."
    topics = "; ".join(f'"{match.entry.question}"' for match in suggestions[:SUGGESTION_COUNT])
    return (
        f"{NO_MATCH_PREFIX} I answer questions about decentralized finance (DeFi) from a curated "
        f"knowledge base. Closest topics I know about: {topics}"
    )


def in_source_order(matches: list[Match]) -> list[Match]:
    """The entry the answer is drawn from first, then the others by score, highest first.

    The answer's entry is the ranking's first (similarity plus the entry classifier, which picks the right
    entry more often than similarity alone: hit@1 0.908 against 0.841 on the eval set), so its score can be
    below another source's; it stays first so that `sources[0]` is always where the answer comes from.
    """
    return matches[:1] + sorted(matches[1:], key=lambda match: match.score, reverse=True)


def sources_of(matches: list[Match]) -> list[Source]:
    """The matches as sources in source order (scores rounded to 4 places)."""
    return [Source(match.entry.id, match.entry.question, round(match.score, 4)) for match in in_source_order(matches)]


def is_matched(state: AgentState, context: GraphContext) -> bool:
    """Whether the top entry clears the no-match threshold."""
    return bool(state["matches"]) and state["confidence"] >= context.settings.similarity_threshold


def _unknown_citations(words: list[str], entries: int) -> list[int]:
    """Citation numbers [n] in the answer that point at no entry the model was shown."""
    numbers = {int(number) for number in re.findall(r"\[(\d+)\]", " ".join(words))}
    return sorted(number for number in numbers if not 1 <= number <= entries)


# --- nodes -------------------------------------------------------------------------------------------------


async def _recover_subjects(previous_question: str, context: GraphContext) -> tuple[str, ...]:
    """The subjects of a previous turn that did not record them (an older turn, or a cached answer).

    The previous question is ranked again (its vector is usually still cached) and read as `search` reads it.
    """
    vector = await context.embedder.embed_query(previous_question)
    (matches,) = await context.ranker.search([vector], [previous_question])
    return conversation_subjects(previous_question, matches, context.settings.similarity_threshold)


@timed("understand")
async def understand(state: AgentState, *, runtime: Runtime[GraphContext]) -> Update:
    """Validate the question again (the graph is safe on its own), then list the texts to search with.

    Candidates: the chat model's stand-alone rewrite (generative mode), the follow-up rewrites with the
    conversation's subjects (`agents.followup`; without known subjects, the rule-based rewrite with the
    previous question's words), and the question as asked.
    """
    context = runtime.context
    question = clean_question(state["question"], context.settings.question_max_chars)
    previous = state.get("previous_question")
    subjects = state.get("previous_subjects")
    if previous and subjects is None:
        subjects = await _recover_subjects(previous, context)
    update: Update = {"question": question}
    if previous and subjects:
        plan = plan_follow_up(question, previous, subjects, state.get("previous_entry"))
        candidates = [*(text[: context.settings.question_max_chars] for text in plan.rewrites), question]
        update["follow_up"] = plan
    else:
        candidates = [resolve_follow_up(question, previous), question]
    if context.generator is not None and previous:
        try:
            rewritten = await context.generator.rewrite(question, previous)
        except GenerationError as error:
            logger.warning("follow_up_rewrite_failed", reason=error.reason)
            rewritten = None
        if rewritten:
            candidates.insert(0, rewritten[: context.settings.question_max_chars])
    update["candidates"] = list(dict.fromkeys(candidates))
    return update


@timed("search")
async def search(state: AgentState, *, runtime: Runtime[GraphContext]) -> Update:
    """Embed every candidate (through the caches), rank them all, keep the best-grounded one.

    Without a follow-up plan that is the candidate whose best entry scores higher; for a follow-up,
    `agents.followup.choose` also prefers entries about the conversation's subjects. `subjects` is what the
    conversation is about after this question (kept in the session's turn).
    """
    context = runtime.context
    candidates = state["candidates"]
    threshold = context.settings.similarity_threshold
    vectors = await asyncio.gather(*(context.embedder.embed_query(text) for text in candidates))
    ranked = list(zip(candidates, await context.ranker.search(vectors, candidates), strict=True))
    plan = state.get("follow_up")
    choice = best_scoring(ranked) if plan is None else choose(state["question"], plan, ranked, threshold)
    subjects: tuple[str, ...] = ()
    if state.get("session_id") is not None:  # only a session has a next question to keep the subject for
        subjects = conversation_subjects(choice.text, choice.matches, threshold)
        if not subjects and plan is not None and plan.form in {"pronoun", "fragment", "what_about"}:
            subjects = plan.subjects  # a declined follow-up keeps the conversation's subject
    confidence = choice.matches[0].score if choice.matches else 0.0
    return {
        "resolved_question": choice.text,
        "matches": choice.matches,
        "confidence": round(confidence, 4),
        "subjects": subjects,
    }


async def route_after_search(state: AgentState, *, runtime: Runtime[GraphContext]) -> Literal["compose", "generate"]:
    """A matched question goes to the chat model when there is one; everything else is composed.

    A question naming something the knowledge base does not know is composed too: its answer must say so.
    """
    # async: LangGraph runs a plain function router in its thread pool, a round trip per question.
    context = runtime.context
    if context.generator is None or not is_matched(state, context) or unknown_names(state, context):
        return "compose"
    return "generate"


def unknown_names(state: AgentState, context: GraphContext) -> list[str]:
    """Names in the question (as asked) that appear nowhere in the knowledge base (see services/names.py)."""
    if context.names is None:
        return []
    return [term.term for term in context.names.unknown_terms(state["question"])]


def honest_about(terms: list[str], answer: str, matched: bool) -> str:
    """Say first that the named things are unknown; a general answer then reads as general, not as a verdict."""
    if not terms:
        return answer
    named = " or ".join(", ".join(terms).rsplit(", ", 1)) if len(terms) > 1 else terms[0]
    if matched:
        return f"I don't have information about {named} specifically. In general: {answer}"
    return f"I don't have information about {named}. {answer}"


@timed("compose")
async def compose(state: AgentState, *, runtime: Runtime[GraphContext]) -> Update:
    """The top entry's answer when it clears the threshold, else the honest decline with suggestions."""
    context = runtime.context
    matched = is_matched(state, context)
    if matched:
        answer, sources = state["matches"][0].entry.answer, sources_of(state["matches"])
        stage: Literal["response_complete", "no_match"] = "response_complete"
    else:
        answer, sources, stage = no_match_answer(state["matches"]), [], "no_match"
    unknown = unknown_names(state, context)
    if unknown:
        logger.info("unknown_names", terms=unknown, matched=matched)
        answer = honest_about(unknown, answer, matched)
    if state.get("streaming"):
        write = runtime.stream_writer
        words = answer.split()
        confidence = state["confidence"]
        write(MetadataEvent(state.get("session_id"), len(words), confidence, tuple(sources), tuple(unknown)))
        delay = context.settings.word_delay_seconds
        if delay > 0:
            for index, word in enumerate(words):
                await asyncio.sleep(delay)
                write(WordEvent(word, index, confidence))
        else:  # every word is ready now: one chunk through LangGraph's stream instead of one per word
            write(tuple(WordEvent(word, index, confidence) for index, word in enumerate(words)))
    return {"answer": answer, "sources": sources, "processing_stage": stage, "error": None, "unknown_terms": unknown}


@timed("generate")
async def generate(state: AgentState, *, runtime: Runtime[GraphContext]) -> Update:
    """The chat model's answer from the top entries, streamed as whole words; the extractive one if it fails."""
    generator = runtime.context.generator
    assert generator is not None  # the router sends questions here only in generative mode
    top = in_source_order(state["matches"][: runtime.context.settings.context_entries])
    sources = sources_of(top)  # exactly the entries the model sees, in the same order, so [n] is sources[n - 1]
    passages = [Passage(number, match.entry.question, match.entry.answer) for number, match in enumerate(top, 1)]
    confidence = state["confidence"]
    write = runtime.stream_writer if state.get("streaming") else None
    if write is not None:
        write(MetadataEvent(state.get("session_id"), None, confidence, tuple(sources)))
    words: list[str] = []

    def send(new_words: list[str]) -> None:
        for word in new_words:
            if write is not None:
                write(WordEvent(word, len(words), confidence))
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


# --- wiring ------------------------------------------------------------------------------------------------


def build_graph(generative: bool = False) -> CompiledStateGraph[AgentState, GraphContext, InputState, AgentState]:
    """Compile the agent graph (its dependencies come with each run's context).

    Extractive (the default): understand -> search -> compose. `generative` (a chat model is configured):
    the router after `search` sends matched questions to `generate`. Without a chat model the router would
    always choose `compose`, and a conditional edge costs ~0.2 ms of CPU per question in LangGraph.
    """
    graph = StateGraph(AgentState, context_schema=GraphContext, input_schema=InputState)
    graph.add_node("understand", understand)
    graph.add_node("search", search)
    graph.add_node("compose", compose)
    graph.add_edge(START, "understand")
    graph.add_edge("understand", "search")
    if generative:
        graph.add_node("generate", generate)
        graph.add_conditional_edges("search", route_after_search, ["compose", "generate"])
        graph.add_edge("generate", END)
    else:
        graph.add_edge("search", "compose")
    graph.add_edge("compose", END)
    return graph.compile()
