"""Build the agent and the services under it from settings (blocking: loads the model and index)."""

from __future__ import annotations

import os
import time

import structlog
from redis.asyncio import Redis

from agents.agent import DeFiAgent
from agents.graph import AgentSettings
from config import Settings
from services.embedding_cache import DiskCache, MemoryCache, SharedCache
from services.embeddings import EmbeddingService, OpenAIProvider, create_provider
from services.generation import AnswerGenerator
from services.knowledge_base import KnowledgeBase
from services.retrieval import build_retriever
from services.sessions import MemorySessionStore, RedisSessionStore, SessionStore

logger = structlog.get_logger(__name__)


def embedding_parallelism(settings: Settings, cores: int | None = None) -> tuple[int, int]:
    """(model calls at once, ONNX Runtime threads per call) from EMBEDDING_WORKERS / EMBEDDING_THREADS.

    By default the local model runs one single-threaded call per core: on 2 cores a call on 12 questions
    cost 5.1 ms of CPU per question with one thread and 7.7 ms with two (docs/performance.md).
    """
    cores = max(1, min(cores or os.cpu_count() or 1, 4))
    default_workers = cores if settings.embedding_provider == "local" else 4
    workers = settings.embedding_workers or default_workers
    threads = settings.embedding_threads or max(1, cores // workers)
    return workers, threads


def build_embedding_service(settings: Settings, redis: Redis | None = None) -> EmbeddingService:
    """The configured provider behind the memory, shared (with Redis) and disk caches."""
    workers, threads = embedding_parallelism(settings)
    provider = create_provider(
        settings.embedding_provider,
        threads=threads,
        openai_api_key=settings.openai_api_key.get_secret_value() if settings.openai_api_key else None,
        openai_model=settings.openai_embedding_model,
        openai_base_url=settings.openai_base_url,
        openai_timeout_seconds=settings.openai_timeout_seconds,
        openai_max_retries=settings.openai_max_retries,
    )
    memory = MemoryCache(settings.cache_max_size) if settings.agent_cache_enabled else None
    disk = (
        DiskCache(settings.cache_dir / "embeddings", settings.cache_max_size, settings.cache_expiry_days)
        if settings.cache_enabled
        else None
    )
    return EmbeddingService(
        provider,
        memory,
        disk,
        max_batch_size=settings.embedding_batch_size,
        batch_window_ms=settings.embedding_batch_window_ms,
        shared_cache=SharedCache(redis, settings.cache_expiry_days) if redis is not None else None,
        workers=workers,
    )


def build_session_store(settings: Settings, redis: Redis | None = None) -> SessionStore:
    """Sessions in Redis when REDIS_URL is set (shared by every process), otherwise in this process."""
    if redis is not None:
        return RedisSessionStore(redis, settings.session_ttl_seconds, settings.session_max_turns)
    return MemorySessionStore(settings.session_ttl_seconds, settings.max_sessions, settings.session_max_turns)


def build_generator(settings: Settings) -> AnswerGenerator | None:
    """The chat model for ANSWER_MODE=generative, or None for extractive answers."""
    if settings.answer_mode != "generative" or settings.openai_api_key is None:
        return None
    return AnswerGenerator(
        settings.openai_chat_model,
        settings.openai_api_key.get_secret_value(),
        settings.openai_base_url,
        settings.openai_timeout_seconds,
        settings.openai_max_retries,
        settings.answer_max_tokens,
    )


def check_remote_providers(settings: Settings) -> None:
    """Before anything is built, prove the remote API takes the key and knows the models (blocking).

    Raises ProviderCheckError with one line naming the setting to fix. Costs one embedding request
    (EMBEDDING_PROVIDER=openai) and one model listing (ANSWER_MODE=generative); nothing for local-only set-ups.
    """
    if settings.embedding_provider == "openai" and settings.openai_api_key is not None:
        OpenAIProvider(
            settings.openai_api_key.get_secret_value(),
            settings.openai_embedding_model,
            settings.openai_base_url,
            settings.openai_timeout_seconds,
            settings.openai_max_retries,
        ).check()
    generator = build_generator(settings)
    if generator is not None:
        generator.check()


def build_agent(settings: Settings, knowledge_base: KnowledgeBase, redis: Redis | None = None) -> DeFiAgent:
    """Load the embedder and the knowledge base's index; return a ready agent (`redis`: the shared pool)."""
    started = time.perf_counter()
    embeddings = build_embedding_service(settings, redis)
    retriever, from_cache = build_retriever(
        knowledge_base, embeddings, settings.cache_dir if settings.cache_enabled else None
    )
    sessions = build_session_store(settings, redis)
    agent = DeFiAgent(
        embeddings,
        retriever,
        sessions,
        AgentSettings(
            similarity_threshold=settings.agent_similarity_threshold,
            max_results=settings.agent_max_results,
            question_max_chars=settings.question_max_chars,
            word_delay_seconds=settings.stream_word_delay_ms / 1000.0,
            context_entries=settings.answer_context_entries,
        ),
        build_generator(settings),
        answer_cache_size=settings.cache_max_size if settings.agent_cache_enabled else 0,
    )
    logger.info(
        "agent_built",
        entries=len(knowledge_base),
        phrasings=retriever.phrasing_count,
        provider=embeddings.provider.name,
        answer_mode=settings.answer_mode,
        index_from_cache=from_cache,
        shared_state="redis" if redis is not None else "in-process",
        seconds=round(time.perf_counter() - started, 3),
    )
    return agent
