"""Retrieval quality floors on the labelled paraphrase set (the same code path as a request)."""

from __future__ import annotations

from pathlib import Path

from bootstrap import stop_services
from config import Settings
from scripts.evaluate import build_services, evaluate, load_eval_questions
from services.knowledge_base import load_knowledge_base
from tests.conftest import ServerProcess

HIT_AT_1_FLOOR = 0.90
HIT_AT_3_FLOOR = 0.97
DECLINE_FLOOR = 0.90


def test_eval_set_is_large_enough_and_labelled_with_real_ids() -> None:
    questions = load_eval_questions()
    knowledge_base = load_knowledge_base(Settings(_env_file=None).dataset_path)  # type: ignore[call-arg]
    ids = {entry.id for entry in knowledge_base.entries}
    phrasings = {text.lower() for entry in knowledge_base.entries for text in entry.phrasings()}
    on_topic = [item for item in questions if item["expected_id"] is not None]
    assert len(on_topic) >= 150
    assert len(questions) - len(on_topic) >= 30
    assert all(item["expected_id"] in ids for item in on_topic)
    assert not [item["question"] for item in questions if str(item["question"]).lower() in phrasings]


async def test_eval_floors(server: ServerProcess, shared_cache_dir: Path) -> None:
    settings = Settings(_env_file=None, cache_dir=shared_cache_dir)  # type: ignore[call-arg]
    services = await build_services(settings)
    try:
        report = await evaluate(services, load_eval_questions())
    finally:
        await stop_services(services)
    rates = report.rates()
    print(f"eval: {rates} misses: {len(report.misses)}")
    assert rates["hit@1"] >= HIT_AT_1_FLOOR, report.misses
    assert rates["hit@3"] >= HIT_AT_3_FLOOR, report.misses
    assert rates["decline_accuracy"] >= DECLINE_FLOOR, report.misses
