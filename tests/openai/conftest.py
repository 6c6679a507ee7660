"""Fixtures for the tests against the OpenAI-compatible fake on loopback (`openai_stack` is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import OpenAIStack
from tests.fake_openai import FakeOpenAIServer


@pytest.fixture()
def fake(openai_stack: OpenAIStack) -> Iterator[FakeOpenAIServer]:
    """The fake API with fresh counts and no faults, cleaned up again after the test."""
    openai_stack.fake.reset()
    yield openai_stack.fake
    openai_stack.fake.reset()


@pytest.fixture()
def client(openai_stack: OpenAIStack) -> Iterator[httpx.Client]:
    """An httpx client bound to the server on the fake API (this folder's `client`, not the default server's)."""
    with httpx.Client(base_url=openai_stack.server.base_url, timeout=60.0) as http:
        yield http
