"""The one Redis connection pool (redis-py asyncio) shared by sessions, the embedding cache and health checks.

Timeouts are short and a failed command is retried once at most (enough to replace a connection that
died with a restarted server), so a dead or hung Redis costs a request about a second, never a hang.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry as SyncRetry

REDIS_SOCKET_TIMEOUT_SECONDS = 1.0
REDIS_MAX_CONNECTIONS = 64
REDIS_PING_TIMEOUT_SECONDS = 2.0

RedisFailure = (RedisError, OSError, TimeoutError)
"""What a Redis call raises when the server is down, slow or gone mid-command."""


def create_redis(url: str) -> Redis:
    """A client over one lazily connecting pool; no connection is made until the first command."""
    client: Redis = Redis.from_url(
        url,
        socket_timeout=REDIS_SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 1),
        max_connections=REDIS_MAX_CONNECTIONS,
        health_check_interval=30,
    )
    return client


def sync_storage_options() -> dict[str, object]:
    """The same timeouts for the blocking client `limits` builds for rate-limit storage."""
    return {
        "socket_timeout": REDIS_SOCKET_TIMEOUT_SECONDS,
        "socket_connect_timeout": REDIS_SOCKET_TIMEOUT_SECONDS,
        "retry": SyncRetry(NoBackoff(), 1),
    }


async def redis_problem(client: Redis) -> str | None:
    """None when Redis answers PING in time; otherwise a short reason."""
    try:
        await asyncio.wait_for(client.ping(), REDIS_PING_TIMEOUT_SECONDS)
    except TimeoutError:
        return f"no answer to PING within {REDIS_PING_TIMEOUT_SECONDS:g} s"
    except RedisFailure as error:
        return f"{type(error).__name__}: {str(error)[:160]}"
    return None
