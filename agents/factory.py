"""Build the agent and the services under it from settings (blocking: loads the model and index)."""

from __future__ import annotations

import time

import structlog

from agents.agent import DeFiAgent
from agents.graph import AgentSettings
from config import Settings
from services.embedding_cache import DiskCache, MemoryCache
from services.embeddings import EmbeddingService, create_provider
from services.knowledge_base import KnowledgeBase
from services.retrieval import build_retriever
from services.sessions import SessionStore

logger = structlog.get_logger(__name__)


def build_embedding_service(settings: Settings) -> EmbeddingService:
    """The configured provider behind the memory and disk caches."""
    provider = create_provider(
        settings.embedding_provider,
        threads=settings.embedding_threads,
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
    )


def build_agent(settings: Settings, knowledge_base: KnowledgeBase) -> DeFiAgent:
    """Load the embedder and the knowledge base's index; return a ready agent."""
    started = time.perf_counter()
    embeddings = build_embedding_service(settings)
    retriever, from_cache = build_retriever(
        knowledge_base, embeddings, settings.cache_dir if settings.cache_enabled else None
    )
    sessions = SessionStore(settings.session_ttl_seconds, settings.max_sessions, settings.session_max_turns)
    agent = DeFiAgent(
        embeddings,
        retriever,
        sessions,
        AgentSettings(
            similarity_threshold=settings.agent_similarity_threshold,
            max_results=settings.agent_max_results,
            question_max_chars=settings.question_max_chars,
            word_delay_seconds=settings.stream_word_delay_ms / 1000.0,
        ),
    )
    logger.info(
        "agent_built",
        entries=len(knowledge_base),
        phrasings=retriever.phrasing_count,
        provider=embeddings.provider.name,
        index_from_cache=from_cache,
        seconds=round(time.perf_counter() - started, 3),
    )
    return agent
