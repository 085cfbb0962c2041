"""One settings object: CLI flags override GRU_SERVE_* environment variables, which override
the defaults below. Each field is defined once: its type, range, default and (its docstring) the
help text `gru-serve serve --help` shows."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import parse_qsl, urlencode, urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

from gru_serve.ops.errors import ModelLoadError
from gru_serve.prefill import BLOCK, check_prefill_chunk

ENV_PREFIX = "GRU_SERVE_"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
SQLITE_SCHEME = "sqlite:///"
# Settings that hold several values get a singular, repeatable flag.
REPEATABLE_FLAGS = {
    "models": ("--model", "[NAME=]PATH"),
    "auth_tokens": ("--auth-token", "TOKEN"),
    "admin_tokens": ("--admin-token", "TOKEN"),
    "allowed_hosts": ("--allowed-host", "HOST"),
    "snapshot_keys": ("--snapshot-key", "KEY"),
}

# Comma-separated in the environment (GRU_SERVE_MODELS=a,b), not pydantic-settings' JSON.
Csv = Annotated[tuple[str, ...], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, use_attribute_docstrings=True, validate_default=True
    )

    host: str = "127.0.0.1"
    """address to listen on"""
    port: int = Field(50051, ge=0, le=65535)
    """port to listen on (0: any free port)"""
    models: Csv = ()
    """an ONNX model to serve as PATH or NAME=PATH (default: every shipped model)"""
    model_repository: str = ""
    """a folder of models to load and unload while serving (Triton's model repository API):
    NAME/model.onnx or NAME/VERSION/model.onnx (the highest VERSION); none is loaded at start
    (--model says what is), each serves as NAME once loaded ('': load and unload are refused)"""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto (CUDA when onnxruntime confirms it, else CPU), cuda (refuse to start without it), cpu"""
    intra_op_threads: int = Field(1, ge=0)
    """onnxruntime threads inside one operator (0: onnxruntime's choice, one per core)"""
    inter_op_threads: int = Field(1, ge=0)
    """onnxruntime threads across operators (0: onnxruntime's choice)"""
    io_binding: Literal["auto", "on", "off"] = "auto"
    """auto (on with CUDA: the state stays on the GPU), on, off"""
    fast_path: Literal["on", "off"] = "on"
    """on: run the decode step and the fused K-token loop derived from the model's weights,
    checked against the exported graph at load (a model that fails the check does not start);
    off: every step runs the exported graph"""
    engine: Literal["process", "thread"] = "process"
    """where generation runs: process (an engine process owns the models and the schedulers;
    the front end talks to it over ZeroMQ, and a crashed engine is restarted) or thread (in the
    front end's process, beside its event loop)"""
    frontends: int = Field(1, ge=1, le=64)
    """front-end processes (gRPC and HTTP) sharing the ports (SO_REUSEPORT) and one engine
    process; more than 1 needs --engine process and a Redis session store, which every front
    end shares, and gives front end i the metrics port --metrics-port + i"""
    engine_address: str = ""
    """the engine process to use, as ipc://PATH, instead of starting one (--frontends sets it
    for the front ends it starts); only ipc://, a Unix socket the file system's permissions
    guard: the engine has no authentication, so a TCP address would let anyone who reaches it
    run, cancel or unload models and make it open files"""
    max_batch_size: int = Field(256, ge=1)
    """most streams decoded in one batched step"""
    max_queue: int = Field(1024, ge=1)
    """requests waiting for a batch slot before RESOURCE_EXHAUSTED"""
    fused_tokens: int = Field(64, ge=1)
    """most tokens a stream gets from one fused K-token run; 1: the step path only"""
    round_budget_ms: float = Field(16.0, gt=0)
    """a fused round is sized to take about this long (bounds inter-token latency)"""
    prefill_chunk: int = Field(512, ge=BLOCK)
    """most prompt tokens prefilled between two decode rounds, over all the prompts being read
    (one chunk always goes), so a long prompt does not stall the running streams; a multiple of
    64: a prompt read from the zero state goes in 64-token chunks (the prefix cache's blocks),
    any other in chunks of this many tokens"""
    session_ttl_s: float = Field(3600.0, gt=0)
    """seconds an idle session lives"""
    max_sessions: int = Field(10_000, ge=1)
    """sessions kept; beyond it the least recently used idle one is evicted"""
    max_sessions_per_owner: int = Field(1000, ge=1)
    """sessions one bearer token keeps; beyond it that token's own least recently used idle
    session is evicted (never another token's); calls without a token have max_sessions only"""
    max_prompt_chars: int = Field(16_384, ge=1)
    """longest prompt or text accepted, in characters as sent (before the tokenizer)"""
    max_prompt_tokens: int = Field(16_384, ge=1)
    """longest prompt or text accepted, in tokens (after the tokenizer: a character may be
    several tokens, a token several characters); also the most token ids one inference-protocol
    request may carry"""
    max_new_tokens: int = Field(4096, ge=1)
    """most tokens one request may generate"""
    default_new_tokens: int = Field(64, ge=1)
    """tokens generated when a request does not say (at most max_new_tokens)"""
    max_streams: int = Field(1024, ge=1)
    """concurrent generation streams before RESOURCE_EXHAUSTED"""
    grace_s: float = Field(10.0, ge=0)
    """seconds in-flight requests get to finish on SIGTERM/SIGINT"""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """the least severe log records written"""
    session_store: str = "memory"
    """memory; redis://HOST:PORT/DB to share sessions between replicas; sqlite:///PATH to keep
    them on disk across restarts of one server (a relative PATH; sqlite:////abs/path for an
    absolute one)"""
    idle_to_disk_s: float = Field(300.0, ge=0)
    """with the sqlite store: seconds a session stays in memory after its last use before only
    the disk holds it (0: only the disk)"""
    max_checkpoints: int = Field(8, ge=0)
    """checkpoints (turns) a session keeps for RewindSession, the newest (0: no rewind)"""
    prefix_cache_mb: float = Field(64.0, ge=0)
    """memory for the states after shared prompt prefixes, reused instead of prefilling them
    again (0: off)"""
    prefix_cache_scope: Literal["owner", "shared"] = "owner"
    """owner: a prompt reuses only prefixes its own token sent (with authentication on; without
    it every caller is one owner); shared: every token's, so time to first token tells a token
    whether another sent the same prefix"""
    prefix_redis_mb: float = Field(64.0, ge=0)
    """with the Redis store: bytes (MB) of prefix states shared through Redis, least recently
    used evicted among themselves, never by Redis and never evicting sessions (0: not shared)"""
    session_cache: int = Field(10_000, ge=0)
    """with the Redis store: sessions this replica keeps a copy of, so a turn on a session it
    served last reads only the session's version from Redis (0: off, every turn reads the state)"""
    http_port: int = Field(8000, ge=0, le=65535)
    """serve the HTTP front end on this port: OpenAI-compatible completions, the inference
    protocol over REST and the playground at / (0: off)"""
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """largest HTTP request body accepted (413 beyond it)"""
    http_read_timeout_s: float = Field(10.0, gt=0)
    """seconds an HTTP client has to send a request's head (from connecting, or from the
    request's first byte on a kept-alive connection), and as many again for its body; past
    either the server answers 408 and closes the connection (one that sent nothing: closed)"""
    http_idle_timeout_s: float = Field(5.0, gt=0)
    """seconds a kept-alive HTTP connection may wait for its next request before it is closed"""
    http_write_timeout_s: float = Field(30.0, gt=0)
    """seconds an HTTP response may wait on a client that reads none of it (its socket buffer
    and the server's full) before the connection is dropped; an event stream so ended frees its
    stream slot and leaves its session unchanged"""
    http_max_connections: int = Field(1024, ge=1)
    """HTTP connections (and requests running) one front end serves at once, whatever their
    token (authentication on or off); a request over it gets 503"""
    metrics_port: int = Field(0, ge=0, le=65535)
    """serve Prometheus metrics over HTTP on this port (0: off)"""
    tls_cert: str = ""
    """PEM certificate chain; with --tls-key the server speaks TLS"""
    tls_key: str = ""
    """PEM private key of --tls-cert"""
    tls_client_ca: str = ""
    """PEM CA bundle; clients must present a certificate it signed (mTLS)"""
    auth_tokens: Csv = Field((), repr=False)
    """accepted bearer tokens; sessions belong to their token (empty, and no file: auth off)"""
    auth_tokens_file: str = ""
    """file with one accepted bearer token per line"""
    admin_tokens: Csv = Field((), repr=False)
    """bearer tokens that may also load and unload models (the model repository API); accepted
    as ordinary tokens too, so any turns authentication on. With auth on and none, load and
    unload are refused; with auth off entirely, anyone who reaches the port may use them"""
    admin_tokens_file: str = ""
    """file with one admin token per line"""
    allowed_hosts: Csv = ()
    """Host header values the HTTP front end answers, against DNS rebinding: a name or address
    ('[::1]' for IPv6), '*.example.com' for its subdomains, '*' for any; any port (default:
    localhost, 127.0.0.1 and [::1] when --host is a loopback address, else any)"""
    snapshot_keys: Csv = Field((), repr=False)
    """keys that sign and verify session snapshots (HMAC-SHA256): the first signs, every one
    verifies, so keys rotate; none (and no file): ExportSession is refused"""
    snapshot_key_file: str = ""
    """file with one snapshot key per line, read as --snapshot-key in order"""
    max_streams_per_token: int = Field(256, ge=1)
    """concurrent streams one token may hold"""
    max_response_logits: int = Field(1_000_000, ge=1)
    """most logit values (token ids x vocabulary) one request may produce: an inference-protocol
    ModelInfer asking for more is refused (RESOURCE_EXHAUSTED, HTTP 413) before the model runs,
    and Score runs its text in pieces of at most this many (the default keeps a binary response
    under gRPC's 4 MiB message limit)"""
    snapshot_max_age_s: float = Field(86_400.0, ge=0)
    """seconds after its export that a snapshot is accepted (ImportSession, stateless Generate
    and Converse); 0: no expiry"""
    snapshot_bind_owner: bool = False
    """a snapshot names its exporter (the token's principal, as a keyed hash) and only that token
    may import it or continue from it; off: any token may"""

    @field_validator("models", "auth_tokens", "admin_tokens", "allowed_hosts", "snapshot_keys", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return tuple(p for p in v.split(",") if p) if isinstance(v, str) else v

    @field_validator("allowed_hosts")
    @classmethod
    def _host_patterns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        # Starlette's TrustedHostMiddleware, which applies them, asserts this shape.
        for host in v:
            if "*" in host[1:] or (host.startswith("*") and host != "*" and not host.startswith("*.")):
                raise ValueError(f"a wildcard must be '*' or lead as '*.example.com', got {host!r}")
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("prefill_chunk")
    @classmethod
    def _whole_blocks(cls, v: int) -> int:
        return check_prefill_chunk(v)

    @field_validator("engine_address")
    @classmethod
    def _ipc_only(cls, v: str) -> str:
        if v and not (v.startswith("ipc://") and len(v) > len("ipc://")):
            raise ValueError(
                "must be ipc://PATH (a Unix socket): the engine has no authentication, so it is "
                "never reachable over tcp://"
            )
        return v

    @field_validator("session_store")
    @classmethod
    def _store(cls, v: str) -> str:
        if v != "memory" and not v.startswith((*REDIS_SCHEMES, SQLITE_SCHEME)):
            raise ValueError(
                "must be 'memory', redis://HOST:PORT/DB (or rediss://, unix://) or sqlite:///PATH"
            )
        return v

    @model_validator(mode="after")
    def _together(self) -> Settings:
        if self.default_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"--default-new-tokens ({self.default_new_tokens}) must be <= "
                f"--max-new-tokens ({self.max_new_tokens})"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.frontends > 1 and self.engine != "process":
            raise ValueError(f"--frontends {self.frontends} needs --engine process (one engine for them all)")
        if self.frontends > 1 and not self.session_store.startswith(REDIS_SCHEMES):
            raise ValueError(
                f"--frontends {self.frontends} needs --session-store redis://HOST:PORT/DB: every front end "
                "serves every session, and the memory and sqlite stores belong to one process"
            )
        return self

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **flags: Any) -> Settings:
        """Defaults, then GRU_SERVE_* variables (of `env`; None: the process environment), then
        `flags` (None means unset). A bad value raises ValueError with one line naming it."""
        values = {k: v for k, v in flags.items() if v is not None}
        if env is not None:
            source = EnvSettingsSource(cls)
            source.env_vars = {k.lower(): v for k, v in env.items()}  # case-insensitive, as for os.environ
            # Every field is given, so the process environment (which BaseSettings reads too) fills none.
            values = {**{n: f.default for n, f in cls.model_fields.items()}, **source(), **values}
        try:
            return cls(**values)
        except ValidationError as e:
            raise ValueError(problem(e)) from None

    def describe(self) -> str:
        """The settings for the log, bearer tokens masked."""
        shown = {
            **self.model_dump(),
            "auth_tokens": tuple("***" for _ in self.auth_tokens),
            "admin_tokens": tuple("***" for _ in self.admin_tokens),
            "snapshot_keys": tuple("***" for _ in self.snapshot_keys),
            "session_store": masked_url(self.session_store),
        }
        return " ".join(f"{k}={v!r}" for k, v in shown.items())


def masked_url(url: str) -> str:
    """A session store URL for the log: its password masked wherever redis-py reads one
    (redis://USER:PASSWORD@HOST, or a password= query parameter as unix:// URLs carry it)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if parts.password is None and not any(k == "password" for k, _ in query):
        return url
    # Edited in place, not through urlunsplit, which turns unix:///path into unix:/path.
    base, sep, _ = url.partition("?")
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        base = base.replace(parts.netloc, f"{parts.username or ''}:***@{host}", 1)
    return base + sep + urlencode([(k, "***" if k == "password" else v) for k, v in query], safe="*")


def flag(name: str) -> str:
    return REPEATABLE_FLAGS[name][0] if name in REPEATABLE_FLAGS else "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    return ENV_PREFIX + name.upper()


def allowed(name: str) -> str:
    """What a setting accepts, from its definition: 'an integer in 0..65535', 'one of a, b'."""
    f = Settings.model_fields[name]
    if get_origin(f.annotation) is Literal:
        return "one of " + ", ".join(get_args(f.annotation))
    kind = {int: "an integer", float: "a number"}.get(f.annotation)
    if kind is None:
        return ""
    ge = gt = le = None
    for m in f.metadata:
        ge, gt, le = getattr(m, "ge", ge), getattr(m, "gt", gt), getattr(m, "le", le)
    if ge is not None and le is not None:
        return f"{kind} in {ge}..{le}"
    if ge is not None:
        return f"{kind} >= {ge}"
    if gt is not None:
        return f"{kind} > {gt}"
    return kind


def problem(e: ValidationError) -> str:
    """One line for all of a ValidationError: each setting by flag and variable, with its range."""
    out = []
    for err in e.errors():
        why = str(err["ctx"]["error"]) if err["type"] == "value_error" else ""
        if not err["loc"]:  # a rule across settings
            out.append(why)
            continue
        name = str(err["loc"][0])
        if name not in Settings.model_fields:
            out.append(f"{name}: {err['msg']}")
            continue
        must = why or f"must be {allowed(name) or err['msg']}"
        out.append(f"{flag(name)} ({env_var(name)}) {must}, got {err['input']!r}")
    return "; ".join(out)


def read_secrets(values: tuple[str, ...], path: str, setting: str) -> list[str]:
    """Secrets given inline (flags, env), then those of a file, one per line ('#' comments)."""
    out = list(values)
    if path:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ModelLoadError(f"{setting} {path}: {e.strerror}") from e
        out += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return out
