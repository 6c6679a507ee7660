"""Insights over the question log: declined questions grouped by meaning, disputed entries, CSV, and the guard.

End to end against a real server (`python main.py`, its own SQLite database, ADMIN_TOKEN set): 42 questions
about three topics the knowledge base does not cover (each checked to be declined) and a few answered ones
go in over REST; `GET /admin/insights` must return exactly three groups with exactly those members. The
clustering function is also tested on its own, on synthetic unit vectors.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from services.insights import CLUSTER_SIMILARITY, TABLE_COLUMNS, TABLES, cluster_by_meaning
from tests.conftest import ServerProcess, poll_until

ADMIN_TOKEN = "insights-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WAIT_SECONDS = 30.0

SOURDOUGH = [
    "how do I keep my sourdough starter alive",
    "why is my sourdough bread so dense",
    "how often should I feed a sourdough starter",
    "what flour is best for sourdough bread",
    "how long should sourdough dough proof overnight",
    "my sourdough starter smells like nail polish, is it ruined",
    "how do I get a crispy crust on homemade sourdough",
    "what hydration should a beginner sourdough loaf have",
    "can I keep my sourdough starter in the fridge",
    "how do I shape a sourdough boule",
    "why didn't my sourdough loaf rise in the oven",
    "how do you score sourdough bread before baking",
    "do I need a dutch oven to bake sourdough bread",
    "how to make a sourdough starter from scratch",
]
MARATHON = [
    "how many weeks do I need to train for a marathon",
    "what should I eat the night before a marathon",
    "how long should my longest run be before a marathon",
    "how do I avoid hitting the wall in a marathon",
    "what pace should I run my first marathon at",
    "how many miles a week for marathon training",
    "how long should I taper before a marathon",
    "how do I prevent blisters when running a marathon",
    "how do I recover after running a marathon",
    "do I need energy gels during a marathon",
    "how to train for a marathon as a beginner runner",
    "is it ok to walk during a marathon",
    "how fast should my easy runs be in marathon training",
    "what running shoes are best for a marathon",
]
HOUSEPLANTS = [
    "why are the leaves on my houseplant turning yellow",
    "how often should I water my houseplants",
    "when should I repot my houseplant into a bigger pot",
    "what houseplants survive in low light",
    "my indoor plant is dropping leaves, what do I do",
    "how do I get rid of gnats in my houseplant soil",
    "should I mist my indoor plants",
    "how to propagate a houseplant cutting in water",
    "what causes brown leaf tips on indoor plants",
    "which houseplants are safe for cats",
    "how much sunlight does an indoor plant need",
    "is tap water bad for houseplants",
    "how do I tell if I'm overwatering my houseplant",
    "when should I fertilize my indoor plants",
]
TOPICS = {"sourdough": SOURDOUGH, "marathon": MARATHON, "houseplants": HOUSEPLANTS}
REPEATED = SOURDOUGH[0]  # asked twice: a group counts rows, not distinct texts
ANSWERABLE = ["What is impermanent loss?", "how does a flash loan work", "What is MEV?", "What is Aave?"]
DISPUTED_COMMENT = "This does not explain how the pool rebalances: " + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def insights_server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """A server of its own: only this module's questions are in its log."""
    return start_server(ADMIN_TOKEN=ADMIN_TOKEN)


@pytest.fixture(scope="module")
def http(insights_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=insights_server.base_url, timeout=60.0) as client:
        yield client


@pytest.fixture(scope="module")
def asked(http: httpx.Client) -> dict[str, Any]:
    """Every question asked once (one twice); the answered ones' bodies by question."""
    answered: dict[str, dict[str, Any]] = {}
    not_declined = []
    for question in [*SOURDOUGH, *MARATHON, *HOUSEPLANTS, REPEATED]:
        body = http.post("/ask", json={"question": question}).raise_for_status().json()
        if body["processing_stage"] != "no_match":
            not_declined.append((question, body["processing_stage"], body["confidence"]))
    assert not not_declined, f"these topic questions were not declined: {not_declined}"
    for question in ANSWERABLE:
        body = http.post("/ask", json={"question": question}).raise_for_status().json()
        assert body["processing_stage"] == "response_complete", (question, body)
        answered[question] = body
    total = len(SOURDOUGH) + len(MARATHON) + len(HOUSEPLANTS) + 1 + len(ANSWERABLE)

    def flushed() -> dict[str, Any] | None:
        report = insights(http)
        return report if report["totals"]["questions"] == total else None

    poll_until(flushed, WAIT_SECONDS, interval=0.25)  # the log is written off the answer path
    return {"answered": answered, "total": total}


