"""Each graph node on its own: called directly with a state and a run-time context, no graph, no server.

The ranking is the real `Retriever` over a small knowledge base whose phrasing vectors are chosen so the
expected entry is unambiguous; the embedder returns those vectors for known texts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import pytest
from langgraph.runtime import Runtime

from agents.context import AgentSettings, GraphContext
from agents.events import MetadataEvent, WordEvent
from agents.graph import INTERRUPTED_NOTICE, NO_MATCH_PREFIX, compose, generate, route_after_search, search, understand
from agents.state import AgentState
from agents.validation import InvalidQuestionError
from services.generation import GenerationError, Passage
from services.knowledge_base import Entry, KnowledgeBase
from services.names import NameVocabulary
from services.retrieval import BatchedRetriever, Match, Retriever
from services.sources import Source

DIMENSION = 8
SETTINGS = AgentSettings(similarity_threshold=0.4, max_results=2, question_max_chars=200, word_delay_seconds=0.0)

ENTRIES = (
    Entry(
        id="what-is-aave",
        category="protocols",
        question="What is Aave?",
        alternatives=("aave explained", "tell me about aave"),
        answer="Aave is a lending protocol where users supply and borrow crypto assets.",
    ),
    Entry(
        id="what-is-uniswap",
        category="protocols",
        question="What is Uniswap?",
        alternatives=("uniswap explained", "tell me about uniswap"),
        answer="Uniswap is a decentralized exchange that prices swaps with liquidity pools.",
    ),
)
KNOWLEDGE_BASE = KnowledgeBase(ENTRIES, "test", "test.json")


def _axis(index: int) -> np.ndarray:
    vector = np.zeros(DIMENSION, dtype=np.float32)
    vector[index] = 1.0
    return vector


class AxisEmbedder:
    """Texts about Aave point along axis 0, about Uniswap along axis 1, anything else along axis 7."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def embed_query(self, text: str) -> np.ndarray:
        self.asked.append(text)
        lowered = text.lower()
        return _axis(0 if "aave" in lowered else 1 if "uniswap" in lowered else 7)


@pytest.fixture(scope="module")
def retriever() -> Retriever:
    vectors = np.stack([_axis(index) for index, entry in enumerate(ENTRIES) for _ in entry.phrasings()])
    return Retriever(KNOWLEDGE_BASE, vectors, None)


class ScriptedModel:
    """A chat model that streams the given deltas (then fails with `fail_with`, if set) and records its input."""

    def __init__(self, deltas: Sequence[str], fail_with: str | None = None, rewrite_to: str | None = None) -> None:
        self.deltas = deltas
        self.fail_with = fail_with
        self.rewrite_to = rewrite_to
        self.shown: list[tuple[str, list[Passage]]] = []

    async def stream(self, question: str, passages: Sequence[Passage]) -> AsyncIterator[str]:
        self.shown.append((question, list(passages)))
        for delta in self.deltas:
            yield delta
        if self.fail_with is not None:
            raise GenerationError(self.fail_with)

    async def rewrite(self, question: str, previous_question: str) -> str | None:
        return self.rewrite_to


def runtime(
    retriever: Retriever, written: list[Any] | None = None, model: ScriptedModel | None = None
) -> Runtime[GraphContext]:
    context = GraphContext(SETTINGS, AxisEmbedder(), BatchedRetriever(retriever, SETTINGS.max_results), model)
    writer = written.append if written is not None else (lambda _: None)
    return Runtime(context=context, stream_writer=writer)


def state(**values: Any) -> AgentState:
    base: AgentState = {"question": "", "previous_question": None, "session_id": None, "streaming": False}
    base.update(values)  # type: ignore[typeddict-item]
    return base


async def test_understand_strips_and_rewrites_a_follow_up(retriever: Retriever) -> None:
    update = await understand(
        state(question="  what are its risks?  ", previous_question="What is Aave?"), runtime=runtime(retriever)
    )
    assert update == {
        "question": "what are its risks?",
        "candidates": ["what are Aave's risks?", "what are its risks?"],
    }


async def test_understand_refuses_what_the_routes_refuse(retriever: Retriever) -> None:
    with pytest.raises(InvalidQuestionError) as raised:
        await understand(state(question="a" * 201), runtime=runtime(retriever))
    assert raised.value.code == "question_too_long"


async def test_search_keeps_the_candidate_whose_best_entry_scores_higher(retriever: Retriever) -> None:
    update = await search(
        state(candidates=["what are Uniswap's fees?", "what are its fees?"]), runtime=runtime(retriever)
    )
    assert update["resolved_question"] == "what are Uniswap's fees?"
    matches: Sequence[Match] = update["matches"]
    assert [match.entry.id for match in matches] == ["what-is-uniswap", "what-is-aave"]
    assert update["confidence"] == round(matches[0].score, 4) and update["confidence"] >= SETTINGS.similarity_threshold


async def test_understand_puts_the_chat_models_rewrite_first(retriever: Retriever) -> None:
    model = ScriptedModel([], rewrite_to="What are the risks of Aave?")
    update = await understand(
        state(question="what are its risks?", previous_question="What is Aave?"),
        runtime=runtime(retriever, model=model),
    )
    assert update["candidates"] == ["What are the risks of Aave?", "what are Aave's risks?", "what are its risks?"]


async def test_route_after_search_composes_without_a_chat_model(retriever: Retriever) -> None:
    matched = state(matches=[Match(ENTRIES[0], 0.9)], confidence=0.9)
    assert await route_after_search(matched, runtime=runtime(retriever)) == "compose"


