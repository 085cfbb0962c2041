"""Choose the session store from the settings."""

from __future__ import annotations

from gru_serve.ops.settings import REDIS_SCHEMES, SQLITE_SCHEME, Settings
from gru_serve.stores.sessions import MemoryStore, SessionStore


def build_store(settings: Settings) -> SessionStore:
    url = settings.session_store
    if url == "memory":
        return MemoryStore(
            settings.session_ttl_s, settings.max_sessions, max_per_owner=settings.max_sessions_per_owner
        )
    if url.startswith(REDIS_SCHEMES):
        from gru_serve.stores.redis_store import RedisStore

        return RedisStore(
            url,
            settings.session_ttl_s,
            settings.max_sessions,
            local_cache=settings.session_cache,
            max_per_owner=settings.max_sessions_per_owner,
            prefix_bytes=int(settings.prefix_redis_mb * 2**20),
        )
    if url.startswith(SQLITE_SCHEME):
        from gru_serve.stores.sqlite_store import SQLiteStore

        return SQLiteStore(
            url.removeprefix(SQLITE_SCHEME),
            settings.session_ttl_s,
            settings.max_sessions,
            settings.idle_to_disk_s,
            max_per_owner=settings.max_sessions_per_owner,
        )
    raise ValueError(f"session_store must be 'memory', redis://HOST:PORT/DB or sqlite:///PATH, got {url!r}")
