"""Log-probabilities and perplexity from a step function, in numpy.

A step function takes ids [batch, seq] and state [batch, layers, hidden] and returns
(logits [batch, seq, vocab], state_out): the model contract. onnxruntime, PyTorch and the
server's runtime all provide one, so every perplexity in the project is computed here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

StepFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def token_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) at each position; logits [..., vocab], targets [...]."""
    lp = log_softmax(logits)
    return np.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]


def piece_logprobs(
    prev: np.ndarray | None, piece: Sequence[int], logits: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """log p of each token of `piece` from its logits [len(piece), vocab] and `prev`, the
    logits before its first token (None: the first token only conditions the rest); and the
    logits after its last token."""
    ids = np.asarray(piece, dtype=np.int64)
    out = token_logprobs(logits[:-1], ids[1:])
    if prev is not None:
        out = np.concatenate([token_logprobs(prev[None, :], ids[:1]), out])
    return out, logits[-1]


def stream_logprobs(
    step: StepFn,
    tokens: Sequence[int],
    state: np.ndarray,
    first_logits: np.ndarray | None = None,
    chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score `tokens` as one stream at batch 1 from `state`.

    With `first_logits` (the distribution for tokens[0], e.g. a session's pending logits)
    every token is scored; without, the first token only conditions the rest.
    Returns (logprobs, final state, logits for the token after the last).
    """
    ids = np.asarray(tokens, dtype=np.int64)
    scored: list[np.ndarray] = []
    prev = first_logits
    for start in range(0, len(ids), chunk):
        piece = ids[start : start + chunk]
        logits, state = step(piece[None, :], state)
        lp, prev = piece_logprobs(prev, piece, logits[0])
        scored.append(lp)
    out = np.concatenate(scored) if scored else np.zeros(0)
    return out, state, prev


def perplexity(logprobs: np.ndarray) -> float:
    return math.exp(-float(np.mean(logprobs))) if len(logprobs) else float("nan")


def d2l_perplexity(
    step: StepFn,
    tokens: Sequence[int],
    state_shape: tuple[int, int],
    batch_size: int = 32,
    num_steps: int = 35,
) -> float:
    """Perplexity as d2l reports it: sequential partitioning (offset 0), batch 32, 35 steps,
    state carried across minibatches."""
    n = ((len(tokens) - 1) // batch_size) * batch_size
    xs = np.asarray(tokens[:n], dtype=np.int64).reshape(batch_size, -1)
    ys = np.asarray(tokens[1 : n + 1], dtype=np.int64).reshape(batch_size, -1)
    state = np.zeros((batch_size, *state_shape), dtype=np.float32)
    total, count = 0.0, 0
    for i in range(0, (xs.shape[1] // num_steps) * num_steps, num_steps):
        logits, state = step(xs[:, i : i + num_steps], state)
        lp = token_logprobs(logits, ys[:, i : i + num_steps])
        total += float(lp.sum())
        count += lp.size
    return math.exp(-total / count)


def stream_perplexity(step: StepFn, tokens: Sequence[int], state_shape: tuple[int, int]) -> float:
    """Perplexity of `tokens` as one stream at batch 1 from a zero state."""
    state = np.zeros((1, *state_shape), dtype=np.float32)
    return perplexity(stream_logprobs(step, tokens, state)[0])
