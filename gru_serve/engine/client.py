"""A front end's side of the engine process: the connection (EngineClient), and each model as
gru_serve.engine.api's ModelEngine (RemoteModel: the remote implementation; a Scheduler is the
in-process one).

Everything here runs on the front end's event loop, the only user of its socket. A job's events
come in one Batch per engine round and go to the job's `emit` as the scheduler thread would call
it, then the scheduler's `flush`, so the service's code is the same for both engines.

The engine going away (it crashed, or was killed) shows as the socket's peer disconnecting: every
job under way fails at once with UNAVAILABLE, new ones are refused the same way, and `on_change`
tells the server (health NOT_SERVING). ZeroMQ reconnects by itself once the supervisor has
started a new engine; Hello and Ready follow and `on_change` reports it up again. Messages are
never queued for an engine that is not connected (ZMQ_IMMEDIATE), so nothing sent to a dead
engine reaches its successor.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from gru_serve.engine import protocol as proto
from gru_serve.engine.runtime import ModelRuntime
from gru_serve.engine.work import Job, RunJob, SchedulerStats
from gru_serve.ops.errors import ModelLoadError, Unavailable
from gru_serve.outputs import FailedEvent
from gru_serve.state import StateSpec

log = logging.getLogger(__name__)


def engine_key(rt: ModelRuntime) -> str:
    return f"{rt.name}@{rt.model_hash[:16]}"


class RemoteModel:
    """One model's scheduler in the engine process."""

    def __init__(self, client: EngineClient, runtime: ModelRuntime, flush: Callable[[], None]) -> None:
        self.client = client
        self.runtime = runtime
        self.flush = flush
        # The engine's name for it: a reload of another file under the same name is another
        # scheduler there, so requests in flight on the old one finish on it.
        self.key = engine_key(runtime)
        self.last_stats = SchedulerStats(0, 0, 0, 0, 0, 0, 0)  # as the engine last sent them
        self.provider = ""  # the engine's, from its Ready

    def stats(self) -> SchedulerStats:
        return self.last_stats

    def start(self) -> None:
        self.client.add(self)

    def stop(self) -> None:
        """Any thread: the engine drops the model once it has no more requests on it."""
        self.client.loop.call_soon_threadsafe(self.client.remove, self)

    def submit(self, job: Job) -> None:
        self.client.submit(self, job)

    def submit_run(self, job: RunJob) -> None:
        self.client.submit(self, job)

    def pause(self, job: Job) -> None:
        """Its consumer fell behind (the service's emit, on the event loop): the engine parks it."""
        self.client.control(job, proto.Pause)

    def resume(self, job: Job) -> None:
        self.client.control(job, proto.Resume)

    def cancel(self, job: Job | RunJob) -> None:
        job.cancel()
        self.client.control(job, proto.Cancel)
        self.client.forget(job)


