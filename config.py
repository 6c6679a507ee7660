"""Service configuration: one pydantic-settings class read from the environment and `.env`."""

from __future__ import annotations

import ipaddress
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent
APP_VERSION = "1.0.0"

Environment = Literal["development", "test", "staging", "production"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
SUPPORTED_DATABASE_SCHEMES = ("sqlite+aiosqlite", "postgresql+asyncpg")


def normalize_database_url(url: str) -> str:
    """The async-driver form of a database URL (`postgres://`, `postgresql://` and `sqlite://` get their driver).

    Raises ValueError for any other scheme.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        raise ValueError("must be a URL such as sqlite+aiosqlite:///path/defi.db or postgresql+asyncpg://host/db")
    scheme = {"postgres": "postgresql+asyncpg", "postgresql": "postgresql+asyncpg", "sqlite": "sqlite+aiosqlite"}.get(
        scheme, scheme
    )
    if scheme not in SUPPORTED_DATABASE_SCHEMES:
        raise ValueError(f"scheme {scheme!r} is not supported; use sqlite+aiosqlite:// or postgresql+asyncpg://")
    return f"{scheme}://{rest}"


def sqlite_url(path: Path) -> str:
    """The SQLite URL of a database file."""
    return f"sqlite+aiosqlite:///{path}"


class Settings(BaseSettings):
    """Every setting the service reads. Names match the environment variables (case-insensitive)."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False)

    # Runtime
    environment: Environment = "development"
    debug: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    reload: bool = False
    workers: int = Field(default=1, ge=1, le=64)
    enable_docs: bool = True

    # Logging
    log_level: LogLevel = "INFO"
    enable_console_logs: bool = True
    log_dir: str = "logs"
    log_question_max_chars: int = Field(default=80, ge=0)

    # HTTP
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://localhost:3000", "http://localhost:8000", "http://127.0.0.1:8000"]
    )
    rate_limit_requests_per_minute: int = Field(default=200, gt=0)
    rate_limit_window_seconds: int = Field(default=60, gt=0)
    rate_limit_storage_uri: str = "memory://"
    redis_url: str | None = None
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_body_bytes: int = Field(default=16_384, ge=1024)
    secret_key: SecretStr | None = None  # reserved: accepted but unused (nothing signs anything yet), so never required
    use_https: bool = False
    admin_token: SecretStr | None = None
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)  # client keys: /v1/* and /mcp
    api_keys_required_everywhere: bool = False  # with API_KEYS: every question endpoint needs a key
    metrics_token: SecretStr | None = None
    # Host names served (comma list; `*.example.com` any subdomain, `*` any host); others get 400 (middleware/hosts.py)
    allowed_hosts: str = Field(
        default="*",
        pattern=(
            r"(?i)^\s*(\*|\*\.[a-z0-9_-]+(\.[a-z0-9_-]+)*|[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?(:[0-9]+)?|\[[0-9a-f:.]+\](:[0-9]+)?)\s*"
            r"(,\s*(\*|\*\.[a-z0-9_-]+(\.[a-z0-9_-]+)*|[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?(:[0-9]+)?|\[[0-9a-f:.]+\](:[0-9]+)?)\s*)*$"
        ),
    )

    # Connection limits
    max_connections: int = Field(default=4000, ge=1)  # per process (infrastructure/http_server.py); then 503
    connection_reserve: int = Field(default=100, ge=0)  # busy connections over the cap, for /health and /metrics
    max_connections_per_client: int = Field(default=100, ge=1)  # per client address (IPv6: per /64); then 429
    max_request_header_bytes: int = Field(default=32_768, ge=1024, le=1_048_576)  # request line + headers; 431
    request_header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)  # to receive them all; then 408
    keep_alive_timeout_seconds: int = Field(default=5, ge=1, le=300)  # idle keep-alive connections are closed
    graceful_shutdown_seconds: int = Field(default=10, ge=1, le=300)  # on SIGTERM: open requests, streams, sockets

    # Agent and retrieval
    agent_similarity_threshold: float = Field(default=0.40, ge=0.0, le=1.0)
    agent_max_results: int = Field(default=5, ge=1, le=50)
    agent_cache_enabled: bool = True  # the answer cache: repeated extractive questions skip the graph
    question_max_chars: int = Field(default=1000, ge=10, le=100_000)
    dataset_path: Path = PROJECT_ROOT / "data" / "knowledge_base.json"

    # Embeddings and cache
    embedding_provider: Literal["local", "openai"] = "local"
    embedding_batch_size: int = Field(default=32, ge=1, le=256)
    embedding_batch_window_ms: float = Field(default=2.0, ge=0.0, le=100.0)
    embedding_threads: int = Field(default=0, ge=0, le=64)
    embedding_workers: int = Field(default=0, ge=0, le=16)
    cache_enabled: bool = True  # disk cache of question embeddings, and the index file
    embedding_memory_cache_enabled: bool = True  # in-memory LRU of question embeddings
    cache_dir: Path = PROJECT_ROOT / "cache"
    cache_max_size: int = Field(default=1000, ge=1)
    cache_expiry_days: int = Field(default=30, ge=1)

    # OpenAI-compatible provider (optional)
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_embedding_model: str = "text-embedding-3-small"
    openai_timeout_seconds: float = Field(default=20.0, gt=0)
    openai_max_retries: int = Field(default=2, ge=0, le=10)

    # Answers: extractive (the best entry's answer) or generative (a chat model writes it from the top entries)
    answer_mode: Literal["extractive", "generative"] = "extractive"
    openai_chat_model: str = "gpt-4o-mini"
    answer_context_entries: int = Field(default=3, ge=1, le=10)
    answer_max_tokens: int = Field(default=400, ge=16, le=4096)

    # Sessions
    session_ttl_seconds: int = Field(default=1800, gt=0)
    max_sessions: int = Field(default=10_000, gt=0)
    session_max_turns: int = Field(default=20, gt=0)
    session_cleanup_interval_seconds: float = Field(default=60.0, gt=0)
    memory_trim_interval_seconds: float = Field(default=20.0, ge=0.0)  # give freed memory back to the OS; 0 = never
    max_sessions_per_client: int = Field(default=100, gt=0)
    session_wait_seconds: float = Field(default=15.0, ge=0.0, le=600.0)

    # Database: the question log and feedback (SQLite file by default, PostgreSQL when processes share it)
    database_url: str | None = None  # unset: sqlite+aiosqlite:///<CACHE_DIR>/defi.db
    question_log_enabled: bool = True
    question_log_retention_days: int = Field(default=30, ge=1, le=3650)
    question_log_queue_size: int = Field(default=10_000, ge=100, le=1_000_000)

    # Live knowledge base (admin API)
    kb_review_max_days: int = Field(default=180, ge=1, le=3650)
    admin_max_body_bytes: int = Field(default=8_388_608, ge=16_384, le=104_857_600)
    kb_refit_delay_seconds: float = Field(default=30.0, ge=0.0, le=3600.0)  # quiet time before a full refit

    # Streaming
    stream_word_delay_ms: float = Field(default=0.0, ge=0.0, le=2000.0)
    ws_heartbeat_interval_seconds: float = Field(default=30.0, gt=0)
    ws_idle_timeout_intervals: int = Field(default=3, ge=1)
    ws_max_message_bytes: int = Field(default=16_384, ge=1024)
    ws_max_messages_per_minute: int = Field(default=120, gt=0)
    ws_max_queued_questions: int = Field(default=10, gt=0)
    ws_reference_lines: int = Field(default=3, ge=0, le=10)

    @field_validator("allowed_origins", "trusted_proxies", "api_keys", mode="before")
    @classmethod
    def _split_comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
        return value

    @field_validator("rate_limit_storage_uri")
    @classmethod
    def _check_storage_uri(cls, value: str) -> str:
        if not re.match(r"^(memory|redis|rediss|redis\+cluster|redis\+sentinel|memcached|mongodb)://", value):
            raise ValueError("must be a limits storage URI such as memory:// or redis://host:6379")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^rediss?://", value):
            raise ValueError("must be a redis:// or rediss:// URL such as redis://host:6379/0 (empty: no Redis)")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        return normalize_database_url(value) if value is not None else None

    @field_validator(
        "secret_key",
        "admin_token",
        "metrics_token",
        "openai_api_key",
        "openai_base_url",
        "redis_url",
        "database_url",
        mode="before",
    )
    @classmethod
    def _empty_means_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.environment == "production":
            if self.debug:
                raise ValueError("DEBUG must be false when ENVIRONMENT=production")
            if "*" in self.allowed_origins:
                raise ValueError("ALLOWED_ORIGINS must not contain '*' when ENVIRONMENT=production")
        if self.api_keys_required_everywhere and not self.api_keys:
            raise ValueError("API_KEYS_REQUIRED_EVERYWHERE=true needs API_KEYS (comma-separated client keys)")
        if self.use_https and not self.trusted_proxies:
            # The service itself speaks plain HTTP (TLS ends at a proxy), and only a trusted proxy's
            # X-Forwarded-Proto says a request came over HTTPS: without one every request would redirect to itself.
            raise ValueError("USE_HTTPS=true needs TRUSTED_PROXIES: the address range of the proxy that ends TLS")
        if self.embedding_provider == "openai" and self.openai_api_key is None:
            raise ValueError("OPENAI_API_KEY must be set when EMBEDDING_PROVIDER=openai")
        if self.answer_mode == "generative" and self.openai_api_key is None:
            raise ValueError("OPENAI_API_KEY must be set when ANSWER_MODE=generative")
        if self.redis_url is not None and "rate_limit_storage_uri" not in self.model_fields_set:
            self.rate_limit_storage_uri = self.redis_url  # one Redis for everything unless told otherwise
        return self

    @property
    def database(self) -> str:
        """DATABASE_URL, or the SQLite file in CACHE_DIR when it is unset."""
        return self.database_url or sqlite_url(self.cache_dir / "defi.db")

    @property
    def is_production(self) -> bool:
        """Whether the service runs with production safeguards."""
        return self.environment == "production"


def describe_validation_error(error: ValidationError) -> str:
    """Turn a settings validation error into one line that names the offending variable."""
    first = error.errors()[0]
    names = [str(part).upper() for part in first.get("loc", ()) if part != "__root__"]
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if names:
        value = first.get("input")
        shown = f"={value!r}" if isinstance(value, str | int | float) else ""
        return f"Invalid configuration: {names[0]}{shown}: {message}"
    return f"Invalid configuration: {message}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Load settings once; on a bad value print one clear line and stop the process."""
    try:
        return Settings()
    except ValidationError as error:
        print(describe_validation_error(error), file=sys.stderr)
        raise SystemExit(2) from None
