"""Reference loops for the checks that compare paths (tests, gru-export variants, the GPU check).

The scheduler does not use them: a bug here cannot hide the same bug in the server. They need
only a step function (gru_serve.scoring.StepFn) and, for the fused path, a model with a fused
graph's function, so exporters run them on plain onnxruntime sessions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from gru_serve.sampling import SamplingParams, columns, sample, uniforms
from gru_serve.scoring import StepFn


class FusedModel(Protocol):
    """A model with the contract's step and the fused graph's function (ModelRuntime is one)."""

    def step(self, ids: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def zero_state(self, batch: int = 1) -> np.ndarray: ...

    def fused(
        self,
        tokens: np.ndarray,
        state: np.ndarray,
        cols: Mapping[str, np.ndarray],
        uniforms: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def chained_run(
    step: StepFn, ids: np.ndarray, state: np.ndarray, prompt_len: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Prefill ids[:, :prompt_len] in one call, then one token per call, feeding state_out back."""
    logits, state = step(ids[:, :prompt_len], state)
    outs = [(logits, state)]
    for t in range(prompt_len, ids.shape[1]):
        logits, state = step(ids[:, t : t + 1], state)
        outs.append((logits, state))
    return outs


def step_generate(
    step: StepFn, ids: list[int], state: np.ndarray, params: SamplingParams, n: int
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The step path at batch 1: prefill `ids` in one call from `state` [1, L, H], then n
    tokens, each sampled in numpy with the uniform of its position and fed in a call of its
    own. Returns the tokens and the logits [V] and state [L, H] after the last one."""
    logits, state = step(np.array([ids], np.int64), state)
    logits, out = logits[:, -1], []
    seed, cols = np.array([params.seed], np.uint64), columns([params])
    for j in range(n):
        tok = sample(logits, u=uniforms(seed, np.array([len(ids) + j], np.uint64)), **cols)
        out.append(int(tok[0]))
        logits, state = step(tok[:, None].astype(np.int64), state)
        logits = logits[:, -1]
    return out, logits[0], state[0]


def fused_generate(
    rt: FusedModel, prompts: list[list[int]], params: list[SamplingParams], n: int, k: int, fused=None
) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """The prompts as one batch (each prefilled alone), n tokens each, k per run of `fused`
    (rt.fused by default; the same arguments and outputs), the first token of each run sampled
    in numpy as the scheduler does. Returns the tokens per row and the logits [B, V] and state
    [B, L, H] after the last ones."""
    fused = fused or rt.fused
    firsts = [rt.step(np.array([ids], np.int64), rt.zero_state()) for ids in prompts]
    logits = np.stack([lg[0, -1] for lg, _ in firsts])
    state = np.stack([st[0] for _, st in firsts])
    cols = columns(params)
    seeds = np.array([p.seed for p in params], np.uint64)
    pos = np.array([len(ids) for ids in prompts], np.uint64)
    out: list[list[int]] = [[] for _ in prompts]
    done = 0
    while done < n:
        tok = sample(logits, u=uniforms(seeds, pos + done), **cols)
        kk = min(k, n - done)
        u = np.stack([uniforms(seeds, pos + done + j) for j in range(1, kk + 1)], axis=1)
        sampled, step_logits, step_states = fused(tok, state, cols, u)
        for r in range(len(prompts)):
            out[r] += [int(tok[r]), *sampled[: kk - 1, r].tolist()]
        logits, state = step_logits[kk - 1], step_states[kk - 1]
        done += kk
    return out, logits, state