def insights(http: httpx.Client, **params: Any) -> dict[str, Any]:
    response = http.get("/admin/insights", params=params, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    return body


# --- declined questions grouped by meaning -----------------------------------------------------------------------


def test_declined_questions_come_back_as_one_group_per_topic(http: httpx.Client, asked: dict[str, Any]) -> None:
    report = insights(http, days=7)
    groups = report["missing_topics"]
    assert len(groups) == 3, [group["examples"] for group in groups]
    by_topic = {}
    for group in groups:
        members = set(group["members"])
        topic = next((name for name, questions in TOPICS.items() if members == set(questions)), None)
        assert topic is not None, f"a group mixes topics or misses members: {sorted(members)}"
        by_topic[topic] = group
        assert group["distinct_questions"] == len(TOPICS[topic])
        assert len(group["examples"]) == 5 and set(group["examples"]) <= members
        assert group["examples"] == group["members"][:5]  # the most central phrasings first
        nearest = group["nearest_entry"]
        assert nearest is not None and nearest["id"] and nearest["question"]
        assert 0.0 <= nearest["score"] < report["similarity_threshold"]  # declined: below the threshold
    assert set(by_topic) == set(TOPICS)
    assert by_topic["sourdough"]["count"] == len(SOURDOUGH) + 1  # rows, the repeated question counted twice
    assert by_topic["marathon"]["count"] == len(MARATHON)
    assert groups[0] is by_topic["sourdough"]  # the most-asked topic first
    assert report["declined_texts_clustered"] == len(SOURDOUGH) + len(MARATHON) + len(HOUSEPLANTS)
    assert report["totals"]["no_match"] == len(SOURDOUGH) + len(MARATHON) + len(HOUSEPLANTS) + 1


def test_usage_near_threshold_and_answer_rate(http: httpx.Client, asked: dict[str, Any]) -> None:
    report = insights(http, days=1)
    answered = asked["answered"]
    entries = [body["sources"][0]["id"] for body in answered.values()]
    usage = {row["entry_id"]: row["uses"] for row in report["entry_usage"]}
    expected_usage: dict[str, int] = {}
    for entry in entries:
        expected_usage[entry] = expected_usage.get(entry, 0) + 1
    assert usage == expected_usage
    unused = {row["entry_id"] for row in report["unused_entries"]}
    assert unused and not unused & set(entries)
    threshold = report["similarity_threshold"]
    near = {question for question, body in answered.items() if threshold <= body["confidence"] < threshold + 0.05}
    assert {row["question"] for row in report["near_threshold"]} == near
    rate = report["answer_rate"]
    assert rate["bucket"] == "hour"  # days <= 2: per hour
    assert sum(row["questions"] for row in rate["rows"]) == asked["total"]
    assert sum(row["answered"] for row in rate["rows"]) == len(ANSWERABLE)
    assert sum(row["no_match"] for row in rate["rows"]) == report["totals"]["no_match"]
    assert insights(http, days=30)["answer_rate"]["bucket"] == "day"


def test_wrong_feedback_puts_the_entry_on_top_of_disputed_entries(http: httpx.Client, asked: dict[str, Any]) -> None:
    body = asked["answered"]["What is impermanent loss?"]
    entry = body["sources"][0]["id"]
    other = asked["answered"]["What is MEV?"]
    for answer, comment in [(other, None), (body, DISPUTED_COMMENT)]:
        sent = {"answer_id": answer["answer_id"], "rating": "wrong", "comment": comment}
        http.post("/v2/feedback", json=sent).raise_for_status()
    # A second opinion on the same answer from another conversation: two "wrong" ratings for the entry.
    second = {"answer_id": body["answer_id"], "rating": "wrong", "session_id": uuid.uuid4().hex}
    http.post("/v2/feedback", json=second).raise_for_status()
    helpful = {"answer_id": asked["answered"]["What is Aave?"]["answer_id"], "rating": "helpful"}
    http.post("/v2/feedback", json=helpful).raise_for_status()
    disputed = insights(http)["disputed_entries"]
    top = disputed[0]
    assert top["entry_id"] == entry and top["question"]
    assert (top["wrong"], top["helpful"]) == (2, 0)
    assert [comment["comment"] for comment in top["comments"]] == [DISPUTED_COMMENT]
    assert [(row["entry_id"], row["wrong"]) for row in disputed] == [(entry, 2), (other["sources"][0]["id"], 1)]
    csv_rows = read_csv(http, "disputed_entries")  # helpful-only entries are not disputed
    assert [row["entry_id"] for row in csv_rows] == [entry, other["sources"][0]["id"]]
    assert csv_rows[0]["comments"] == DISPUTED_COMMENT


# --- CSV -------------------------------------------------------------------------------------------------------


def read_csv(http: httpx.Client, table: str) -> list[dict[str, str]]:
    response = http.get("/admin/insights", params={"format": "csv", "table": table}, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    reader = csv.DictReader(io.StringIO(response.text))
    assert tuple(reader.fieldnames or ()) == TABLE_COLUMNS[table]
    return list(reader)


def test_every_table_as_csv(http: httpx.Client, asked: dict[str, Any]) -> None:
    topics = read_csv(http, "missing_topics")
    assert sorted(int(row["count"]) for row in topics) == sorted([len(SOURDOUGH) + 1, len(MARATHON), len(HOUSEPLANTS)])
    for row in topics:
        assert len(row["examples"].split(" | ")) == 5
        assert row["nearest_entry_id"] and float(row["nearest_score"]) >= 0
    rate = read_csv(http, "answer_rate")
    assert sum(int(row["questions"]) for row in rate) == asked["total"]
    usage = read_csv(http, "entry_usage")
    assert sum(int(row["uses"]) for row in usage) == len(ANSWERABLE)
    for table in TABLES:
        read_csv(http, table)


@pytest.mark.parametrize("params", [{"format": "csv"}, {"format": "csv", "table": "answers"}])
def test_csv_without_a_valid_table_is_422_naming_the_tables(
    http: httpx.Client, insights_server: ServerProcess, params: dict[str, str]
) -> None:
    response = http.get("/admin/insights", params=params, headers=AUTH)
    assert response.status_code == 422
    body = response.json()
    assert set(body) == {"detail", "type", "code", "reason"} and body["code"] == 422
    assert all(table in body["detail"] for table in TABLES), body["detail"]


# --- the guard and bad input -----------------------------------------------------------------------------------


def test_insights_are_guarded_like_the_dashboard(http: httpx.Client, insights_server: ServerProcess) -> None:
    for headers, expected in [({}, 401), ({"Authorization": "Bearer not-the-token"}, 401)]:
        response = http.get("/admin/insights", headers=headers)
        dashboard = http.get("/dashboard", headers=headers)
        assert response.status_code == dashboard.status_code == expected
        body = response.json()
        assert set(body) == {"detail", "type", "code", "reason"} and body["code"] == expected
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert http.get("/admin/insights", params={"token": ADMIN_TOKEN}).status_code == 200  # ?token= like /dashboard


@pytest.mark.parametrize("days", ["0", "366", "-1", "week"])
def test_days_out_of_range_is_422(http: httpx.Client, insights_server: ServerProcess, days: str) -> None:
    response = http.get("/admin/insights", params={"days": days}, headers=AUTH)
    assert response.status_code == 422
    body = response.json()
    assert set(body) == {"detail", "type", "code", "reason"} and "days" in body["detail"]


# --- the clustering function on its own ---------------------------------------------------------------------------


def unit(rows: np.ndarray) -> np.ndarray:
    normalized: np.ndarray = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return normalized


def topic_vectors(rng: np.random.Generator, sizes: list[int], spread: float) -> tuple[np.ndarray, list[int]]:
    """Unit vectors around len(sizes) random directions in 384 dimensions, and each one's topic."""
    centers = rng.normal(size=(len(sizes), 384))
    rows, labels = [], []
    for topic, size in enumerate(sizes):
        rows.append(centers[topic] + rng.normal(scale=spread, size=(size, 384)))
        labels += [topic] * size
    return unit(np.vstack(rows)), labels


def test_clustering_recovers_the_topics() -> None:
    rng = np.random.default_rng(7)
    vectors, labels = topic_vectors(rng, [14, 9, 5], spread=0.09)  # members ~0.55 similar, topics ~0
    order = rng.permutation(len(labels))
    vectors, labels = vectors[order], [labels[index] for index in order]
    clusters = cluster_by_meaning(vectors)
    assert [len(cluster.members) for cluster in clusters] == [14, 9, 5]  # largest first
    for cluster in clusters:
        assert len({labels[index] for index in cluster.members}) == 1
        assert list(cluster.centrality) == sorted(cluster.centrality, reverse=True)
    assert sorted(index for cluster in clusters for index in cluster.members) == list(range(len(labels)))


def test_clustering_agrees_with_scipy_average_linkage() -> None:
    from scipy.cluster.hierarchy import fcluster, linkage

    rng = np.random.default_rng(11)
    vectors, _ = topic_vectors(rng, [20, 15, 10, 6, 3, 1, 1], spread=0.1)
    vectors = unit(vectors + rng.normal(scale=0.03, size=vectors.shape))
    for threshold in (0.1, CLUSTER_SIMILARITY, 0.4, 0.6):
        ours = sorted(sorted(cluster.members) for cluster in cluster_by_meaning(vectors, threshold))
        labels = fcluster(linkage(vectors.astype(np.float64), "average", metric="cosine"), 1 - threshold, "distance")
        theirs = sorted(sorted(np.flatnonzero(labels == label).tolist()) for label in set(labels.tolist()))
        assert ours == theirs, threshold


def test_clustering_edge_cases() -> None:
    assert cluster_by_meaning(np.zeros((0, 384), dtype=np.float32)) == []
    one = cluster_by_meaning(unit(np.ones((1, 384))))
    assert [cluster.members for cluster in one] == [(0,)]
    same = cluster_by_meaning(unit(np.ones((4, 384))))
    assert len(same) == 1 and sorted(same[0].members) == [0, 1, 2, 3]
    opposite = unit(np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]))
    assert len(cluster_by_meaning(opposite)) == 3  # nothing similar enough to merge
