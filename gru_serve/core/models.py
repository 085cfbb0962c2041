"""The model set: the runtimes served by name, a scheduler each, the requests holding each,
and models that come and go (a load replaces, an unload waits for its requests to finish)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Iterator

from gru_serve.engine.api import FIELDS, EngineClient, EngineConfig, ModelEngine, ModelRuntime, model_engine
from gru_serve.ops.errors import InvalidArgument, NotFound, Unavailable
from gru_serve.ops.settings import Settings


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's part of the server's settings."""
    return EngineConfig(**settings.model_dump(include=set(FIELDS)))


class ModelSet:
    def __init__(
        self,
        runtimes: dict[str, ModelRuntime],
        settings: Settings,
        on_round: Callable[[], None],
        engine: EngineClient | None = None,
    ) -> None:
        """on_round: called after each scheduler round (the delivery's flush); engine: the
        engine process's connection, None to run each scheduler in a thread of this process."""
        if not runtimes:
            raise ValueError("at least one model is needed")
        if any(name != rt.name for name, rt in runtimes.items()):
            raise ValueError("runtimes must be keyed by their names")
        self.settings = settings
        self.engine = engine
        self._on_round = on_round
        # Models come and go (add, remove). Both dicts are replaced, never changed in place, so
        # a reader on another thread (a metrics scrape) iterates a stable copy.
        self.runtimes = dict(runtimes)
        self.schedulers = {name: self._scheduler_for(rt) for name, rt in runtimes.items()}
        self._first_model = next(iter(runtimes))
        self.unloaded: set[str] = set()  # names removed and not loaded again
        # Requests using each runtime (see `using`); an unload or a reload waits for them.
        self._holds: collections.Counter[ModelRuntime] = collections.Counter()
        self._unloading: set[ModelRuntime] = set()
        self._idle: dict[ModelRuntime, asyncio.Event] = {}  # set when a draining runtime's holds end
        self._retiring: dict[ModelRuntime, ModelEngine] = {}  # replaced by a reload, draining
        self._retirements: set[asyncio.Task] = set()

    def start(self) -> None:
        for s in self.schedulers.values():
            s.start()

    def stop(self) -> None:
        for s in [*self.schedulers.values(), *self._retiring.values()]:
            s.stop()

    @property
    def default_model(self) -> str:
        """The model of requests that name none: the first model served at start while it is
        loaded, else the first one loaded ('' when none is)."""
        if self._first_model in self.runtimes:
            return self._first_model
        return next(iter(self.runtimes), "")

    def runtime(self, model: str) -> ModelRuntime:
        name = model or self.default_model
        rt = self.runtimes.get(name)
        if rt is None:
            if not name:
                raise Unavailable("no model is loaded")
            if name in self.unloaded:
                raise NotFound(f"model {name!r} is not loaded (it was unloaded)")
            raise InvalidArgument(
                f"model: unknown model {name!r}; this server serves {', '.join(self.runtimes)}"
            )
        return rt

    def _scheduler_for(self, rt: ModelRuntime) -> ModelEngine:
        return model_engine(rt, engine_config(self.settings), self._on_round, self.engine)

    def scheduler(self, rt: ModelRuntime) -> ModelEngine:
        """The scheduler running `rt`: a retiring one's (replaced by a reload), else its name's."""
        retiring = self._retiring.get(rt)
        return retiring if retiring is not None else self.schedulers[rt.name]

    def provider(self, rt: ModelRuntime) -> str:
        """The onnxruntime provider that runs `rt` (in the engine process: as it reported)."""
        return self.scheduler(rt).provider

    def unloading(self, name: str) -> bool:
        rt = self.runtimes.get(name)
        return rt is not None and rt in self._unloading

    def in_use(self, name: str) -> int:
        """Requests holding the model served under `name`."""
        rt = self.runtimes.get(name)
        return self._holds[rt] if rt is not None else 0

    def check_available(self, rt: ModelRuntime) -> None:
        """Unavailable unless `rt` is served and takes new requests (not unloading, not replaced)."""
        if rt in self._unloading:
            raise Unavailable(f"model {rt.name!r} is unloading: it takes no new requests")
        if self.runtimes.get(rt.name) is not rt:
            raise Unavailable(f"model {rt.name!r} was unloaded or reloaded while the request waited")

    @contextlib.contextmanager
    def using(self, rt: ModelRuntime) -> Iterator[None]:
        """Hold a model while a request runs on it: an unload or a reload lets the requests
        that hold it finish before its scheduler stops. Taken once per request, at once after
        the model is looked up (no await between, so an unload cannot slip in); a model that is
        unloading takes no new holds (Unavailable)."""
        self.check_available(rt)
        self._holds[rt] += 1
        try:
            yield
        finally:
            self._holds[rt] -= 1
            if not self._holds[rt]:
                del self._holds[rt]
                if rt in self._idle:
                    self._idle[rt].set()

    async def _drained(self, rt: ModelRuntime) -> None:
        """Wait until no request holds `rt`."""
        idle = self._idle.setdefault(rt, asyncio.Event())
        try:
            if self._holds[rt]:
                await idle.wait()
        finally:
            self._idle.pop(rt, None)

    def add(self, rt: ModelRuntime) -> None:
        """Serve a loaded runtime under its name, with a scheduler of its own. A model already
        served under that name is replaced at once: new requests go to `rt`, those holding the
        old one finish on it, then its scheduler stops."""
        sched = self._scheduler_for(rt)
        sched.start()
        old, old_sched = self.runtimes.get(rt.name), self.schedulers.get(rt.name)
        self.runtimes = {**self.runtimes, rt.name: rt}
        self.schedulers = {**self.schedulers, rt.name: sched}
        self.unloaded.discard(rt.name)
        if old is not None and old_sched is not None:
            self._retiring[old] = old_sched
            task = asyncio.create_task(self._retire(old))
            self._retirements.add(task)
            task.add_done_callback(self._retirements.discard)

    async def _retire(self, rt: ModelRuntime) -> None:
        await self._drained(rt)
        sched = self._retiring[rt]
        await asyncio.to_thread(sched.stop)
        del self._retiring[rt]

    async def remove(self, name: str) -> None:
        """Unload: the model refuses new requests at once (Unavailable), the requests holding
        it finish, then it goes (its name is then NotFound) and its scheduler stops. Returns
        once it is gone; cancelling the wait does not stop the unload (the caller shields it)."""
        rt = self.runtimes.get(name)
        if rt is None:
            return
        self._unloading.add(rt)
        try:
            await self._drained(rt)
        finally:
            # Gone even when the wait was cancelled (the server is stopping): a model marked
            # unloading would otherwise refuse requests forever.
            sched = self.schedulers[name]
            self.runtimes = {k: v for k, v in self.runtimes.items() if k != name}
            self.schedulers = {k: v for k, v in self.schedulers.items() if k != name}
            self.unloaded.add(name)
            self._unloading.discard(rt)
            if self._holds[rt]:
                self._retiring[rt] = sched  # still in use: stopped when the server stops
            else:
                await asyncio.to_thread(sched.stop)