async def test_route_after_search_sends_only_matched_questions_to_the_chat_model(retriever: Retriever) -> None:
    with_model = runtime(retriever, model=ScriptedModel([]))
    matched = state(question="what is aave?", matches=[Match(ENTRIES[0], 0.9)], confidence=0.9)
    assert await route_after_search(matched, runtime=with_model) == "generate"
    declined = state(question="what is aave?", matches=[Match(ENTRIES[0], 0.2)], confidence=0.2)
    assert await route_after_search(declined, runtime=with_model) == "compose"


async def test_generate_streams_the_models_words_with_the_entries_it_saw_as_sources(retriever: Retriever) -> None:
    model = ScriptedModel(["Aave lets you bor", "row [1]", ". "])
    written: list[Any] = []
    matches = [Match(ENTRIES[0], 0.9), Match(ENTRIES[1], 0.5)]
    update = await generate(
        state(streaming=True, session_id="s1", resolved_question="What is Aave?", matches=matches, confidence=0.9),
        runtime=runtime(retriever, written, model),
    )
    assert update == {
        "answer": "Aave lets you borrow [1].",
        "sources": [Source("what-is-aave", "What is Aave?", 0.9), Source("what-is-uniswap", "What is Uniswap?", 0.5)],
        "processing_stage": "response_complete",
        "error": None,
    }
    question, passages = model.shown[0]
    assert question == "What is Aave?"
    assert [(passage.number, passage.question) for passage in passages] == [
        (1, "What is Aave?"),
        (2, "What is Uniswap?"),
    ]
    assert written[0] == MetadataEvent("s1", None, 0.9, tuple(update["sources"]))
    assert written[1:] == [WordEvent(word, index, 0.9) for index, word in enumerate(update["answer"].split())]


async def test_generate_falls_back_to_the_entry_keeping_the_words_already_sent(retriever: Retriever) -> None:
    matched = {"resolved_question": "What is Aave?", "matches": [Match(ENTRIES[0], 0.9)], "confidence": 0.9}
    failing = ScriptedModel(["Aave is "], fail_with="stream_interrupted")
    written: list[Any] = []
    update = await generate(state(streaming=True, **matched), runtime=runtime(retriever, written, failing))
    assert update["answer"] == f"Aave is {INTERRUPTED_NOTICE} {ENTRIES[0].answer}"
    assert update["error"] == "generative_fallback: stream_interrupted"
    assert [event.content for event in written[1:]] == update["answer"].split()
    quiet = await generate(state(**matched), runtime=runtime(retriever, model=ScriptedModel([], fail_with="timeout")))
    assert quiet["answer"] == ENTRIES[0].answer and quiet["error"] == "generative_fallback: timeout"


async def test_compose_answers_from_the_top_entry_and_streams_typed_events(retriever: Retriever) -> None:
    written: list[Any] = []
    matches = [Match(ENTRIES[0], 0.91234), Match(ENTRIES[1], 0.3)]
    update = await compose(
        state(streaming=True, session_id="s1", matches=matches, confidence=0.9123), runtime=runtime(retriever, written)
    )
    assert update["answer"] == ENTRIES[0].answer
    assert update["processing_stage"] == "response_complete"
    assert update["sources"] == [
        Source("what-is-aave", "What is Aave?", 0.9123),
        Source("what-is-uniswap", "What is Uniswap?", 0.3),
    ]
    words = ENTRIES[0].answer.split()
    assert written[0] == MetadataEvent("s1", len(words), 0.9123, tuple(update["sources"]))
    # every word is ready at once: one chunk holding all of them, in order (the agent yields them one by one)
    assert written[1:] == [tuple(WordEvent(word, index, 0.9123) for index, word in enumerate(words))]
    assert written[1][0].to_wire() == {"type": "word", "content": "Aave", "index": 0, "confidence": 0.9123}


async def test_compose_declines_below_the_threshold_and_writes_nothing_unless_streaming(
    retriever: Retriever,
) -> None:
    written: list[Any] = []
    update = await compose(state(matches=[Match(ENTRIES[1], 0.2)], confidence=0.2), runtime=runtime(retriever, written))
    assert update["processing_stage"] == "no_match"
    assert update["sources"] == []
    assert update["answer"].startswith(NO_MATCH_PREFIX) and '"What is Uniswap?"' in update["answer"]
    assert written == []


async def test_compose_says_a_made_up_name_is_unknown_before_the_general_answer(retriever: Retriever) -> None:
    context = GraphContext(
        SETTINGS,
        AxisEmbedder(),
        BatchedRetriever(retriever, SETTINGS.max_results),
        names=NameVocabulary.from_texts(text for entry in ENTRIES for text in entry.phrasings()),
    )
    written: list[Any] = []
    matched = state(question="is Quarnix like Aave?", streaming=True, matches=[Match(ENTRIES[0], 0.8)], confidence=0.8)
    update = await compose(matched, runtime=Runtime(context=context, stream_writer=written.append))
    assert update["unknown_terms"] == ["Quarnix"]
    assert update["answer"] == f"I don't have information about Quarnix specifically. In general: {ENTRIES[0].answer}"
    assert written[0].to_wire()["unknown_terms"] == ["Quarnix"]
    declined = state(question="who founded Quarnix and Plendrix?", matches=[Match(ENTRIES[1], 0.1)], confidence=0.1)
    update = await compose(declined, runtime=Runtime(context=context))
    assert update["processing_stage"] == "no_match" and update["unknown_terms"] == ["Quarnix", "Plendrix"]
    assert update["answer"].startswith(f"I don't have information about Quarnix or Plendrix. {NO_MATCH_PREFIX}")
    known = state(question="what is aave?", matches=[Match(ENTRIES[0], 0.9)], confidence=0.9)
    update = await compose(known, runtime=Runtime(context=context))
    assert update["unknown_terms"] == [] and update["answer"] == ENTRIES[0].answer
