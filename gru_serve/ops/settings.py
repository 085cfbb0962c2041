"""One settings object: CLI flags override GRU_SERVE_* environment variables, which override
the defaults below. Each field is defined once: its type, range, default and (its docstring) the
help text `gru-serve serve --help` shows."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

from gru_serve.engine.prefix_cache import BLOCK
from gru_serve.ops.errors import ModelLoadError

ENV_PREFIX = "GRU_SERVE_"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
SQLITE_SCHEME = "sqlite:///"
# Settings that hold several values get a singular, repeatable flag.
REPEATABLE_FLAGS = {
    "models": ("--model", "[NAME=]PATH"),
    "auth_tokens": ("--auth-token", "TOKEN"),
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
    for the front ends it starts)"""
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
    session_cache: int = Field(10_000, ge=0)
    """with the Redis store: sessions this replica keeps a copy of, so a turn on a session it
    served last reads only the session's version from Redis (0: off, every turn reads the state)"""
    http_port: int = Field(8000, ge=0, le=65535)
    """serve the HTTP front end on this port: OpenAI-compatible completions, the inference
    protocol over REST and the playground at / (0: off)"""
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """largest HTTP request body accepted (413 beyond it)"""
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
    snapshot_keys: Csv = Field((), repr=False)
    """keys that sign and verify session snapshots (HMAC-SHA256): the first signs, every one
    verifies, so keys rotate; none (and no file): ExportSession is refused"""
    snapshot_key_file: str = ""
    """file with one snapshot key per line, read as --snapshot-key in order"""
    max_streams_per_token: int = Field(256, ge=1)
    """concurrent streams one token may hold"""

    @field_validator("models", "auth_tokens", "snapshot_keys", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return tuple(p for p in v.split(",") if p) if isinstance(v, str) else v

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("prefill_chunk")
    @classmethod
    def _whole_blocks(cls, v: int) -> int:
        if v % BLOCK:
            raise ValueError(f"must be a multiple of {BLOCK} (the prefix cache's block of prompt tokens)")
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
            "snapshot_keys": tuple("***" for _ in self.snapshot_keys),
        }
        return " ".join(f"{k}={v!r}" for k, v in shown.items())


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
