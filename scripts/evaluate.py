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

from agents.agent import AgentResult
from bootstrap import Services, build_core, stop_services
from config import PROJECT_ROOT, Settings, get_settings
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
    follow_ups: int = 0
    follow_up_hits: int = 0
    known_names: int = 0
    known_name_hits: int = 0
    unknown_names: int = 0
    unknown_names_honest: int = 0
    misses: list[str] = field(default_factory=list)
    scores: list[tuple[float, str | None, list[str], list[str]]] = field(default_factory=list)

    def rates(self) -> dict[str, float]:
        """hit@1, hit@3 and decline accuracy (single questions), then the follow-up and name figures."""
        return {
            "hit@1": self.hit_at_1 / max(self.on_topic, 1),
            "hit@3": self.hit_at_3 / max(self.on_topic, 1),
            "decline_accuracy": self.declined / max(self.off_topic, 1),
            "follow_up_accuracy": self.follow_up_hits / max(self.follow_ups, 1),
            "known_name_hit@1": self.known_name_hits / max(self.known_names, 1),
            "unknown_name_honesty": self.unknown_names_honest / max(self.unknown_names, 1),
        }


EvalItem = dict[str, Any]


def load_eval_set(path: Path = EVAL_PATH) -> list[EvalItem]:
    """Every labelled item. Single questions are `{"question", "expected_id", "also_accept"?}` (expected_id
    null means decline); other items carry a `kind`: `follow_up` (with `opener`), `known_name`, `unknown_name`
    (with `unknown_terms`).

    `also_accept` lists other entries whose answer answers the question equally well (overlapping
    entries); a hit on one of them counts.
    """
    items: list[EvalItem] = json.loads(path.read_text())
    return items


def load_eval_questions(path: Path = EVAL_PATH) -> list[EvalItem]:
    """The single questions of the labelled set (no `kind`)."""
    return [item for item in load_eval_set(path) if "kind" not in item]


def _hit(result: AgentResult, accepted: set[str | None]) -> bool:
    top = {source.id for source in result.sources[:1]}
    return result.processing_stage == "response_complete" and bool(accepted.intersection(top))


async def evaluate_kinds(services: Services, items: list[EvalItem], report: Report) -> None:
    """Follow-up pairs (asked in one session), and questions naming known or made-up names."""
    agent = services.agent
    for item in items:
        kind, question = item.get("kind"), str(item["question"])
        accepted = {item["expected_id"], *item.get("also_accept", [])}
        if kind == "follow_up":
            opener = await agent.accept(str(item["opener"]), new_session=True)
            await agent.answer(opener)
            assert opener.session is not None
            result = await agent.answer(await agent.accept(question, opener.session.id))
            report.follow_ups += 1
            good = _hit(result, accepted) if item["expected_id"] else result.processing_stage == "no_match"
            report.follow_up_hits += good
            if not good:
                got = result.sources[0].id if result.sources else "no_match"
                report.misses.append(f"FOLLOW-UP {item['opener']!r} -> {question!r}: expected {accepted}, got {got}")
        elif kind == "known_name":
            result = await agent.answer(await agent.accept(question))
            report.known_names += 1
            report.known_name_hits += _hit(result, accepted)
            if not _hit(result, accepted):
                got = result.sources[0].id if result.sources else "no_match"
                report.misses.append(f"KNOWN NAME {question!r}: expected {accepted}, got {got}")
        elif kind == "unknown_name":
            result = await agent.answer(await agent.accept(question))
            report.unknown_names += 1
            # A labelled name may be several words ("Vornhalt Finance"); naming any of its words as unknown counts.
            named = {term.lower() for term in result.unknown_terms}
            labelled = {word.lower().strip("$") for name in item["unknown_terms"] for word in name.split()}
            honest = result.processing_stage == "no_match" or bool(named & labelled)
            report.unknown_names_honest += honest
            if not honest:
                report.misses.append(f"UNKNOWN NAME answered as known {question!r} -> {result.sources[0].id}")


async def build_services(settings: Settings) -> Services:
    """The same agent, embedder and index a serving process builds (no Redis, no background tasks)."""
    return await build_core(settings, load_knowledge_base(settings.dataset_path))


async def evaluate(services: Services, questions: list[EvalItem]) -> Report:
    """Ask every question through the agent and tally the outcomes."""
    report = Report()
    agent, retriever = services.agent, services.knowledge.current.retriever
    for item in questions:
        question, expected = str(item["question"]), item["expected_id"]
        accepted = {expected, *item.get("also_accept", [])}
        result = await agent.answer(await agent.accept(question))
        answered = result.processing_stage == "response_complete"
        ranked = [source.id for source in result.sources]
        vector = await services.embeddings.embed_query(question)
        top_ids = [match.entry.id for match in retriever.search(vector, question, 3)]
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
    services = await build_services(settings)
    try:
        report = await evaluate(services, load_eval_questions())
        await evaluate_kinds(services, [item for item in load_eval_set() if "kind" in item], report)
    finally:
        await stop_services(services)
    rates = report.rates()
    print(f"questions: {report.on_topic} on-topic, {report.off_topic} to decline")
    print(f"hit@1 {rates['hit@1']:.3f}  hit@3 {rates['hit@3']:.3f}  decline accuracy {rates['decline_accuracy']:.3f}")
    print(
        f"follow-ups {report.follow_ups}: accuracy {rates['follow_up_accuracy']:.3f}  "
        f"known names {report.known_names}: hit@1 {rates['known_name_hit@1']:.3f}  "
        f"made-up names {report.unknown_names}: declined or named unknown {rates['unknown_name_honesty']:.3f}"
    )
    print(f"threshold {settings.agent_similarity_threshold}")
    if args.misses:
        print("\n".join(report.misses))
    if args.sweep:
        sweep(report)


if __name__ == "__main__":
    asyncio.run(main())
