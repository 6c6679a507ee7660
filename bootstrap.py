"""The composition root: every service is built here, once, from the settings, and released at shutdown.

`main.create_app` calls `check_startup` (fast checks that stop a misconfigured process with exit code 2)
and the lifespan calls `start_services` / `stop_services`. Nothing below `main` and `api` builds a
service; the routes receive them through the typed dependencies of `api/deps.py`.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field

import structlog
from redis.asyncio import Redis

from agents.agent import AnswerListener, DeFiAgent
from agents.answer_cache import AnswerCache
from agents.context import AgentSettings
from api.monitoring import Monitoring
from config import APP_VERSION, Settings
from infrastructure.database import Database, describe_url
from infrastructure.metrics import register_cache_sizes, set_build_info, sizes_of
from infrastructure.rate_limit import QuestionRateLimiter
from infrastructure.redis_client import create_redis
from infrastructure.runtime_tuning import (
    freeze_startup_heap,
    limit_blas_threads,
    release_freed_memory,
    release_freed_memory_every,
)
from services.embedding_cache import DiskCache, MemoryCache, SharedCache
from services.embedding_providers import EmbeddingProvider, LocalMiniLMProvider, OpenAIProvider
from services.embeddings import EmbeddingService
from services.evaluation import load_labelled_questions
from services.feedback import FeedbackStore
from services.generation import AnswerGenerator
from services.insights import Insights
from services.knowledge import LiveKnowledge, build_snapshot
from services.knowledge_admin import KnowledgeManager, sync_seed
from services.knowledge_base import DatasetError, KnowledgeBase, load_knowledge_base
from services.knowledge_versions import KnowledgeVersions
from services.openai_compat import ProviderCheckError
from services.question_log import AnswerRecord, QuestionLog
from services.sessions import MemorySessionStore, RedisSessionStore, SessionStore

logger = structlog.get_logger(__name__)


@dataclass
class Services:
    """Everything the lifespan built, to be released by `stop_services`."""

    redis: Redis | None
    embeddings: EmbeddingService
    knowledge: LiveKnowledge
    sessions: SessionStore
    answer_cache: AnswerCache | None
    agent: DeFiAgent
    database: Database | None = None
    question_log: QuestionLog | None = None
    feedback: FeedbackStore | None = None
    insights: Insights | None = None
    knowledge_manager: KnowledgeManager | None = None
    background: list[asyncio.Task[None]] = field(default_factory=list)


def load_seed_or_exit(settings: Settings) -> KnowledgeBase:
    """Read the dataset file and check the remote providers; a problem stops the process with exit code 2."""
    try:
        knowledge_base = load_knowledge_base(settings.dataset_path)
        check_remote_providers(settings)
    except (DatasetError, ProviderCheckError) as error:
        print(f"Start-up failed: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return knowledge_base


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


def build_provider(settings: Settings, workers: int, threads: int) -> EmbeddingProvider:
    """The configured embedding provider (blocking: loads the local model)."""
    if settings.embedding_provider == "openai":
        assert settings.openai_api_key is not None  # Settings refuses openai without a key
        return OpenAIProvider(
            settings.openai_api_key.get_secret_value(),
            settings.openai_embedding_model,
            settings.openai_base_url,
            settings.openai_timeout_seconds,
            settings.openai_max_retries,
        )
    return LocalMiniLMProvider(threads=threads, workers=workers)


def build_embedding_service(settings: Settings, redis: Redis | None = None) -> EmbeddingService:
    """The configured provider behind the memory, shared (with Redis) and disk caches (blocking)."""
    workers, threads = embedding_parallelism(settings)
    memory = MemoryCache(settings.cache_max_size) if settings.embedding_memory_cache_enabled else None
    disk = (
        DiskCache(settings.cache_dir / "embeddings", settings.cache_max_size, settings.cache_expiry_days)
        if settings.cache_enabled
        else None
    )
    return EmbeddingService(
        build_provider(settings, workers, threads),
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
        return RedisSessionStore(
            redis, settings.session_ttl_seconds, settings.session_max_turns, settings.max_sessions_per_client
        )
    return MemorySessionStore(
        settings.session_ttl_seconds,
        settings.max_sessions,
        settings.session_max_turns,
        settings.max_sessions_per_client,
    )


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


def agent_settings(settings: Settings) -> AgentSettings:
    """The knobs the graph reads, from the settings."""
    return AgentSettings(
        similarity_threshold=settings.agent_similarity_threshold,
        max_results=settings.agent_max_results,
        question_max_chars=settings.question_max_chars,
        word_delay_seconds=settings.stream_word_delay_ms / 1000.0,
        context_entries=settings.answer_context_entries,
        session_wait_seconds=settings.session_wait_seconds,
    )


async def build_core(
    settings: Settings,
    seed: KnowledgeBase,
    redis: Redis | None = None,
    on_answer: AnswerListener | None = None,
    version: int = 1,
) -> Services:
    """Load the embedder, index the seed knowledge base and assemble the agent (blocking parts off the loop).

    Also used on its own by `make eval` and the tests that measure answer quality in process.
    """
    started = time.perf_counter()
    limit_blas_threads()
    embeddings = await asyncio.to_thread(build_embedding_service, settings, redis)
    await embeddings.start()
    snapshot = await build_snapshot(
        seed,
        embeddings,
        version=version,
        loaded_from=seed.source,
        max_results=settings.agent_max_results,
        cache_dir=settings.cache_dir if settings.cache_enabled else None,
    )
    knowledge = LiveKnowledge(snapshot)
    embeddings.dimension = snapshot.retriever.dimension  # a cached vector of another size is refused
    sessions = build_session_store(settings, redis)
    generator = build_generator(settings)
    answer_cache = AnswerCache(settings.cache_max_size) if settings.agent_cache_enabled and generator is None else None
    agent = DeFiAgent(
        embeddings,
        knowledge,
        sessions,
        agent_settings(settings),
        generator,
        answer_cache,
        on_answer=on_answer,
    )
    logger.info(
        "agent_built",
        entries=len(seed),
        phrasings=snapshot.retriever.phrasing_count,
        provider=embeddings.provider.name,
        answer_mode=settings.answer_mode,
        index_from_cache=snapshot.index_from_cache,
        shared_state="redis" if redis is not None else "in-process",
        seconds=round(time.perf_counter() - started, 3),
    )
    return Services(redis, embeddings, knowledge, sessions, answer_cache, agent)


async def open_database(settings: Settings) -> Database:
    """Connect to the database and bring its schema up to date (Alembic migrations, one process at a time)."""
    database = Database(settings.database)
    try:
        await database.migrate()
    except Exception as error:
        await database.close()
        logger.error("database_unavailable", url=describe_url(database.url), error=f"{type(error).__name__}: {error}")
        raise RuntimeError(f"the database at {describe_url(database.url)} cannot be used: {error}") from error
    return database


def build_question_log(settings: Settings, database: Database) -> QuestionLog:
    """The question log on the database, with the configured retention and queue size."""
    return QuestionLog(
        database,
        enabled=settings.question_log_enabled,
        max_chars=settings.question_max_chars,
        retention_days=settings.question_log_retention_days,
        queue_size=settings.question_log_queue_size,
    )


def build_insights(settings: Settings, services: Services, database: Database) -> Insights:
    """The insights over the question log, grouping declined questions with the service's own embedder."""
    return Insights(
        database,
        services.embeddings,
        services.knowledge,
        settings.agent_similarity_threshold,
        review_max_days=settings.kb_review_max_days,
    )


