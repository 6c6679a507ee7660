"""Retrieval figures of a knowledge-base index on the labelled questions (data/eval_questions.json).

Used by the admin API to compare a proposed dataset with the live one before it goes live. Each question
is ranked on its own (no session), as a stateless question is: hit@1 counts answered questions whose
top entry is the expected one (or one it also accepts), hit@3 the expected entry among the top three,
decline accuracy the questions labelled as out of scope that fall below the threshold.
`make eval` (scripts/evaluate.py) measures the same through the whole agent, follow-ups included.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.embeddings import EmbeddingService
from services.retrieval import Retriever


@dataclass(frozen=True, slots=True)
class LabelledQuestion:
    """A single question and the entries that answer it (empty: it should be declined)."""

    text: str
    accepted: frozenset[str]


def load_labelled_questions(path: Path) -> list[LabelledQuestion]:
    """The single questions of the eval set; [] when the file is missing."""
    try:
        items: list[dict[str, Any]] = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    questions = []
    for item in items:
        if "kind" in item:
            continue
        expected = item.get("expected_id")
        accepted = {expected, *item.get("also_accept", ())} if expected else set()
        questions.append(LabelledQuestion(str(item["question"]), frozenset(accepted)))
    return questions


async def retrieval_figures(
    retriever: Retriever, embeddings: EmbeddingService, questions: list[LabelledQuestion], threshold: float
) -> dict[str, float | int] | None:
    """hit@1, hit@3 and decline accuracy of `retriever` on `questions` (None when there are none)."""
    if not questions:
        return None
    texts = [question.text for question in questions]
    vectors = np.stack(await asyncio.gather(*(embeddings.embed_query(text) for text in texts)))
    ranked = await asyncio.to_thread(retriever.search_many, vectors, texts, 3)
    on_topic = hits_1 = hits_3 = off_topic = declined = 0
    for question, matches in zip(questions, ranked, strict=True):
        answered = bool(matches) and matches[0].score >= threshold
        if question.accepted:
            on_topic += 1
            hits_1 += answered and matches[0].entry.id in question.accepted
            hits_3 += any(match.entry.id in question.accepted for match in matches[:3])
        else:
            off_topic += 1
            declined += not answered
    return {
        "questions": len(questions),
        "hit@1": round(hits_1 / max(on_topic, 1), 4),
        "hit@3": round(hits_3 / max(on_topic, 1), 4),
        "decline_accuracy": round(declined / max(off_topic, 1), 4),
    }
