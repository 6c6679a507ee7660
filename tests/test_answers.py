"""DeFi questions get on-topic answers with sources; off-topic and live-data questions are handled honestly."""

from __future__ import annotations

import httpx
import pytest

ON_TOPIC = [
    ("why do LPs lose money when prices move?", "impermanent-loss", "impermanent loss"),
    ("How does Uniswap v3 concentrated liquidity work?", "uniswap-v3-concentrated-liquidity", "range"),
    ("difference between APR and APY", "apr-vs-apy", "compound"),
    ("how do flash loans work on aave", "aave-flash-loans-how", "reverts"),
    ("Explain Compound's interest rate model", "compound-interest-rate-model", "utilization"),
    ("what are the risks of yield farming?", "yield-farming-risks", "risk"),
    ("How do AMMs set the price of tokens?", "how-amms-determine-prices", "pool"),
    ("what does total value locked mean", "what-is-tvl", "locked"),
    ("How does DAI keep its peg to the dollar?", "how-dai-maintains-peg", "dai"),
    ("What is MEV?", "what-is-mev", "order"),
    ("What are governance tokens for?", "governance-tokens", "vote"),
    ("what kinds of staking are there", "types-of-staking", "liquid staking"),
    ("How do cross-chain bridges work?", "how-cross-chain-bridges-work", "chain"),
    ("synthetic assets vs wrapped assets", "synthetic-vs-wrapped-assets", "wrapped"),
    ("What is Nexus Mutual?", "nexus-mutual", "cover"),
    ("what is slippage when trading on a dex", "what-is-slippage", "price"),
    ("why are oracle networks important", "oracle-networks-importance", "oracle"),
    ("what are the benefits of layer 2s", "benefits-of-layer-2", "fees"),
    ("what are liquid staking derivatives", "liquid-staking-derivatives", "staked"),
    ("what is the health factor on aave", "health-factor", "liquidat"),
    ("what is a sandwich attack", "sandwich-attack", "just before you"),
    ("optimistic rollups vs zk rollups", "optimistic-vs-zk-rollups", "proof"),
    ("how do I revoke token approvals", "revoke-token-approvals", "approv"),
    ("what happened to UST and LUNA", "ust-luna-collapse", "2022"),
    ("what is a seed phrase", "what-is-a-seed-phrase", "words"),
    ("what is EIP-1559", "eip-1559-base-fee-priority-fee", "base fee"),
]

OFF_TOPIC = [
    "What is the best lasagna recipe?",
    "Who won the 2018 football world cup?",
    "How do I fix a flat bicycle tire?",
    "What's the weather like in Paris tomorrow?",
    "Can you recommend a good sci-fi novel?",
    "How many bones are in the human body?",
]


def ask(client: httpx.Client, question: str) -> dict[str, object]:
    response = client.post("/ask", json={"question": question})
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


@pytest.mark.parametrize(("question", "entry_id", "keyword"), ON_TOPIC)
def test_defi_question_is_answered_on_topic(client: httpx.Client, question: str, entry_id: str, keyword: str) -> None:
    body = ask(client, question)
    assert body["processing_stage"] == "response_complete"
    sources = body["sources"]
    assert isinstance(sources, list) and sources[0]["id"] == entry_id, sources[:3]
    assert keyword in str(body["answer"]).lower()
    assert body["confidence"] == sources[0]["score"]
    assert 0.0 < float(body["confidence"]) <= 1.0
    assert body["error"] is None and body["session_id"] is None
    assert len({source["id"] for source in sources}) == len(sources) <= 5
    assert all(0.0 <= source["score"] <= 1.0 for source in sources)


@pytest.mark.parametrize("question", OFF_TOPIC)
def test_off_topic_question_is_declined(client: httpx.Client, question: str) -> None:
    body = ask(client, question)
    assert body["processing_stage"] == "no_match"
    assert str(body["answer"]).startswith("I don't have a reliable answer to that.")
    assert "Closest topics I know about" in str(body["answer"])
    assert body["sources"] == []


def test_original_example_question(client: httpx.Client) -> None:
    body = ask(client, "why do LPs lose money when prices move?")
    assert "impermanent loss" in str(body["answer"]).lower()
    assert body["sources"]


@pytest.mark.parametrize(
    "question", ["what is the price of ETH right now?", "what's the current TVL of Aave?", "what's gas at today"]
)
def test_live_data_questions_say_there_is_no_live_data(client: httpx.Client, question: str) -> None:
    body = ask(client, question)
    assert body["processing_stage"] == "response_complete"
    assert str(body["sources"][0]["id"]).startswith("live-")
    assert "live" in str(body["answer"]).lower() or "real-time" in str(body["answer"]).lower()


def test_same_question_twice_gives_identical_answer(client: httpx.Client) -> None:
    first = ask(client, "What is a liquidity pool?")
    second = ask(client, "  what is a LIQUIDITY pool?  ")
    assert first.pop("answer_id") != second.pop("answer_id")  # each answer its own id, to rate it
    assert first == second


def test_health(client: httpx.Client) -> None:
    body = client.get("/health").json()
    assert body["status"] == "healthy"
    assert body["agent_loaded"] is True
    assert "knowledge-base entries" in body["message"]
