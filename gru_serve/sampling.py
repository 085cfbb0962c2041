"""Sampling parameters (one definition for every transport) and the numpy sampler, vectorised
across a batch.

Randomness is counter-based: the uniform number for a token is a hash of (seed, position of
the token in its session). A request's tokens therefore never depend on what else shares its
batch, and a session generating 50 tokens in one call draws exactly what it draws in two
calls of 25 with the same seed.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

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


@dataclass(frozen=True)
class SamplingParams:
    """What a request samples with. Built through `checked` at every transport, so temperature
    and top_p are held at float32 precision (gRPC's), and it travels whole to the engine."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    @classmethod
    def checked(
        cls,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: tuple[str, ...] = (),
    ) -> SamplingParams:
        """Validated parameters; a bad field raises InvalidArgument naming it and its limit."""
        t = 0.0 if temperature is None else float32(float(temperature))
        t = 0.0 if 0.0 <= t < MIN_TEMPERATURE else t
        if not (math.isfinite(t) and 0.0 <= t <= MAX_TEMPERATURE):
            raise InvalidArgument(f"sampling.temperature must be in [0, {MAX_TEMPERATURE:g}], got {t}")
        k = 0 if top_k is None else int(top_k)
        if not 0 <= k <= MAX_TOP_K:
            raise InvalidArgument(f"sampling.top_k must be in [0, {MAX_TOP_K}] (0: no limit), got {k}")
        p = 1.0 if top_p is None else float32(float(top_p))
        if not (math.isfinite(p) and 0.0 < p <= 1.0):
            raise InvalidArgument(f"sampling.top_p must be in (0, 1], got {p}")
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"sampling.stop has {len(stop)} strings; the limit is {MAX_STOP_STRINGS}")
        for s in stop:
            if not 0 < len(s) <= MAX_STOP_CHARS:
                raise InvalidArgument(
                    f"sampling.stop strings must have 1 to {MAX_STOP_CHARS} characters, got {len(s)}"
                )
        s_ = secrets.randbits(63) if seed is None else int(seed)
        if not 0 <= s_ < 1 << 64:
            raise InvalidArgument(f"sampling.seed must be in [0, 2^64), got {s_}")
        return cls(t, k, p, s_, tuple(stop))


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
    logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, u: np.ndarray
) -> np.ndarray:
    """Next token per row. logits [B, V]; the rest [B]. Rows with temperature 0 take the argmax;
    the others draw by inverse CDF with `u` after temperature, top-k and top-p."""
    out = logits.argmax(axis=1)
    rows = np.flatnonzero(temperature > 0)
    if rows.size == 0:
        return out
    z = logits[rows].astype(np.float64) / temperature[rows, None]
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
