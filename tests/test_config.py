"""Configuration: bad values stop start-up with one clear line; the template matches Settings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bootstrap import embedding_parallelism
from config import Settings
from tests.conftest import ROOT


def run_main(env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PORT": "1", "LOG_DIR": "", **env}
    return subprocess.run(
        [sys.executable, "main.py"], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RATE_LIMIT_REQUESTS_PER_MINUTE": "-5"}, "RATE_LIMIT_REQUESTS_PER_MINUTE='-5'"),
        ({"ENVIRONMENT": "moon"}, "ENVIRONMENT='moon'"),
        ({"PORT": "70000"}, "PORT='70000'"),
        ({"AGENT_SIMILARITY_THRESHOLD": "1.5"}, "AGENT_SIMILARITY_THRESHOLD='1.5'"),
        ({"CACHE_ENABLED": "maybe"}, "CACHE_ENABLED='maybe'"),
        ({"ENVIRONMENT": "production", "ALLOWED_ORIGINS": "https://a.example,*"}, "ALLOWED_ORIGINS must not contain"),
        ({"ENVIRONMENT": "production", "DEBUG": "true"}, "DEBUG must be false"),
        ({"USE_HTTPS": "true", "TRUSTED_PROXIES": ""}, "USE_HTTPS=true needs TRUSTED_PROXIES"),
        ({"TRUSTED_PROXIES": "10.0.0.0/8,not-a-network"}, "TRUSTED_PROXIES="),
        ({"RATE_LIMIT_STORAGE_URI": "ftp://x"}, "RATE_LIMIT_STORAGE_URI='ftp://x'"),
    ],
)
def test_bad_value_stops_startup_with_one_line(env: dict[str, str], expected: str) -> None:
    result = run_main(env, timeout=30)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Invalid configuration:")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_production_needs_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """SECRET_KEY is reserved and unused: production (the original recipe's `-e ENVIRONMENT=production`) needs none."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    settings = Settings(_env_file=None, environment="production")  # type: ignore[call-arg]
    assert settings.secret_key is None and "*" not in settings.allowed_origins
    assert Settings(_env_file=None, environment="production", secret_key="x" * 40).secret_key is not None  # type: ignore[call-arg]


def test_invalid_dataset_stops_startup_naming_the_entry(tmp_path: Path) -> None:
    dataset = tmp_path / "bad.json"
    good = {
        "id": "a",
        "category": "c",
        "question": "What is a?",
        "alternatives": ["x a", "y a"],
        "answer": "A is a thing. It exists.",
    }
    dataset.write_text(json.dumps([good, {**good, "id": "b", "answer": ""}]))
    result = run_main({"DATASET_PATH": str(dataset), "CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode != 0
    output = result.stderr + result.stdout
    assert "bad.json: b: answer: String should have at least 20 characters" in output
    assert "answer" in output
    assert "Traceback" not in output


def test_template_lists_exactly_the_settings() -> None:
    template = (ROOT / "environment_template.txt").read_text()
    names = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", template, flags=re.MULTILINE))
    assert names == {name.upper() for name in Settings.model_fields}


def test_template_defaults_match_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    template = (ROOT / "environment_template.txt").read_text()
    for name, value in re.findall(r"^([A-Z][A-Z0-9_]*)=(\S*)", template, flags=re.MULTILINE):
        current = getattr(defaults, name.lower())
        if value == "" or name in {"DATASET_PATH", "CACHE_DIR"}:
            continue
        rendered = ",".join(current) if isinstance(current, list) else str(current).lower()
        assert rendered == value.lower() or _same_number(rendered, value), name


def _same_number(left: str, right: str) -> bool:
    try:
        return float(left) == float(right)
    except ValueError:
        return False


@pytest.mark.parametrize(
    ("env", "cores", "expected"),
    [
        ({}, 2, (2, 1)),  # local model: one single-threaded call per core
        ({}, 1, (1, 1)),
        ({}, 16, (4, 1)),  # at most 4 calls at once
        ({"EMBEDDING_WORKERS": "1"}, 2, (1, 2)),  # one call using both cores (the former behaviour)
        ({"EMBEDDING_WORKERS": "2", "EMBEDDING_THREADS": "3"}, 2, (2, 3)),
        ({"EMBEDDING_PROVIDER": "openai", "OPENAI_API_KEY": "k"}, 2, (4, 1)),  # concurrent remote requests
    ],
)
def test_embedding_parallelism(env: dict[str, str], cores: int, expected: tuple[int, int]) -> None:
    settings = Settings(_env_file=None, **{name.lower(): value for name, value in env.items()})  # type: ignore[call-arg]
    assert embedding_parallelism(settings, cores=cores) == expected