class EngineClient:
    def __init__(self, address: str, on_change: Callable[[bool], None] | None = None) -> None:
        self.address = address
        self.on_change = on_change
        self.loop = asyncio.get_running_loop()
        # The process's one context: never collected (a collected context with a socket still
        # open waits forever in its finaliser), and sockets are what each client closes.
        self.sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 50)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.schedulers: dict[str, RemoteModel] = {}
        self.jobs: dict[int, tuple[RemoteModel, Job | RunJob]] = {}
        self.rids = itertools.count(1)
        self.up = False
        self.boot = ""
        self.ready = asyncio.Event()
        self.restarts = 0  # engines seen after the first
        self.failed: dict[str, str] = {}  # models the engine could not load, as it last said
        self.refused = ""  # why the engine refused this front end (another protocol version)
        self.providers: dict[str, str] = {}  # the engine's models and their providers, as it last said
        self._loads: dict[str, asyncio.Future[None]] = {}  # engine key -> a load() waiting for it
        self._tasks: list[asyncio.Task] = []

    async def start(self, timeout: float) -> None:
        """Connect and wait for the engine's Ready (it loads the models first); a model the
        engine could not load fails the start, as it would in one process."""
        self._tasks = [asyncio.create_task(t) for t in (self._read(), self._watch(), self._ping())]
        self.sock.connect(self.address)
        await asyncio.wait_for(self.ready.wait(), timeout)
        if self.refused:
            raise ModelLoadError(f"the engine at {self.address} refused this front end: {self.refused}")
        if self.failed:
            raise ModelLoadError("; ".join(self.failed.values()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._lost("the server is shutting down")
        self._fail_loads("the server is shutting down")
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)

    # -- to the engine --

    def _send(self, msg: proto.ToEngine) -> bool:
        fut = self.sock.send(proto.encoder.encode(msg), zmq.DONTWAIT)
        return not (fut.done() and fut.exception() is not None)

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(proto.PING_EVERY_S)
            if self.up:
                self._send(proto.Ping())

    def _hello(self) -> None:
        models = {s.key: str(s.runtime.path) for s in self.schedulers.values()}
        sent = self._send(proto.Hello(proto.PROTOCOL_VERSION, models))
        if not sent and not self.up:  # connected, not yet ready for messages: soon
            self.loop.call_later(0.02, self._hello)

    async def load(self, rt: ModelRuntime) -> None:
        """Have the engine load a model the front end has opened; returns once the engine serves
        it, or raises ModelLoadError with the engine's reason (Unavailable if it goes away)."""
        if not self.up:
            raise Unavailable("the engine is restarting; retry the load shortly")
        key = engine_key(rt)
        fut = self._loads.get(key)
        if fut is None:
            fut = self._loads[key] = self.loop.create_future()
            fut.add_done_callback(lambda _: self._loads.pop(key, None))
            models = {s.key: str(s.runtime.path) for s in self.schedulers.values()}
            if not self._send(proto.Hello(proto.PROTOCOL_VERSION, {**models, key: str(rt.path)})):
                fut.set_exception(Unavailable("the engine is not connected; retry the load shortly"))
        await asyncio.shield(fut)

    def _fail_loads(self, why: str) -> None:
        for fut in list(self._loads.values()):
            if not fut.done():
                fut.set_exception(Unavailable(why))

    def add(self, sched: RemoteModel) -> None:
        self.schedulers[sched.key] = sched
        sched.provider = self.providers.get(sched.key, "")
        if self.up:
            self._hello()  # the engine loads it before reading anything sent after this

    def remove(self, sched: RemoteModel) -> None:
        if self.schedulers.get(sched.key) is sched:
            del self.schedulers[sched.key]
            self._send(proto.Unload(sched.key))
        self._lost("the server shut down before the request finished", sched)

    def submit(self, sched: RemoteModel, job: Job | RunJob) -> None:
        if not self.up:
            raise Unavailable("the engine is restarting; retry shortly")
        job.key = next(self.rids)
        self.jobs[job.key] = (sched, job)
        msg = (
            proto.run(job.key, sched.key, job)
            if isinstance(job, RunJob)
            else proto.submit(job.key, sched.key, job)
        )
        if not self._send(msg):
            del self.jobs[job.key]
            raise Unavailable("the engine is not connected; retry shortly")

    def control(self, job: Job | RunJob, kind: type[proto.Cancel | proto.Pause | proto.Resume]) -> None:
        if job.key in self.jobs:
            self._send(kind(job.key))

    def forget(self, job: Job | RunJob) -> None:
        self.jobs.pop(job.key, None)

    # -- from the engine --

    async def _read(self) -> None:
        while True:
            data = await self.sock.recv()
            try:
                msg = proto.from_engine.decode(data)
            except Exception:
                log.exception("a message from the engine could not be read (%d bytes)", len(data))
                continue
            if isinstance(msg, proto.Batch):
                if msg.model in self.schedulers:
                    self.schedulers[msg.model].last_stats = msg.stats
                self._dispatch(msg.events)
            elif isinstance(msg, proto.Refused):
                log.error("the engine refused this front end: %s", msg.message)
                self.refused = msg.message
                self._fail_loads(msg.message)
                self.ready.set()
            elif isinstance(msg, proto.Stats):
                for key, stats in msg.models.items():
                    if key in self.schedulers:
                        self.schedulers[key].last_stats = stats
            else:
                self._ready(msg)

    def _dispatch(self, events: list[proto.EventOut]) -> None:
        touched: dict[int, RemoteModel] = {}
        for out in events:
            found = self.jobs.get(out.rid)
            if found is None:
                continue  # cancelled here already
            sched, job = found
            spec, vocab = StateSpec.of(sched.runtime.metadata), sched.runtime.metadata.vocab_size
            if isinstance(out, proto.TokensOut | proto.DoneOut) and out.blocks is not None:
                job.blocks = proto.blocks_in(out.blocks, spec, vocab)
            if not isinstance(out, proto.TokensOut):
                del self.jobs[out.rid]
            job.emit(proto.event_in(out, spec, vocab))  # may pause it (RemoteModel.pause)
            touched[id(sched)] = sched
        for sched in touched.values():
            sched.flush()

    def _ready(self, msg: proto.Ready) -> None:
        self.failed = msg.failed
        for name, why in msg.failed.items():
            log.error("the engine could not load model %s: %s", name, why)
        self.providers = msg.providers
        for key, provider in msg.providers.items():
            if key in self.schedulers:
                self.schedulers[key].provider = provider
        for key, fut in list(self._loads.items()):
            if fut.done():
                continue
            if key in msg.failed:
                fut.set_exception(ModelLoadError(msg.failed[key]))
            elif key in msg.providers:
                fut.set_result(None)
        if msg.boot != self.boot:
            if self.boot:
                self.restarts += 1
                log.info("engine %s is up (restart %d)", msg.boot, self.restarts)
            self.boot = msg.boot
        self.up = True
        self.ready.set()
        if self.on_change is not None:
            self.on_change(True)

    async def _watch(self) -> None:
        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._hello()
            elif event == zmq.EVENT_DISCONNECTED and self.up:
                log.error("the engine process went away; failing its requests and waiting for a new one")
                self.up = False
                self._lost("the engine process stopped before the request finished; retry")
                self._fail_loads("the engine process stopped while loading the model; retry the load")
                if self.on_change is not None:
                    self.on_change(False)

    def _lost(self, why: str, only: RemoteModel | None = None) -> None:
        """Fail the jobs under way (of one scheduler, or all)."""
        jobs = {rid: found for rid, found in self.jobs.items() if only is None or found[0] is only}
        for rid in jobs:
            del self.jobs[rid]
        touched = {}
        for sched, job in jobs.values():
            job.emit(FailedEvent(Unavailable(why)))
            touched[id(sched)] = sched
        for sched in touched.values():
            sched.flush()
