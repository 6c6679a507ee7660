"""Retrieval quality on the labelled paraphrase set: hit@1, hit@3 and decline accuracy.

- hit@1: the question is answered (not no_match) and the answer is from the expected entry;
- hit@3: the expected entry is among the three best-ranked entries (retrieval recall, threshold aside);
- decline accuracy: questions outside the knowledge base get the no_match answer.

Run with `make eval` (or `python -m scripts.evaluate [--sweep]`). Questions go through the real agent
graph in-process, exactly as a request would, including the no-match threshold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.agent import DeFiAgent
from agents.factory import build_agent
from config import PROJECT_ROOT, get_settings
from infrastructure.logging import configure_logging
from services.knowledge_base import load_knowledge_base

EVAL_PATH = PROJECT_ROOT / "data" / "eval_questions.json"


@dataclass
class Report:
    """Outcome counts and the questions that missed."""

    on_topic: int = 0
    hit_at_1: int = 0
    hit_at_3: int = 0
    off_topic: int = 0
    declined: int = 0
    misses: list[str] = field(default_factory=list)
    scores: list[tuple[float, str | None, list[str], list[str]]] = field(default_factory=list)

    def rates(self) -> dict[str, float]:
        """hit@1, hit@3 and decline accuracy as fractions."""
        return {
            "hit@1": self.hit_at_1 / max(self.on_topic, 1),
            "hit@3": self.hit_at_3 / max(self.on_topic, 1),
            "decline_accuracy": self.declined / max(self.off_topic, 1),
        }


EvalItem = dict[str, Any]


def load_eval_questions(path: Path = EVAL_PATH) -> list[EvalItem]:
    """The labelled set: `{"question", "expected_id", "also_accept"?}`; expected_id null means decline.

    `also_accept` lists other entries whose answer answers the question equally well (overlapping
    entries); a hit on one of them counts.
    """
    questions: list[EvalItem] = json.loads(path.read_text())
    return questions


async def evaluate(agent: DeFiAgent, questions: list[EvalItem]) -> Report:
    """Ask every question through the agent and tally the outcomes."""
    report = Report()
    for item in questions:
        question, expected = str(item["question"]), item["expected_id"]
        accepted = {expected, *item.get("also_accept", [])}
        result = await agent.answer(question)
        answered = result.processing_stage == "response_complete"
        ranked = [str(source["id"]) for source in result.sources]
        top_ids = [
            match.entry.id
            for match in agent.retriever.search(await agent.embeddings.embed_query(question), question, 3)
        ]
        report.scores.append((result.confidence, expected, top_ids, sorted(str(x) for x in accepted if x)))
        if expected is None:
            report.off_topic += 1
            report.declined += not answered
            if answered:
                report.misses.append(f"ANSWERED off-topic {question!r} -> {ranked[0]} ({result.confidence:.3f})")
            continue
        report.on_topic += 1
        report.hit_at_1 += answered and bool(accepted.intersection(ranked[:1]))
        report.hit_at_3 += bool(accepted.intersection(top_ids[:3]))
        if not (answered and accepted.intersection(ranked[:1])):
            got = ranked[0] if ranked else "no_match"
            report.misses.append(f"MISS {question!r}: expected {expected}, got {got} ({result.confidence:.3f})")
    return report


def sweep(report: Report) -> None:
    """Print hit@1 and decline accuracy for a range of thresholds (for calibrating the default)."""
    for step in range(30, 57, 2):
        threshold = step / 100
        on = [(score, top, accepted) for score, expected, top, accepted in report.scores if expected is not None]
        off = [score for score, expected, _, _ in report.scores if expected is None]
        hit1 = sum(score >= threshold and top[:1][0] in accepted for score, top, accepted in on) / len(on)
        declined = sum(score < threshold for score in off) / max(len(off), 1)
        print(f"threshold {threshold:.2f}: hit@1 {hit1:.3f}  decline {declined:.3f}")


async def main() -> None:
    """Build the agent from the environment's settings and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep", action="store_true", help="also print figures for a range of thresholds")
    parser.add_argument("--misses", action="store_true", help="list every miss")
    args = parser.parse_args()
    settings = get_settings()
    configure_logging("WARNING", True, None, settings.log_question_max_chars)
    agent = build_agent(settings, load_knowledge_base(settings.dataset_path))
    await agent.embeddings.start()
    try:
        questions = load_eval_questions()
        report = await evaluate(agent, questions)
    finally:
        await agent.embeddings.close()
    rates = report.rates()
    print(f"questions: {report.on_topic} on-topic, {report.off_topic} to decline")
    print(f"hit@1 {rates['hit@1']:.3f}  hit@3 {rates['hit@3']:.3f}  decline accuracy {rates['decline_accuracy']:.3f}")
    print(f"threshold {settings.agent_similarity_threshold}")
    if args.misses:
        print("\n".join(report.misses))
    if args.sweep:
        sweep(report)


if __name__ == "__main__":
    asyncio.run(main())
