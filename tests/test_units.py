"""Small pure pieces: follow-up rewriting, dataset validation, question validation."""

from __future__ import annotations

import asyncio
import gc
import json
from pathlib import Path

import pytest

from agents.followup import extract_topic, resolve_follow_up
from agents.validation import InvalidQuestionError, clean_question
from infrastructure.runtime_tuning import freeze_startup_heap
from services.knowledge_admin import diff_datasets
from services.knowledge_base import DatasetError, load_knowledge_base, parse_dataset

GOOD = {
    "id": "what-is-x",
    "category": "fundamentals",
    "question": "What is X?",
    "alternatives": ["x explained", "define x"],
    "answer": "X is a thing.  It matters.",
}


@pytest.mark.parametrize(
    ("previous", "question", "expected"),
    [
        ("What is Aave?", "what are its risks?", "what are Aave's risks?"),
        ("what is aave", "is it safe?", "is aave safe?"),
        ("Tell me about flash loans", "who uses them?", "who uses flash loans?"),
        ("What is Aave?", "what about Compound?", "What is Compound?"),
        ("What is a DEX?", "What is a CEX?", "What is a CEX?"),
        (None, "what are its risks?", "what are its risks?"),
    ],
)
def test_resolve_follow_up(previous: str | None, question: str, expected: str) -> None:
    assert resolve_follow_up(question, previous) == expected


def test_extract_topic() -> None:
    assert extract_topic("How does Uniswap v3 concentrated liquidity work?") == "Uniswap v3 concentrated liquidity"
    assert extract_topic("so what's the difference between a very long list of many different things here?") is None


def test_clean_question() -> None:
    assert clean_question("  hi there \n", 100) == "hi there"
    with pytest.raises(InvalidQuestionError) as error:
        clean_question("a" * 101, 100)
    assert error.value.code == "question_too_long"
    with pytest.raises(InvalidQuestionError):
        clean_question("a\x00b", 100)


def write(tmp_path: Path, entries: object) -> Path:
    path = tmp_path / "kb.json"
    path.write_text(json.dumps(entries))
    return path


def test_loader_normalises_and_hashes(tmp_path: Path) -> None:
    knowledge_base = load_knowledge_base(write(tmp_path, [GOOD]))
    assert knowledge_base.entries[0].answer == "X is a thing. It matters."
    assert len(knowledge_base.content_hash) == 64
    assert knowledge_base.by_id("what-is-x") is not None


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([GOOD, GOOD], "what-is-x: id: duplicate id 'what-is-x'"),
        ([{**GOOD, "question": "   "}], "what-is-x: question: "),
        ([{**GOOD, "id": 7}], "#0: id: "),  # no usable id: named by its position
        ([{**GOOD, "alternatives": ["only one"]}], "alternatives"),
        ([{**GOOD, "id": "Bad Id"}], "kebab-case"),
        ([{k: v for k, v in GOOD.items() if k != "answer"}], "answer: Field required"),
        ([], "non-empty list"),
        ({"entries": "nope"}, "non-empty list"),
    ],
)
def test_loader_names_the_bad_entry(tmp_path: Path, entries: object, message: str) -> None:
    with pytest.raises(DatasetError) as error:
        load_knowledge_base(write(tmp_path, entries))
    assert message in str(error.value)


def test_loader_reports_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read"):
        load_knowledge_base(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_knowledge_base(broken)


def test_freeze_startup_heap_takes_live_objects_out_of_the_collector() -> None:
    survivors = [[number] for number in range(1000)]  # lists are tracked by the cyclic collector
    before = gc.get_freeze_count()
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= before + len(survivors)
    finally:
        gc.unfreeze()


def test_a_new_subject_changes_no_other_entry() -> None:
    """Adding an entry with a new subject changes every entry's vocabulary, not its fields: one entry added."""
    seed = Path(__file__).resolve().parents[1] / "data" / "knowledge_base.json"
    live = parse_dataset(seed.read_bytes(), "seed")
    entries = json.loads(seed.read_text())
    added = {**entries[0], "id": "zorblax-token", "subjects": ["Zorblax"], "question": "What is the Zorblax token?"}
    changed = {**entries[1], "answer": entries[1]["answer"] + " One more sentence."}
    proposed = parse_dataset(json.dumps([entries[0], changed, *entries[2:], added]).encode(), "request")
    assert proposed.entries[0].vocabulary != live.entries[0].vocabulary  # the private part did change
    assert diff_datasets(live, proposed) == {"added": ["zorblax-token"], "changed": [entries[1]["id"]], "removed": []}


class _RecordingSocket:
    """Stands in for the OS socket under a transport: records each write, in order."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def get_extra_info(self, name: str) -> str:
        return f"extra:{name}"


async def test_websocket_writes_of_one_loop_turn_reach_the_socket_as_one() -> None:
    from infrastructure.http_server import CoalescingTransport

    socket = _RecordingSocket()
    transport = CoalescingTransport(socket, asyncio.get_running_loop())
    for frame in (b"word-1 ", b"word-2 ", b"word-3"):
        transport.write(frame)
    assert socket.writes == []  # held until the end of this turn of the loop
    await asyncio.sleep(0)
    assert socket.writes == [b"word-1 word-2 word-3"]
    transport.write(b"single")
    await asyncio.sleep(0)
    assert socket.writes[-1] == b"single"
    transport.write(b"last words")
    transport.close()  # what is queued goes out before the close
    assert socket.writes[-1] == b"last words" and socket.closing
    transport.write(b"after close")
    await asyncio.sleep(0)
    assert socket.writes[-1] == b"last words"  # nothing is written to a closing socket
    assert transport.get_extra_info("peername") == "extra:peername"


async def test_websocket_abort_drops_what_is_queued() -> None:
    from infrastructure.http_server import CoalescingTransport

    socket = _RecordingSocket()
    transport = CoalescingTransport(socket, asyncio.get_running_loop())
    transport.write(b"never sent")
    transport.abort()
    await asyncio.sleep(0)
    assert socket.writes == [] and socket.aborted