def build_knowledge_manager(settings: Settings, services: Services, versions: KnowledgeVersions) -> KnowledgeManager:
    """Changes to the live knowledge base (admin API), checked against the labelled questions beside the dataset."""
    return KnowledgeManager(
        services.knowledge,
        versions,
        services.embeddings,
        max_results=settings.agent_max_results,
        cache_dir=settings.cache_dir if settings.cache_enabled else None,
        threshold=settings.agent_similarity_threshold,
        eval_questions=load_labelled_questions(settings.dataset_path.parent / "eval_questions.json"),
        review_max_days=settings.kb_review_max_days,
        refit_delay_seconds=settings.kb_refit_delay_seconds,
        redis=services.redis,
    )


def answer_listener(monitoring: Monitoring, question_log: QuestionLog) -> AnswerListener:
    """Every finished question goes to the dashboard's outcome window and the question log."""

    def on_answer(record: AnswerRecord) -> None:
        outcome = "answered" if record.outcome in ("answered", "generative", "fallback") else record.outcome
        monitoring.outcomes.record(outcome, record.confidence)
        question_log.record(record)

    return on_answer


async def start_services(settings: Settings, monitoring: Monitoring) -> Services:
    """Build every service of a serving process and start its background tasks.

    The knowledge base served is the newest version in the database; the dataset file becomes a new
    version first when it changed (checked by `load_seed_or_exit` before the app was built).
    """
    database = await open_database(settings)
    question_log = build_question_log(settings, database)
    await question_log.start()
    versions = KnowledgeVersions(database)
    version, knowledge_base = await sync_seed(database, versions, settings.dataset_path)
    redis = create_redis(settings.redis_url) if settings.redis_url else None  # connects lazily, never blocks here
    services = await build_core(settings, knowledge_base, redis, answer_listener(monitoring, question_log), version)
    services.database = database
    services.question_log = question_log
    services.feedback = FeedbackStore(question_log)
    services.insights = build_insights(settings, services, database)
    services.knowledge_manager = build_knowledge_manager(settings, services, versions)
    freeze_startup_heap()
    await asyncio.to_thread(release_freed_memory)
    set_build_info(APP_VERSION, platform.python_version(), services.embeddings.model_id)
    register_cache_sizes(
        sizes_of(
            memory=services.embeddings.memory_cache, disk=services.embeddings.disk_cache, answer=services.answer_cache
        )
    )
    services.background = [
        asyncio.create_task(services.sessions.run_cleanup(settings.session_cleanup_interval_seconds)),
        asyncio.create_task(monitoring.loop_lag.run()),
    ]
    services.background.append(asyncio.create_task(services.knowledge_manager.run()))
    if settings.memory_trim_interval_seconds > 0:
        services.background.append(
            asyncio.create_task(release_freed_memory_every(settings.memory_trim_interval_seconds))
        )
    if question_log.enabled:
        services.background += [asyncio.create_task(question_log.run()), asyncio.create_task(question_log.run_purge())]
    return services


async def stop_services(services: Services) -> None:
    """Cancel the background tasks and release threads and connections."""
    for task in services.background:
        task.cancel()
    for task in services.background:
        with suppress(asyncio.CancelledError):
            await task
    await services.embeddings.close()
    if services.question_log is not None:
        await services.question_log.close()
    if services.database is not None:
        await services.database.close()
    if services.redis is not None:
        await services.redis.aclose()


def build_rate_limiter(settings: Settings) -> QuestionRateLimiter:
    """The per-client question budget (in process, or in the configured shared storage)."""
    return QuestionRateLimiter(
        settings.rate_limit_requests_per_minute, settings.rate_limit_window_seconds, settings.rate_limit_storage_uri
    )
