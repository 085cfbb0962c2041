"""The engine as core/ sees it, and the only engine module core/ imports.

A model the engine serves is a ModelEngine: submit a generation (Job) or a plain model run
(RunJob), whose events go to the job's `emit` (gru_serve.outputs); pause, resume and cancel a
job; start and stop; its gauges (stats) and provider. `model_engine` picks the implementation, as
vLLM's make_client picks InprocClient or MPClient: in this process (--engine thread) it is the
model's Scheduler itself, running a thread; with the engine process (--engine process) it is a
RemoteModel over the EngineClient connection, whose Engine (gru_serve.engine.process) runs the
same Scheduler for it. Either way the engine reads only its EngineConfig.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from gru_serve.engine.client import EngineClient, RemoteModel
from gru_serve.engine.config import FIELDS, EngineConfig
from gru_serve.engine.runtime import ModelRuntime, load_runtime
from gru_serve.engine.scheduler import scheduler_for
from gru_serve.engine.work import Job, RunJob, SchedulerStats

__all__ = [
    "FIELDS",
    "EngineClient",
    "EngineConfig",
    "Job",
    "ModelEngine",
    "ModelRuntime",
    "RunJob",
    "SchedulerStats",
    "load_runtime",
    "model_engine",
]


class ModelEngine(Protocol):
    """One model served by the engine (a Scheduler in this process, or a RemoteModel)."""

    runtime: ModelRuntime

    @property
    def provider(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None:
        """Stop taking work; the jobs under way finish (thread mode: fail with Unavailable)."""

    def submit(self, job: Job) -> None:
        """Queue a generation (ResourceExhausted when the queue is full, Unavailable when
        stopping); its events go to job.emit."""

    def submit_run(self, job: RunJob) -> None: ...

    def pause(self, job: Job) -> None:
        """Its consumer is behind: it leaves the batch, its state kept, until resumed."""

    def resume(self, job: Job) -> None: ...

    def cancel(self, job: Job | RunJob) -> None:
        """Stop a job; it sends nothing more after its current round."""

    def stats(self) -> SchedulerStats: ...


def model_engine(
    rt: ModelRuntime, config: EngineConfig, flush: Callable[[], None], remote: EngineClient | None = None
) -> ModelEngine:
    """The engine serving `rt`: through `remote` (the engine process) when given, else in a
    thread of this process. flush: called after each round's events are out."""
    if remote is not None:
        return RemoteModel(remote, rt, flush)
    return scheduler_for(rt, config, flush)
