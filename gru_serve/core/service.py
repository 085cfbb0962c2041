"""The transport-free generation core: requests in, token events out.

GenerationService is the facade the front ends call; the work is done by the parts it wires
together (models, sessions, jobs, prefix, generation, scoring, limits). It checks every field
and keeps the session semantics of docs/architecture.md (lease, transactional commit, TTL,
ownership). It knows nothing of gRPC or HTTP.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

import numpy as np

from gru_serve.core.generation import Event, GenerateRequest, Generation, Progress
from gru_serve.core.jobs import Delivery, Jobs
from gru_serve.core.limits import StreamSlots
from gru_serve.core.models import ModelSet
from gru_serve.core.prefix import Prefixes
from gru_serve.core.scoring import ModelInfo, ScoreResult, Scoring
from gru_serve.core.sessions import SessionInfo, Sessions
from gru_serve.engine.api import EngineClient, ModelEngine, ModelRuntime
from gru_serve.engine.prefix_cache import PrefixCache
from gru_serve.ops.metrics import Metrics
from gru_serve.ops.settings import Settings
from gru_serve.outputs import RunDone
from gru_serve.stores.sessions import SessionStore


class GenerationService:
    def __init__(
        self,
        runtimes: dict[str, ModelRuntime],
        store: SessionStore,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
        engine: EngineClient | None = None,
    ) -> None:
        """engine: the engine process's connection (settings.engine == "process"); None runs
        every model's scheduler in a thread of this process."""
        self.store = store
        self.settings = settings
        self.clock = clock
        self.metrics = metrics or Metrics()
        delivery = Delivery()
        self.models = ModelSet(runtimes, settings, delivery.flush, engine)
        self.prefixes = Prefixes(settings, store)
        self.jobs = Jobs(delivery, self.models.scheduler, self.prefixes)
        self.slots = StreamSlots(settings)
        self.sessions = Sessions(store, self.models, self.jobs, settings, clock)
        self.generation = Generation(
            self.models, self.sessions, self.jobs, self.slots, self.metrics, settings, clock
        )
        self.scoring = Scoring(self.models, self.sessions, self.jobs, self.slots, settings, clock)

    def start(self) -> None:
        self.models.start()

    def stop(self) -> None:
        self.models.stop()

    # -- what the front ends, the metrics and the repository read --

    @property
    def engine(self) -> EngineClient | None:
        return self.models.engine

    @property
    def runtimes(self) -> dict[str, ModelRuntime]:
        """The models served, by name (replaced, never changed in place, as models come and go)."""
        return self.models.runtimes

    @property
    def schedulers(self) -> dict[str, ModelEngine]:
        return self.models.schedulers

    @property
    def unloaded(self) -> set[str]:
        return self.models.unloaded

    @property
    def default_model(self) -> str:
        return self.models.default_model

    @property
    def active_streams(self) -> int:
        return self.slots.active

    @property
    def prefix_cache(self) -> PrefixCache:
        return self.prefixes.cache

    # -- models that come and go --

    def runtime(self, model: str) -> ModelRuntime:
        return self.models.runtime(model)

    def provider(self, rt: ModelRuntime) -> str:
        return self.models.provider(rt)

    def unloading(self, name: str) -> bool:
        return self.models.unloading(name)

    def in_use(self, name: str) -> int:
        return self.models.in_use(name)

    def check_available(self, rt: ModelRuntime) -> None:
        self.models.check_available(rt)

    def using(self, rt: ModelRuntime) -> contextlib.AbstractContextManager[None]:
        return self.models.using(rt)

    def add_model(self, rt: ModelRuntime) -> None:
        self.models.add(rt)

    async def remove_model(self, name: str) -> None:
        await self.models.remove(name)

    def stream_slot(self, owner: str) -> contextlib.AbstractContextManager[None]:
        """Count a request against max_streams and max_streams_per_token while it runs."""
        return self.slots.slot(owner)

    # -- sessions --

    async def create_session(self, text: str = "", model: str = "", owner: str = "") -> SessionInfo:
        return await self.sessions.create(text, model, owner)

    async def get_session(self, session_id: str, owner: str = "") -> SessionInfo:
        return await self.sessions.get(session_id, owner)

    async def delete_session(self, session_id: str, owner: str = "") -> None:
        await self.sessions.delete(session_id, owner)

    async def fork_session(self, session_id: str, owner: str = "") -> SessionInfo:
        return await self.sessions.fork(session_id, owner)

    async def rewind_session(self, session_id: str, turn: int, owner: str = "") -> SessionInfo:
        return await self.sessions.rewind(session_id, turn, owner)

    async def export_session(self, session_id: str, owner: str = "") -> tuple[bytes, SessionInfo]:
        return await self.sessions.export(session_id, owner)

    async def import_session(self, blob: bytes, owner: str = "") -> SessionInfo:
        return await self.sessions.import_(blob, owner)

    # -- generation, scoring, info --

    def generate(
        self, req: GenerateRequest, owner: str = "", progress: Progress | None = None
    ) -> AsyncIterator[tuple[int, Event]]:
        """(choice, event): Started, then tokens, then each choice's Finished (see Generation)."""
        return self.generation.generate(req, owner, progress)

    async def run_model(self, rt: ModelRuntime, ids: np.ndarray, state: np.ndarray) -> RunDone:
        return await self.jobs.run(rt, ids, state)

    async def score(
        self, text: str, session_id: str = "", commit: bool = False, model: str = "", owner: str = ""
    ) -> ScoreResult:
        return await self.scoring.score(text, session_id, commit, model, owner)

    def model_info(self, model: str = "") -> ModelInfo:
        return self.scoring.model_info(model)
