"""Sampling parameters (one definition for every transport) and the numpy sampler, vectorised
across a batch.

A sampling option is one `SamplingParams` field: its check, its --help text and, for the
sampler's per-row settings, its column type live on the field, and the transports (gRPC, the
OpenAI and inference-protocol bodies, the CLI), the batch's columns and the fused graph's inputs
pick the fields up by name.

Randomness is counter-based: the uniform number for a token is a hash of (seed, position of
the token in its session). A request's tokens therefore never depend on what else shares its
batch, and a session generating 50 tokens in one call draws exactly what it draws in two
calls of 25 with the same seed.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from gru_serve.ops.errors import InvalidArgument

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 64
MAX_TOP_K = 1 << 20
MAX_TEMPERATURE = 100.0
# Below this a temperature is greedy (as in vLLM): the argmax has all the mass anyway, and a
# tiny one (JSON carries 1e-320) would overflow logits / temperature into NaN probabilities.
MIN_TEMPERATURE = 1e-5
FLOAT32_MAX = float(np.finfo(np.float32).max)


def float32(x: float) -> float:
    """x at the precision of gRPC's float fields, so every transport samples alike (and a
    temperature too small for float32 is 0, greedy, as over gRPC). Out of range: as given,
    for the range check to report."""
    if not math.isfinite(x) or abs(x) > FLOAT32_MAX:
        return x
    return float(np.float32(x))


def _temperature(v: Any) -> float:
    t = 0.0 if v is None else float32(float(v))
    t = 0.0 if 0.0 <= t < MIN_TEMPERATURE else t
    if not (math.isfinite(t) and 0.0 <= t <= MAX_TEMPERATURE):
        raise InvalidArgument(f"sampling.temperature must be in [0, {MAX_TEMPERATURE:g}], got {t}")
    return t


def _top_k(v: Any) -> int:
    k = 0 if v is None else int(v)
    if not 0 <= k <= MAX_TOP_K:
        raise InvalidArgument(f"sampling.top_k must be in [0, {MAX_TOP_K}] (0: no limit), got {k}")
    return k


def _top_p(v: Any) -> float:
    p = 1.0 if v is None else float32(float(v))
    if not (math.isfinite(p) and 0.0 < p <= 1.0):
        raise InvalidArgument(f"sampling.top_p must be in (0, 1], got {p}")
    return p


def _min_p(v: Any) -> float:
    m = 0.0 if v is None else float32(float(v))
    if not (math.isfinite(m) and 0.0 <= m <= 1.0):
        raise InvalidArgument(f"sampling.min_p must be in [0, 1] (0: off), got {m}")
    return m


def _seed(v: Any) -> int:
    s = secrets.randbits(63) if v is None else int(v)
    if not 0 <= s < 1 << 64:
        raise InvalidArgument(f"sampling.seed must be in [0, 2^64), got {s}")
    return s


def _stop(v: Any) -> tuple[str, ...]:
    stop = tuple(v or ())
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"sampling.stop has {len(stop)} strings; the limit is {MAX_STOP_STRINGS}")
    for s in stop:
        if not 0 < len(s) <= MAX_STOP_CHARS:
            raise InvalidArgument(
                f"sampling.stop strings must have 1 to {MAX_STOP_CHARS} characters, got {len(s)}"
            )
    return stop


def option(default: Any, check: Callable[[Any], Any], help: str, column: type | None = None) -> Any:
    """A SamplingParams field: `check` turns a transport's value (None: unset) into the field's
    or raises InvalidArgument naming it; `help` is its CLI --help; `column` (np.float64 or
    np.int64) makes it a per-row setting of the sampler: a column of the batch and an input of
    the fused graph, named as the field."""
    return field(default=default, metadata={"check": check, "help": help, "column": column})


@dataclass(frozen=True)
class SamplingParams:
    """What a request samples with. Built through `checked` at every transport, so float fields
    are held at float32 precision (gRPC's), and it travels whole to the engine. A new option is
    a field here (added last: tests build the first ones positionally), its proto field of the
    same name, and its steps in `sample` and in the fused graph's sampler."""

    temperature: float = option(0.0, _temperature, "0 or unset: greedy", np.float64)
    top_k: int = option(0, _top_k, "keep the k most likely tokens (0 or unset: no limit)", np.int64)
    top_p: float = option(
        1.0, _top_p, "keep the smallest set of tokens whose mass reaches p, in (0, 1]", np.float64
    )
    seed: int = option(0, _seed, "makes sampling reproducible (unset: a random seed)")
    stop: tuple[str, ...] = option((), _stop, "stop after this string, repeatable")
    min_p: float = option(
        0.0,
        _min_p,
        "drop tokens less likely than min_p x the likeliest, in [0, 1] (0 or unset: off)",
        np.float64,
    )

    @classmethod
    def checked(cls, **given: Any) -> SamplingParams:
        """Validated parameters from the fields' values by name (None or absent: unset); a bad
        field raises InvalidArgument naming it and its limit."""
        unknown = set(given) - set(OPTIONS)
        if unknown:
            raise TypeError(f"not sampling options: {sorted(unknown)}")
        return cls(**{f.name: f.metadata["check"](given.get(f.name)) for f in fields(cls)})


# Every option's name, and those that are per-row columns of the sampler with their dtype, in
# field order (the fused graph's inputs follow it).
OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(SamplingParams))
COLUMNS: dict[str, type] = {
    f.name: f.metadata["column"] for f in fields(SamplingParams) if f.metadata["column"]
}
_DEFAULTS = {f.name: f.default for f in fields(SamplingParams)}


