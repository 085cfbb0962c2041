"""The engine process: every model's onnxruntime sessions and scheduler, serving front ends.

`python -m gru_serve.engine.process ADDRESS` with its EngineConfig as JSON in GRU_SERVE_ENGINE_SETTINGS
(gru_serve.engine.supervisor starts it so). One I/O thread owns the ROUTER socket at ADDRESS:
it reads the front ends' messages (gru_serve.engine.protocol) and sends what the scheduler
threads hand it. A scheduler thread never touches that socket: during a round its jobs' events
collect in its Outbox, and after the round (the scheduler's flush) one Batch per front end goes
to the I/O thread over an inproc PUSH socket of its own. So the engine loop never waits for a
front end, and a front end gets one message per round however many of its streams ran.

A front end's Hello names its models (by name and file); the engine loads those it lacks on a
loader thread, so running streams keep getting tokens meanwhile, and answers Ready (with the
models it could not load, and why) once they are loaded. It exits when the process that started
it goes away, so an engine is never orphaned, and then removes the socket folder it was given
(the supervisor, killed, cannot).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import zmq

from gru_serve.engine import protocol as proto
from gru_serve.engine.config import EngineConfig
from gru_serve.engine.runtime import load_runtime
from gru_serve.engine.scheduler import Scheduler, scheduler_for
from gru_serve.engine.work import Job, RunJob, SchedulerStats
from gru_serve.ops.errors import GruServeError, Unavailable
from gru_serve.ops.logs import configure
from gru_serve.outputs import Event, FailedEvent, Tokens
from gru_serve.state import StateSpec

log = logging.getLogger(__name__)

SETTINGS_ENV = "GRU_SERVE_ENGINE_SETTINGS"
EVENTS = "inproc://events"
STATS_EVERY_S = 0.25
FRONT_END_SILENCE_S = 5.0  # a front end silent this long is gone (it pings every PING_EVERY_S)


class Outbox:
    """One scheduler's events of the current round, by front end; sent at its flush."""

    def __init__(self, engine: Engine, model: str) -> None:
        self.engine = engine
        self.model = model
        self.scheduler: Scheduler | None = None
        self.pending: dict[bytes, list[proto.EventOut]] = {}
        self.push: zmq.Socket | None = None  # made on the scheduler thread, its only user

    def add(self, front: bytes, rid: int, job: Job | RunJob, ev: Event) -> None:
        blocks = None
        if getattr(job, "blocks", None) is not None:  # a Job's first event: its blocks are done
            blocks, job.blocks = proto.blocks_out(job.blocks), None
        self.pending.setdefault(front, []).append(proto.event_out(rid, ev, blocks))
        if not isinstance(ev, Tokens):
            self.engine.jobs.pop((front, rid), None)

    def flush(self) -> None:
        if not self.pending:
            return
        if self.push is None:
            self.push = self.engine.ctx.socket(zmq.PUSH)
            self.push.setsockopt(zmq.SNDHWM, 0)
            self.push.connect(EVENTS)
        stats = self.scheduler.stats()
        for front, events in self.pending.items():
            self.push.send_multipart([front, proto.encoder.encode(proto.Batch(self.model, stats, events))])
        self.pending = {}


