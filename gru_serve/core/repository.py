"""The model repository: which models this server can serve, in which state, and loading and
unloading them while it serves (Triton's model repository extension, transport-free).

Models come from two places: those given with --model (or, without it, the shipped ones), loaded
at start as before, and the folder of --model-repository, where each sub-folder NAME holds
NAME/model.onnx or Triton's layout NAME/<version>/model.onnx (the highest numeric version is
served). Repository models are loaded on request, as with Triton's explicit model control; the
folder is read again at every index and load, so models added to it while the server runs can be
loaded.

- index: every model of both places, and any loaded one, with its state: READY, LOADING,
  UNLOADING (while its requests in flight finish) or UNAVAILABLE, with a reason (not loaded,
  unloaded, or why a load failed).
- load NAME: loads (or reloads) the repository's NAME (else the start-up model of that name)
  through `load_runtime`, the path and checks of start-up, off the event loop; the model then
  serves under NAME on every API (with the engine process: once the engine has loaded it too,
  and a file the engine cannot load fails the load with the engine's reason). A reload swaps
  at once: new requests go to the new model, those in flight finish on the old one. A file
  that cannot be served is FAILED_PRECONDITION with its problem, and the index keeps it as
  the reason.
- unload NAME: the model refuses new requests at once (UNAVAILABLE, "is unloading"), the
  requests and streams in flight on it finish (sequences mid-request included), then it goes
  and its name is NOT_FOUND. The call returns once the model is gone; the index shows it
  UNLOADING until then. Sessions and sequences of an unloaded model stay in the store: a
  request on one is FAILED_PRECONDITION naming the model, until it is loaded again.

Loads and unloads of one name run one after another; once started they run to the end even if
the caller goes away. Without --model-repository, load and unload are FAILED_PRECONDITION (the
index still lists the served models).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from gru_serve.core.models import engine_config
from gru_serve.core.service import GenerationService
from gru_serve.engine.api import load_runtime
from gru_serve.ops.errors import FailedPrecondition, ModelLoadError, NotFound

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"


def repository_models(folder: Path) -> dict[str, Path]:
    """NAME -> model file of every model in a repository folder, by name."""
    out: dict[str, Path] = {}
    for d in sorted(folder.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        if (d / MODEL_FILE).is_file():
            out[d.name] = d / MODEL_FILE
            continue
        versions = [v for v in d.iterdir() if v.name.isdigit() and (v / MODEL_FILE).is_file()]
        if versions:
            out[d.name] = max(versions, key=lambda v: int(v.name)) / MODEL_FILE
    return out


@dataclass(frozen=True)
class ModelState:
    name: str
    state: str  # READY | LOADING | UNLOADING | UNAVAILABLE
    reason: str = ""


class ModelRepository:
    """The models of a GenerationService and of its settings' repository folder."""

    def __init__(self, service: GenerationService) -> None:
        self.service = service
        folder = service.settings.model_repository
        self.folder = Path(folder) if folder else None
        if self.folder is not None and not self.folder.is_dir():
            raise ModelLoadError(f"model_repository {self.folder}: not a folder")
        # The files of the models served at start, so that they can be loaded again.
        self.started = {name: rt.path for name, rt in service.runtimes.items()}
        self._why: dict[str, str] = {}  # why a model that is not loaded is not
        self._loading: set[str] = set()
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._tasks: set[asyncio.Task] = set()

    def _scan(self) -> dict[str, Path]:
        if self.folder is None:
            return {}
        try:
            return repository_models(self.folder)
        except OSError as e:
            raise FailedPrecondition(f"the model repository: {e.strerror or type(e).__name__}") from e

    def _require_folder(self) -> Path:
        if self.folder is None:
            raise FailedPrecondition(
                "no model repository is configured: start the server with --model-repository DIR "
                "to load and unload models"
            )
        return self.folder

    def _public(self, text: str, path: Path) -> str:
        """An error as clients see it: the model file relative to the repository (a start-up
        model's by its file name), never where the server keeps its files."""
        try:
            shown = str(path.relative_to(self.folder)) if self.folder else path.name
        except ValueError:
            shown = path.name
        text = text.replace(str(path.resolve()), shown).replace(str(path), shown)
        return text.replace(str(self.folder.resolve()), "<repository>") if self.folder else text

    def index(self, ready_only: bool = False) -> list[ModelState]:
        """Every model this server knows, by name; only the READY ones with ready_only."""
        names = sorted({*self.started, *self._scan(), *self.service.runtimes})
        out = []
        for name in names:
            if name in self._loading:
                entry = ModelState(name, LOADING, "loading")
            elif self.service.unloading(name):
                n = self.service.in_use(name)
                entry = ModelState(name, UNLOADING, f"unloading: waiting for {n} request(s) in flight")
            elif name in self.service.runtimes:
                entry = ModelState(name, READY)
            else:
                entry = ModelState(name, UNAVAILABLE, self._why.get(name, "not loaded"))
            if entry.state == READY or not ready_only:
                out.append(entry)
        return out

    async def _to_the_end(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run `work` as a task of its own: a caller that goes away does not stop it halfway."""
        task = asyncio.create_task(work())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.shield(task)

    async def load(self, name: str) -> None:
        """Load (or reload) a model; returns once it serves."""
        self._require_folder()
        path = self._scan().get(name) or self.started.get(name)
        if path is None:
            known = ", ".join(self._scan()) or "none"
            raise NotFound(f"model '{name}' is not in the model repository (its models: {known})")

        async def work() -> None:
            async with self._locks[name]:
                self._loading.add(name)
                try:
                    s = self.service.settings
                    remote = s.engine == "process"
                    rt = await asyncio.to_thread(load_runtime, path, engine_config(s), name, remote)
                    if self.service.engine is not None:
                        # READY means the engine serves it: wait for its answer (its failure fails
                        # the load, and the model is never registered half-loaded).
                        await self.service.engine.load(rt)
                except ModelLoadError as e:
                    why = self._public(str(e), path)
                    self._why[name] = f"load failed: {why}"
                    raise FailedPrecondition(f"model '{name}' cannot be loaded: {why}") from e
                finally:
                    self._loading.discard(name)
                self.service.add_model(rt)
                self._why.pop(name, None)
                log.info("model %s loaded from %s", name, path)

        await self._to_the_end(work)

    async def unload(self, name: str) -> None:
        """Unload a model; returns once it is gone (at once when it is not loaded)."""
        self._require_folder()
        if name not in self.service.runtimes and name not in self._loading:
            if name in self.started or name in self.service.unloaded or name in self._scan():
                return
            served = ", ".join(self.service.runtimes) or "none"
            raise NotFound(f"model '{name}' is unknown; this server serves {served}")

        async def work() -> None:
            async with self._locks[name]:
                if name not in self.service.runtimes:
                    return
                log.info("model %s unloading (%d request(s) in flight)", name, self.service.in_use(name))
                await self.service.remove_model(name)
                self._why[name] = "unloaded"
                log.info("model %s unloaded", name)

        await self._to_the_end(work)
