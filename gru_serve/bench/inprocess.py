"""In-process timings with onnxruntime: the decode loops at batch 1, batched throughput, seeded
sampling, onnxruntime settings, and the scheduler without gRPC.

Every figure is the best of `repeats` runs (timeit's rule: the least disturbed run), measured
in this process one after another, so ratios between rows are side by side.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gru_serve.engine.runtime import ModelRuntime, RuntimeOptions
from gru_serve.engine.scheduler import FUSED_TOKENS, Scheduler
from gru_serve.engine.work import Job
from gru_serve.outputs import DoneEvent, FailedEvent
from gru_serve.sampling import SamplingParams, column_feeds, sample, uniforms


@dataclass(frozen=True)
class InProcessConfig:
    model: Path
    tokens: int = 2000  # tokens per batch-1 measurement
    batched_tokens: int = 20000  # tokens per batched measurement
    batches: tuple[int, ...] = (1, 8, 32, 64, 256)
    fused_k: tuple[int, ...] = (8, 16, 32, 64)
    server_k: int = FUSED_TOKENS  # the server's K: the fused figure the goals use
    repeats: int = 3
    tuning_batches: tuple[int, ...] = (1, 64, 256)
    tuning_levels: tuple[str, ...] = ("off", "basic", "extended", "all")
    tuning_threads: tuple[int, ...] = (1, 2)
    scheduler_batches: tuple[int, ...] = (1, 64)
    scheduler_tokens: int = 256


def best_of(fn: Callable[[], float], repeats: int) -> float:
    fn()  # warm up (first-run allocations)
    return min(fn() for _ in range(repeats))


def _row(name: str, what: str, batch: int, seconds_per_step: float, tokens_per_step: int = 1) -> dict:
    per_token = seconds_per_step / tokens_per_step
    return {
        "name": name,
        "what": what,
        "batch": batch,
        "us_per_token": per_token * 1e6,  # latency of one stream's token
        "us_per_step": seconds_per_step * 1e6,
        "tokens_per_s": batch / per_token,
    }


# -- decode loops: each returns seconds per step (one token per stream) --


def loop_step(rt: ModelRuntime, batch: int, steps: int) -> float:
    """session.run per token, argmax in numpy."""
    tok = np.zeros((batch, 1), np.int64)
    state = rt.zero_state(batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, state = rt.step(tok, state)
        tok = logits[:, 0].argmax(axis=1)[:, None]
    return (time.perf_counter() - t0) / steps


def loop_iobinding(rt: ModelRuntime, batch: int, steps: int) -> float:
    """IOBinding with preallocated buffers (the scheduler's step path)."""
    dec = rt.decoder(rt.zero_state(batch))
    tok = np.zeros(batch, np.int64)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = dec.step(tok).argmax(axis=1)
    return (time.perf_counter() - t0) / steps


def loop_fused(rt: ModelRuntime, batch: int, steps: int, k: int, temperature: float = 0.0) -> float:
    """One fused run per k tokens (the first of each run sampled in numpy, as the scheduler
    does); returns seconds per token step."""
    state = rt.zero_state(batch)
    logits = np.zeros((batch, rt.metadata.vocab_size), np.float32)
    cols = column_feeds({"temperature": np.full(batch, temperature)}, batch)
    seeds = np.arange(batch, dtype=np.uint64)
    runs = max(1, steps // k)
    pos = 0
    t0 = time.perf_counter()
    for _ in range(runs):
        if temperature:
            tok = sample(logits, u=uniforms(seeds, np.full(batch, pos, np.uint64)), **cols)
        else:
            tok = logits.argmax(axis=1)
        u = (
            uniforms(np.repeat(seeds, k), np.tile(np.arange(pos + 1, pos + k + 1, dtype=np.uint64), batch))
            if temperature
            else np.zeros(batch * k)
        ).reshape(batch, k)
        _, step_logits, step_states = rt.fused(tok, state, cols, u)
        logits, state = step_logits[-1], step_states[-1]
        pos += k
    return (time.perf_counter() - t0) / (runs * k)


def loop_step_sampling(rt: ModelRuntime, batch: int, steps: int, temperature: float) -> float:
    """The step path with seeded sampling in numpy (gru_serve.sampling), as the scheduler runs it."""
    tok = np.zeros((batch, 1), np.int64)
    state = rt.zero_state(batch)
    cols = column_feeds({"temperature": np.full(batch, temperature)}, batch)
    seeds = np.arange(batch, dtype=np.uint64)
    t0 = time.perf_counter()
    for i in range(steps):
        logits, state = rt.step(tok, state)
        u = uniforms(seeds, np.full(batch, i, np.uint64))
        tok = sample(logits[:, 0], u=u, **cols)[:, None]
    return (time.perf_counter() - t0) / steps


# -- sections --


def batch1(cfg: InProcessConfig, exported: ModelRuntime, fast: ModelRuntime) -> list[dict]:
    n, r = cfg.tokens, cfg.repeats
    rows = [
        _row(
            "ort_exported_step",
            "onnxruntime, exported graph, session.run per token",
            1,
            best_of(lambda: loop_step(exported, 1, n), r),
        ),
        _row(
            "ort_exported_iobinding",
            "onnxruntime, exported graph, IOBinding + preallocated buffers",
            1,
            best_of(lambda: loop_iobinding(exported, 1, n), r),
        ),
        _row(
            "ort_decode_step",
            "onnxruntime, decode graph (Gather + GRU cell), session.run per token",
            1,
            best_of(lambda: loop_step(fast, 1, n), r),
        ),
        _row(
            "ort_decode_iobinding",
            "onnxruntime, decode graph + IOBinding (the server's step path)",
            1,
            best_of(lambda: loop_iobinding(fast, 1, n), r),
        ),
    ]
    if fast.has_fused:
        for k in cfg.fused_k:
            s = best_of(lambda k=k: loop_fused(fast, 1, max(n, 4 * k), k), r)
            rows.append(_row(f"fused_k{k}", f"fused Loop, {k} tokens per session.run", 1, s))
    return rows


def batched(cfg: InProcessConfig, exported: ModelRuntime, fast: ModelRuntime) -> list[dict]:
    rows = []
    for b in cfg.batches:
        steps = cfg.tokens if b == 1 else max(8, cfg.batched_tokens // b)
        r = cfg.repeats
        rows.append(
            _row(
                "ort_exported_step",
                "exported graph, session.run",
                b,
                best_of(lambda b=b, s=steps: loop_step(exported, b, s), r),
            )
        )
        rows.append(
            _row(
                "ort_decode_iobinding",
                "decode graph + IOBinding",
                b,
                best_of(lambda b=b, s=steps: loop_iobinding(fast, b, s), r),
            )
        )
        if fast.has_fused:
            k = cfg.server_k
            s = best_of(lambda b=b, s=steps, k=k: loop_fused(fast, b, max(s, 2 * k), k), r)
            rows.append(_row(f"fused_k{k}", f"fused Loop, K={k}", b, s))
    return rows


def sampling(cfg: InProcessConfig, fast: ModelRuntime) -> list[dict]:
    """Seeded temperature sampling: numpy sampler per step vs the sampler inside the fused loop."""
    rows = []
    n, r, k = cfg.tokens, cfg.repeats, cfg.server_k
    for b in (1, 64) if 64 in cfg.batches else (1,):
        steps = n if b == 1 else max(8, cfg.batched_tokens // b)
        rows.append(
            _row(
                "step_numpy_sampling",
                "step path, temperature 1 sampled in numpy",
                b,
                best_of(lambda b=b, s=steps: loop_step_sampling(fast, b, s, 1.0), r),
            )
        )
        if fast.has_fused:
            s = best_of(lambda b=b, s=steps: loop_fused(fast, b, max(s, 2 * k), k, 1.0), r)
            rows.append(_row(f"fused_k{k}_sampling", f"fused Loop K={k}, temperature 1 in the graph", b, s))
    return rows


def tuning(cfg: InProcessConfig) -> list[dict]:
    """The decode step (+ IOBinding) under each graph optimisation level and thread count."""
    rows = []
    for level in cfg.tuning_levels:
        for threads in cfg.tuning_threads:
            rt = ModelRuntime(cfg.model, RuntimeOptions("cpu", threads, 1, level))
            t0 = time.perf_counter()
            ModelRuntime(cfg.model, RuntimeOptions("cpu", threads, 1, level, fast_path=False))
            load_s = time.perf_counter() - t0
            for b in cfg.tuning_batches:
                steps = cfg.tokens if b == 1 else max(8, cfg.batched_tokens // b)
                s = best_of(lambda rt=rt, b=b, steps=steps: loop_iobinding(rt, b, steps), cfg.repeats)
                row = _row("tuning", f"graph_optimization={level}, intra_op_threads={threads}", b, s)
                row.update(level=level, threads=threads, exported_load_s=load_s)
                rows.append(row)
    return rows


def scheduler(cfg: InProcessConfig, fast: ModelRuntime) -> list[dict]:
    """The continuous-batching scheduler without gRPC: `batch` jobs of `scheduler_tokens`
    greedy tokens submitted at once, events collected by a plain callback."""
    rows = []
    for fused_tokens in (1, FUSED_TOKENS):
        if fused_tokens > 1 and not fast.has_fused:
            continue
        for b in cfg.scheduler_batches:

            def once(b=b, fused_tokens=fused_tokens) -> float:
                sched = Scheduler(
                    fast,
                    max_batch_size=max(cfg.scheduler_batches),
                    io_binding=True,
                    fused_tokens=fused_tokens,
                )
                done = threading.Semaphore(0)
                count = [0]

                def emit(ev, count=count, done=done) -> None:
                    if isinstance(ev, DoneEvent | FailedEvent):
                        done.release()
                    else:
                        count[0] += len(ev)

                sched.start()
                t0 = time.perf_counter()
                for i in range(b):
                    ids = np.array(fast.tokenizer.encode(f"the time traveller {i}"), np.int64)
                    sched.submit(
                        Job(
                            ids,
                            fast.zero_state()[0],
                            None,
                            cfg.scheduler_tokens,
                            SamplingParams(),
                            0,
                            False,
                            emit,
                        )
                    )
                for _ in range(b):
                    done.acquire()
                seconds = time.perf_counter() - t0
                sched.stop()
                assert count[0] == b * cfg.scheduler_tokens
                return seconds / cfg.scheduler_tokens

            s = best_of(once, cfg.repeats)
            what = (
                "scheduler, step path"
                if fused_tokens == 1
                else f"scheduler, fused (fused_tokens={fused_tokens})"
            )
            row = _row("scheduler_step" if fused_tokens == 1 else "scheduler_fused", what, b, s)
            row["includes"] = "prefill, sampling, token chunks; no gRPC"
            rows.append(row)
    return rows


SAMPLE_TEXT = (
    "The Time Traveller (for so it will be convenient to speak of him) was expounding a recondite "
    "matter to us. His grey eyes shone and twinkled, and his usually pale face was flushed and "
    "animated. The fire burned brightly, and the soft radiance of the incandescent lights in the "
    "lilies of silver caught the bubbles that flashed and passed in our glasses."
)


def shipped(cfg: InProcessConfig, models: dict[str, Path]) -> list[dict]:
    """Each shipped model on its fused path (K = the server's) at batch 1 and 64, in tokens/s
    and in characters/s: tokens/s times the characters a token of its tokenizer holds on a
    paragraph of the book (the model's own normalised text: d2l's models see lower-case
    letters and spaces, one character per token)."""
    rows = []
    for name, path in models.items():
        rt = ModelRuntime(path)
        if not rt.has_fused:
            continue
        text = rt.tokenizer.normalize(SAMPLE_TEXT)
        chars_per_token = len(text) / len(rt.tokenizer.encode(SAMPLE_TEXT))
        for batch in (1, 64):
            steps = cfg.tokens if batch == 1 else max(cfg.server_k, cfg.batched_tokens // batch)
            sec = best_of(lambda rt=rt, b=batch, n=steps: loop_fused(rt, b, n, cfg.server_k), cfg.repeats)
            row = _row(name, f"{name} ({rt.tokenizer.kind}, vocab {rt.metadata.vocab_size})", batch, sec)
            row |= {"chars_per_token": chars_per_token, "chars_per_s": row["tokens_per_s"] * chars_per_token}
            rows.append(row)
    return rows
