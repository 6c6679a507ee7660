"""The SHA256-keyed embedding cache: integrity, expiry, size cap, and recovery through the live server."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

from services.embedding_cache import DiskCache, MemoryCache, cache_key
from services.text import normalize_text
from tests.conftest import ServerProcess


def vector(seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    return values / np.linalg.norm(values)


def test_key_depends_on_model_and_normalized_text() -> None:
    assert normalize_text("  What IS   Aave?\n") == "what is aave?"
    assert cache_key("m1", "What is Aave?") == cache_key("m1", "  what is   aave? ")
    assert cache_key("m1", "What is Aave?") != cache_key("m2", "What is Aave?")
    assert len(cache_key("m1", "x")) == 64


def test_round_trip_and_persistence(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_entries=10, expiry_days=30)
    cache.put("ab" * 32, vector(1))
    reopened = DiskCache(tmp_path, max_entries=10, expiry_days=30)
    stored = reopened.get("ab" * 32)
    assert stored is not None
    np.testing.assert_array_equal(stored, vector(1))


def test_truncated_and_altered_entries_are_discarded(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_entries=10, expiry_days=30)
    truncated, altered = "aa" * 32, "bb" * 32
    cache.put(truncated, vector(1))
    cache.put(altered, vector(2))
    truncated_path = next(tmp_path.glob(f"*/{truncated}.bin"))
    truncated_path.write_bytes(truncated_path.read_bytes()[:100])
    altered_path = next(tmp_path.glob(f"*/{altered}.bin"))
    blob = bytearray(altered_path.read_bytes())
    blob[-5] ^= 0xFF
    altered_path.write_bytes(bytes(blob))
    assert cache.get(truncated) is None
    assert cache.get(altered) is None
    assert not truncated_path.exists() and not altered_path.exists()


def test_expired_entries_are_discarded(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_entries=10, expiry_days=1)
    cache.put("cc" * 32, vector(3))
    path = next(tmp_path.glob("*/*.bin"))
    blob = bytearray(path.read_bytes())
    # Rewrite the creation time two days back; the checksum covers only the vector.
    import struct

    struct.pack_into("<d", blob, 4, time.time() - 2 * 86_400)
    path.write_bytes(bytes(blob))
    assert cache.get("cc" * 32) is None


def test_size_cap_evicts_least_recently_used(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_entries=3, expiry_days=30)
    keys = [f"{index:02d}" * 32 for index in range(4)]
    for index, key in enumerate(keys[:3]):
        cache.put(key, vector(index))
    assert cache.get(keys[0]) is not None  # keys[0] becomes most recently used
    cache.put(keys[3], vector(3))
    assert len(cache) == 3
    assert cache.get(keys[1]) is None
    assert all(cache.get(key) is not None for key in (keys[0], keys[2], keys[3]))
    assert len(list(tmp_path.glob("*/*.bin"))) == 3


def test_unwritable_directory_degrades_without_raising(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = DiskCache(blocker / "cache", max_entries=3, expiry_days=30)
    cache.put("dd" * 32, vector(4))
    assert cache.get("dd" * 32) is None
    assert cache.healthy is False


def test_memory_cache_is_bounded() -> None:
    cache = MemoryCache(max_size=2)
    cache.put("a", vector(1))
    cache.put("b", vector(2))
    cache.get("a")
    cache.put("c", vector(3))
    assert cache.get("b") is None
    assert cache.get("a") is not None and cache.get("c") is not None


def test_corrupted_entry_is_recomputed_by_live_server(
    start_server: Callable[..., ServerProcess], server: ServerProcess, shared_cache_dir: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    shutil.copytree(shared_cache_dir / "index", cache_dir / "index")  # start warm: only the query cache is new
    isolated = start_server(
        CACHE_DIR=str(cache_dir), AGENT_CACHE_ENABLED="false", EMBEDDING_MEMORY_CACHE_ENABLED="false"
    )
    question = {"question": "How does a health factor work on Aave?"}
    with httpx.Client(base_url=isolated.base_url, timeout=30) as client:
        first = client.post("/ask", json=question).json()
        deadline = time.monotonic() + 10
        while not list((cache_dir / "embeddings").glob("*/*.bin")) and time.monotonic() < deadline:
            time.sleep(0.05)
        (entry,) = list((cache_dir / "embeddings").glob("*/*.bin"))
        entry.write_bytes(entry.read_bytes()[:-17])
        second = client.post("/ask", json=question)
        assert second.status_code == 200
        assert second.json()["sources"][0]["id"] == first["sources"][0]["id"]
        deadline = time.monotonic() + 10
        while (not entry.exists() or entry.stat().st_size != 48 + 384 * 4) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert entry.stat().st_size == 48 + 384 * 4
        assert '"reason": "truncated vector"' in isolated.log()
        assert os.access(entry, os.R_OK)