class Engine:
    def __init__(self, config: EngineConfig, address: str, folder: str = "") -> None:
        self.config = config
        self.folder = folder  # removed when the parent goes away (its owner, the supervisor, is gone)
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(address)
        self.events = self.ctx.socket(zmq.PULL)
        # No high-water mark inside the process: a scheduler thread must never block on a send
        # while the I/O thread is busy (loading a model for a Hello).
        self.events.setsockopt(zmq.RCVHWM, 0)
        self.events.bind(EVENTS)
        self.boot = uuid.uuid4().hex[:12]
        self.schedulers: dict[str, Scheduler] = {}
        self.outboxes: dict[str, Outbox] = {}
        self.paths: dict[str, str] = {}
        self.fronts: set[bytes] = set()
        self.seen: dict[bytes, float] = {}  # front end -> when it last sent anything
        self.users: dict[str, set[bytes]] = {}  # model -> the front ends that serve it
        # Jobs under way by (front end, request id): added here, removed by their scheduler's
        # outbox as their last event goes out (dict operations are atomic under the GIL).
        self.jobs: dict[tuple[bytes, int], tuple[Scheduler, Job | RunJob]] = {}
        self.stopping = threading.Event()
        # Loads (Hello) and unloads run here, one at a time and in order, never on the I/O thread:
        # a load takes seconds, and the I/O thread forwards every running stream's tokens.
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="engine-loader")
        self._replies: zmq.Socket | None = None  # the loader thread's PUSH to the I/O thread

    def load(self, name: str, path: str) -> str:
        """On the loader thread: '' once `name` serves the file `path`, else why it cannot. A
        failure is not remembered: a later Hello tries again (the file may have been fixed)."""
        if self.paths.get(name) == path:
            return ""
        try:
            rt = load_runtime(Path(path), self.config, name.partition("@")[0])
        except Exception as e:  # onnxruntime's own errors too: a graph that fails its warm-up run
            why = str(e) if isinstance(e, GruServeError) else f"model {path}: {type(e).__name__}: {e}"
            log.error("engine: model %s not loaded: %s", name, why)
            return why
        outbox = Outbox(self, name)
        outbox.scheduler = sched = scheduler_for(rt, self.config, outbox.flush)
        self.outboxes[name] = outbox
        old = self.schedulers.get(name)
        self.schedulers = {**self.schedulers, name: sched}
        self.paths[name] = path
        sched.start()
        if old is not None:
            old.stop()
        log.info("engine: model %s loaded from %s on %s", name, path, rt.provider)
        return ""

    def hello(self, front: bytes, models: dict[str, str]) -> None:
        """On the loader thread: load a front end's models, then answer Ready."""
        failed: dict[str, str] = {}
        for name, path in models.items():
            try:
                why = self.load(name, path)
            except Exception as e:  # a front end waiting for its Ready must get one
                log.exception("engine: loading model %s failed", name)
                why = f"the engine could not load it: {type(e).__name__}: {e}"
            if why:
                failed[name] = why
            else:
                self.users.setdefault(name, set()).add(front)
        providers = {name: s.runtime.provider for name, s in self.schedulers.items()}
        self._reply(front, proto.Ready(self.boot, failed, providers))

    def _reply(self, front: bytes, msg: proto.FromEngine) -> None:
        """From the loader thread: the I/O thread forwards it (only it uses the ROUTER)."""
        if self._replies is None:
            self._replies = self.ctx.socket(zmq.PUSH)
            self._replies.setsockopt(zmq.SNDHWM, 0)
            self._replies.connect(EVENTS)
        self._replies.send_multipart([front, proto.encoder.encode(msg)])

    def unload(self, front: bytes, model: str) -> None:
        """On the loader thread, after any load of the model that came first."""
        users = self.users.get(model, set())
        users.discard(front)
        sched = self.schedulers.get(model)
        if sched is not None and not users:  # no other front end serves it
            self.schedulers = {k: v for k, v in self.schedulers.items() if k != model}
            del self.paths[model]
            self.outboxes.pop(model, None)
            threading.Thread(target=sched.stop, daemon=True).start()  # its streams finish first

    def _send(self, front: bytes, msg: proto.FromEngine) -> None:
        self.router.send_multipart([front, proto.encoder.encode(msg)])

    def _refuse(self, front: bytes, rid: int, err: GruServeError) -> None:
        self.jobs.pop((front, rid), None)
        stats = SchedulerStats(0, 0, 0, 0, 0, 0, 0)
        self._send(front, proto.Batch("", stats, [proto.event_out(rid, FailedEvent(err))]))

    def handle(self, front: bytes, msg: proto.ToEngine) -> None:
        if isinstance(msg, proto.Submit | proto.Run):
            sched = self.schedulers.get(msg.model)
            outbox = self.outboxes.get(msg.model)
            if sched is None or outbox is None:
                self._refuse(front, msg.rid, Unavailable(f"model {msg.model!r} is not loaded in the engine"))
                return
            spec = StateSpec.of(sched.runtime.metadata)
            if isinstance(msg, proto.Submit):
                job = proto.job_of(msg, spec, sched.runtime.metadata.vocab_size)
            else:
                job = proto.run_job_of(msg, spec)
            job.emit = lambda ev, rid=msg.rid, job=job: outbox.add(front, rid, job, ev)
            self.jobs[(front, msg.rid)] = (sched, job)
            try:
                (sched.submit if isinstance(msg, proto.Submit) else sched.submit_run)(job)
            except GruServeError as e:
                self._refuse(front, msg.rid, e)
            return
        if isinstance(msg, proto.Ping):
            return
        if isinstance(msg, proto.Hello):
            if msg.version != proto.PROTOCOL_VERSION:
                self.refuse(front, msg.version)
                return
            self.fronts.add(front)
            self.loader.submit(self.hello, front, msg.models)
            return
        if isinstance(msg, proto.Unload):
            self.loader.submit(self.unload, front, msg.model)
            return
        found = self.jobs.get((front, msg.rid))
        if found is None:
            return  # it has ended: its last event is on its way
        sched, job = found
        if isinstance(msg, proto.Cancel):
            sched.cancel(job)
            self.jobs.pop((front, msg.rid), None)  # a cancelled job sends nothing more
        elif isinstance(msg, proto.Pause):
            sched.pause(job)  # it leaves the batch between rounds
        else:
            sched.resume(job)

    def refuse(self, front: bytes, version: int) -> None:
        """A front end of another protocol version said Hello: told so, and not served."""
        log.error(
            "engine: refused a front end of engine protocol version %d (this is %d)",
            version,
            proto.PROTOCOL_VERSION,
        )
        self._send(front, proto.refusal(version))

    def gone(self, front: bytes) -> None:
        """A front end fell silent (it pings every PING_EVERY_S): nobody reads its jobs' tokens
        any more, so they stop now rather than run to their ends; the models it alone served
        stay loaded for its return. (ZeroMQ's disconnect notice for ROUTER sockets is a draft API
        that the released libzmq lacks.)"""
        mine = [key for key in self.jobs if key[0] == front]
        for key in mine:
            sched, job = self.jobs.pop(key)
            sched.cancel(job)
        self.fronts.discard(front)
        for users in list(self.users.values()):  # the loader thread may add a model meanwhile
            users.discard(front)
        if mine:
            log.warning("engine: a front end fell silent; its %d request(s) stopped", len(mine))

    def stats(self) -> proto.Stats:
        return proto.Stats({name: s.stats() for name, s in self.schedulers.items()})

    def run(self) -> None:
        parent = os.getppid()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.events, zmq.POLLIN)
        next_stats = time.monotonic()
        while not self.stopping.is_set():
            ready = dict(poller.poll(STATS_EVERY_S * 1000))
            if self.events in ready:
                self._forward()
            if self.router in ready:
                while True:
                    try:
                        front, payload = self.router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.seen[front] = time.monotonic()
                    try:
                        self.handle(front, proto.to_engine.decode(payload))
                    except msgspec.ValidationError:
                        version = proto.hello_version(payload)
                        if version is None:
                            log.exception("engine: a message from a front end could not be read")
                        else:  # another version's Hello, whose layout differs from this one's
                            self.refuse(front, version)
                    except Exception:  # one bad message must not take every front end's work down
                        log.exception("engine: a message from a front end could not be handled")
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + STATS_EVERY_S
                if os.getppid() != parent:
                    log.warning("engine: the process that started it is gone; stopping")
                    if self.folder:
                        shutil.rmtree(self.folder, ignore_errors=True)
                    break
                for front, last in list(self.seen.items()):
                    if now - last > FRONT_END_SILENCE_S:
                        del self.seen[front]
                        self.gone(front)
                stats = proto.encoder.encode(self.stats())
                for front in list(self.fronts):
                    self.router.send_multipart([front, stats])
        self.loader.shutdown(wait=True, cancel_futures=True)  # a load under way finishes first
        for sched in self.schedulers.values():
            sched.stop()  # jobs still under way fail with UNAVAILABLE
        self._forward()

    def _forward(self) -> None:
        while True:
            try:
                frames = self.events.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.router.send_multipart(frames)


def main(argv: list[str] | None = None) -> int:
    """ADDRESS [FOLDER]: FOLDER (the supervisor's, holding the socket) is removed if the parent
    dies without removing it."""
    args = argv or sys.argv[1:]
    address, folder = args[0], (args[1] if len(args) > 1 else "")
    config = msgspec.json.decode(os.environ[SETTINGS_ENV], type=EngineConfig)
    configure(config.log_level)
    # The I/O thread and the scheduler threads share the GIL; a scheduler thread back from
    # session.run should not wait 5 ms for it (as in the front end: gru_serve.server.serve).
    sys.setswitchinterval(0.0005)
    engine = Engine(config, address, folder)
    signal.signal(signal.SIGTERM, lambda *_: engine.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: engine.stopping.set())
    print(f"gru-serve engine {engine.boot} ready at {address}", flush=True)
    engine.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
