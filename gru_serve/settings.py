"""One settings object: CLI flags override GRU_SERVE_* environment variables, which override
the defaults below."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

ENV_PREFIX = "GRU_SERVE_"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    models: tuple[str, ...] = ()  # PATH or NAME=PATH; empty: every shipped model
    device: str = "auto"  # auto | cuda | cpu
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    io_binding: str = "auto"  # auto (on with CUDA) | on | off
    max_batch_size: int = 256
    max_queue: int = 1024
    fused_tokens: int = 64  # most tokens a stream gets from one fused run; 1: the step path only
    round_budget_ms: float = 16.0  # fused rounds are sized to take about this long
    session_ttl_s: float = 3600.0
    max_sessions: int = 10_000
    max_prompt_chars: int = 16_384
    max_new_tokens: int = 4096
    default_new_tokens: int = 64
    max_streams: int = 1024
    grace_s: float = 10.0
    log_level: str = "INFO"
    session_store: str = "memory"  # memory | redis://host:port/db
    metrics_port: int = 0  # Prometheus metrics over HTTP; 0: off
    tls_cert: str = ""  # PEM server certificate; with tls_key, serve TLS
    tls_key: str = ""
    tls_client_ca: str = ""  # PEM CA: require client certificates signed by it (mTLS)
    auth_tokens: tuple[str, ...] = ()  # bearer tokens accepted; empty (and no file): auth off
    auth_tokens_file: str = ""  # one token per line
    max_streams_per_token: int = 256

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then the environment, then `overrides` (CLI flags; None means unset)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f.name, raw, cls.__dataclass_fields__[f.name].default)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "models" in values:
            values["models"] = tuple(values["models"])
        return replace(cls(), **values)

    def describe(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))


def _parse(name: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            return tuple(p for p in raw.split(",") if p)
    except ValueError as e:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r}: {e}") from e
    return raw