def help_of(name: str) -> str:
    return next(f.metadata["help"] for f in fields(SamplingParams) if f.name == name)


def columns(params: Sequence[SamplingParams]) -> dict[str, np.ndarray]:
    """The batch's per-row sampler settings, one array per COLUMNS entry."""
    return {name: np.array([getattr(p, name) for p in params], dtype) for name, dtype in COLUMNS.items()}


def column_feeds(cols: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """Every column at its dtype, for the fused graph; one not given holds its default (what a
    request that leaves the option unset samples with)."""
    return {
        name: np.asarray(cols[name], dtype) if name in cols else np.full(batch, _DEFAULTS[name], dtype)
        for name, dtype in COLUMNS.items()
    }


_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def uniforms(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """A uniform in [0, 1) per row from splitmix64(seed, position): stateless and reproducible."""
    with np.errstate(over="ignore"):
        z = seeds.astype(np.uint64) + (positions.astype(np.uint64) + np.uint64(1)) * np.uint64(
            0x9E3779B97F4A7C15
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sample(
    logits: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    u: np.ndarray,
    min_p: np.ndarray | None = None,
) -> np.ndarray:
    """Next token per row. logits [B, V]; the rest [B]. Rows with temperature 0 take the argmax;
    the others draw by inverse CDF with `u` after temperature, min_p, top-k and top-p (vLLM's
    order)."""
    out = logits.argmax(axis=1)
    rows = np.flatnonzero(temperature > 0)
    if rows.size == 0:
        return out
    z = logits[rows].astype(np.float64) / temperature[rows, None]
    if min_p is not None:
        _min_p_filter(z, min_p[rows])
    vocab = z.shape[1]
    k = top_k[rows]
    limited = (k > 0) & (k < vocab)
    if limited.any():
        # Keep the k largest logits; ties at the threshold stay in, like most samplers.
        kth = -np.sort(-z[limited], axis=1)[np.arange(limited.sum()), k[limited] - 1]
        z[limited] = np.where(z[limited] >= kth[:, None], z[limited], -np.inf)
    z -= z.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    p = top_p[rows]
    nucleus = p < 1.0
    if nucleus.any():
        pr = probs[nucleus]
        order = np.argsort(-pr, axis=1, kind="stable")
        sorted_p = np.take_along_axis(pr, order, axis=1)
        # Keep a token when the mass before it is below p: the smallest set reaching p.
        before = np.cumsum(sorted_p, axis=1) - sorted_p
        keep_sorted = before < p[nucleus, None]
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=1)
        pr = np.where(keep, pr, 0.0)
        probs[nucleus] = pr / pr.sum(axis=1, keepdims=True)
    cdf = np.cumsum(probs, axis=1)
    picked = (cdf < (u[rows] * cdf[:, -1])[:, None]).sum(axis=1)
    out[rows] = np.minimum(picked, vocab - 1)
    return out


def _min_p_filter(z: np.ndarray, m: np.ndarray) -> None:
    """min_p in place: a token whose probability is below m x the largest is removed. A token's
    probability over the largest is exp(z - max z), so no normalising sum is needed; the fused
    graph computes the same ops."""
    relative = m > 0
    if relative.any():
        zr = z[relative]
        scaled = np.exp(zr - zr.max(axis=1, keepdims=True))
        z[relative] = np.where(scaled < m[relative, None], -np.inf, zr)
