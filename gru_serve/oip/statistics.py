"""Triton's statistics extension: per-model counters and durations, as ModelStatistics (gRPC) and
as the JSON Triton's REST API returns (`GET /v2/models[/M[/versions/V]]/stats`).

A request's timeline is four stamps (time.perf_counter_ns), set where the servicer can take them
once per request, never per token:

    arrived  --compute_input-->  checked  --queue-->  infer_start  --compute_infer-->  infer_end
             --compute_output-->  done

- `M` (logits): compute_input is decoding the tensors and checking the request (parameters,
  shape, token ids); queue is waiting for the sequence's lease and a worker thread;
  compute_infer is the model run (session.run, timed on the worker thread); compute_output is
  committing the sequence's new state and encoding the response.
- `M-generate`: compute_input is decoding the prompt and the parameters; queue runs until the
  engine's first token (Finished.time_to_first_token_s): the sequence's session, the wait for a
  batch slot and the prompt's prefill, which the engine times as one; compute_infer is the rest
  of the generation, to the engine's Finished (the session's commit included); compute_output is
  building the last response (the whole one for unary ModelInfer) and ending the sequence. A
  streamed request's tokens go out during compute_infer.

Success, queue and the compute phases count successful requests (so their counts are equal);
fail counts failed or cancelled ones, with the time to the failure. inference_count adds each
request's batch size, execution_count one per request (every request is its own model execution:
the engine's continuous batching mixes requests mid-generation, so a batch of requests is not
one execution). batch_stats has one entry per batch size seen: `M`'s batch dimension, 1 for
`M-generate`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from gru_serve.grpc.generated.inference import grpc_service_pb2 as pb

PHASES = ("queue", "compute_input", "compute_infer", "compute_output")
BATCH_PHASES = ("compute_input", "compute_infer", "compute_output")


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(ns, 0)

    def pb(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)

    def json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class Phases:
    """One request's stamps (perf_counter_ns); 0 where a stage was not reached."""

    arrived: int = field(default_factory=time.perf_counter_ns)
    batch: int = 1
    checked: int = 0  # decoded and checked: compute_input ends, queue begins
    infer_start: int = 0  # the model began: queue ends
    infer_end: int = 0  # the model's last work: compute_output begins


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class Stats:
    """One model's (endpoint's) statistics since it was loaded."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inferences: int = 0
    executions: int = 0
    last_ms: int = 0
    batches: dict[int, BatchStats] = field(default_factory=dict)

    def succeeded(self, p: Phases, done: int | None = None) -> None:
        done = time.perf_counter_ns() if done is None else done
        # A stage not reached (a generation of 0 tokens has no first token) takes no time.
        checked = p.checked or p.arrived
        start = max(p.infer_start, checked)
        end = max(p.infer_end, start)
        spans = {
            "compute_input": checked - p.arrived,
            "queue": start - checked,
            "compute_infer": end - start,
            "compute_output": done - end,
        }
        self.success.add(done - p.arrived)
        for name in PHASES:
            getattr(self, name).add(spans[name])
        batch = self.batches.get(p.batch)
        if batch is None:
            batch = self.batches[p.batch] = BatchStats()
        for name in BATCH_PHASES:
            getattr(batch, name).add(spans[name])
        self.inferences += p.batch
        self.executions += 1
        self.last_ms = int(time.time() * 1000)

    def failed(self, p: Phases) -> None:
        self.fail.add(time.perf_counter_ns() - p.arrived)
        self.last_ms = int(time.time() * 1000)

    def pb(self, name: str, version: str) -> pb.ModelStatistics:
        stats = {n: getattr(self, n).pb() for n in ("success", "fail", *PHASES)}
        return pb.ModelStatistics(
            name=name,
            version=version,
            last_inference=self.last_ms,
            inference_count=self.inferences,
            execution_count=self.executions,
            inference_stats=pb.InferStatistics(**stats),
            batch_stats=[
                pb.InferBatchStatistics(batch_size=size, **{n: getattr(b, n).pb() for n in BATCH_PHASES})
                for size, b in sorted(self.batches.items())
            ],
        )

    def json(self, name: str, version: str) -> dict[str, Any]:
        """Triton's REST shape: counts and durations as JSON numbers (protobuf's JSON mapping
        would make these uint64 strings)."""
        zero = Duration().json()
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_ms,
            "inference_count": self.inferences,
            "execution_count": self.executions,
            "inference_stats": {
                **{n: getattr(self, n).json() for n in ("success", "fail", *PHASES)},
                "cache_hit": zero,  # no response cache
                "cache_miss": zero,
            },
            "batch_stats": [
                {"batch_size": size, **{n: getattr(b, n).json() for n in BATCH_PHASES}}
                for size, b in sorted(self.batches.items())
            ],
        }
