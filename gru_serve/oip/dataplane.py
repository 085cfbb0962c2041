"""The Open Inference Protocol's data plane (KServe v2, with Triton's extensions): every operation
of the protocol on its own messages, whatever the transport. gru_serve.grpc.inference and
gru_serve.http.inference_api are codecs over it, so a sequence started over one transport goes
on over the other for the same owner.

Each served model M appears twice:

- `M`: the ONNX model as Triton would serve it with implicit state. Input `input_ids` INT64
  [batch, seq], output `logits` FP32 [batch, seq, vocab]. Without sequence parameters a request
  is stateless (zero state). With `sequence_id` (uint64 or string), `sequence_start` and
  `sequence_end` it runs on that sequence's state and advances it (gru_serve.core.sequences: a
  sequence is a session in the native API's store, owned by the caller).
- `M-generate`: a decoupled generation model. Input `prompt` BYTES [1]; request parameters
  max_new_tokens and every sampling option by its SamplingParams name (temperature, top_k, ...;
  stop: a string, or a JSON list of strings), and optionally the sequence parameters to
  continue a sequence of M. A number may also come as
  a string ("0.8": Triton's C++ client has no double parameters). Streamed, each message of
  tokens ready together is one response with outputs `text` BYTES [n] (one string per token)
  and `token_ids` INT64 [n]; every response carries `triton_final_response`, and when the
  request sets `triton_enable_empty_final_response` (tritonclient's
  enable_empty_final_response=True) an empty final response (`triton_final_response: true`, with
  finish_reason, prompt_tokens, generated_tokens and tokens_seen) ends the request, as Triton
  does for decoupled models. A unary request (which Triton refuses for decoupled models) gets
  the whole generation in one response.

Statistics: per endpoint, with queue and compute phases and batch_stats as
gru_serve.oip.statistics defines them for these models.

The model repository extension (index, load, unload): gru_serve.core.repository. Loading NAME
serves both NAME and NAME-generate; the index lists models by NAME. While NAME unloads, both
refuse new requests (UNAVAILABLE) and its readiness is false; once it is gone both are NOT_FOUND.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np

from gru_serve.contract import INPUT_IDS, LOGITS
from gru_serve.core.generation import Finished, GenerateRequest, Progress, Started
from gru_serve.core.repository import ModelRepository
from gru_serve.core.sequences import RunTimes, Sequences, sequence_session_id
from gru_serve.core.service import GenerationService
from gru_serve.grpc.generated.inference import grpc_service_pb2 as pb
from gru_serve.grpc.generated.inference import model_config_pb2 as mc
from gru_serve.oip import model_config as triton_config
from gru_serve.oip.parameters import check_parameters, flag, sampling_of, sequence_of
from gru_serve.oip.statistics import Phases, Stats
from gru_serve.oip.tensors import (
    EMPTY_FINAL,
    FINAL,
    MODEL_VERSION,
    PROMPT,
    TEXT,
    TOKEN_IDS,
    Endpoint,
    read_inputs,
    requested_outputs,
    response,
)
from gru_serve.ops import errors
from gru_serve.ops.auth import Caller
from gru_serve.ops.errors import InvalidArgument, NotFound, ResponseTooLarge
from gru_serve.outputs import Tokens
from gru_serve.served import CUDA, ServedModel

SERVER_NAME = "gru-serve"
GENERATE_SUFFIX = "-generate"
EXTENSIONS = ("sequence", "model_configuration", "statistics", "parameters", "model_repository")
# Load parameters Triton's clients may send that would change what is loaded: refused.
LOAD_OVERRIDES = ("config", "file:")


def server_version() -> str:
    try:
        return importlib.metadata.version("gru-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class DataPlane:
    def __init__(self, service: GenerationService, repository: ModelRepository | None = None) -> None:
        self.service = service
        self.sequences = Sequences(service)
        self.repository = repository or ModelRepository(service)
        # The server sets this once its models are loaded and clears it when it drains.
        self.ready = False
        self._endpoints: dict[str, Endpoint] = {}
        self.stats: dict[str, Stats] = {}
        self._built_from: dict[str, ServedModel] | None = None

    @property
    def endpoints(self) -> dict[str, Endpoint]:
        """The endpoints of the models served now. The service replaces its runtimes dict when a
        model is loaded or unloaded, so comparing it by identity finds a change cheaply."""
        runtimes = self.service.runtimes
        if runtimes is not self._built_from:
            self._build(runtimes)
        return self._endpoints

    def _build(self, runtimes: dict[str, ServedModel]) -> None:
        endpoints: dict[str, Endpoint] = {}
        for rt in runtimes.values():
            endpoints.setdefault(rt.name + GENERATE_SUFFIX, Endpoint(rt.name + GENERATE_SUFFIX, rt, True))
        for rt in runtimes.values():  # a model's own name wins over a generation name
            endpoints[rt.name] = Endpoint(rt.name, rt, False)
        # Statistics are those of a model since it was loaded: kept while the endpoint is the same.
        old = self._endpoints
        self.stats = {
            name: self.stats[name] if name in old and old[name] == ep else Stats()
            for name, ep in endpoints.items()
        }
        self._endpoints, self._built_from = endpoints, runtimes

    def _known(self, name: str, version: str = "") -> Endpoint:
        """The endpoint of a served model, whether or not it takes new requests."""
        ep = self.endpoints.get(name)
        if ep is None:
            if name in self.service.unloaded:
                raise NotFound(f"model '{name}' is not loaded (it was unloaded)")
            raise NotFound(f"model '{name}' is unknown; this server serves {', '.join(self.endpoints)}")
        if version not in ("", MODEL_VERSION):
            raise NotFound(f"model '{name}' has no version '{version}'; its version is {MODEL_VERSION}")
        return ep

    def endpoint(self, name: str, version: str = "") -> Endpoint:
        """The endpoint a request names: NotFound when unknown, Unavailable while it unloads."""
        ep = self._known(name, version)
        self.service.check_available(ep.runtime)
        return ep

    @contextlib.contextmanager
    def _timed(self, ep: Endpoint) -> Iterator[Phases]:
        """Count a request in the endpoint's statistics; the caller stamps its phases."""
        stats = self.stats.get(ep.name) or Stats()  # a model unloaded meanwhile: not counted
        phases = Phases()
        try:
            yield phases
        except BaseException:
            stats.failed(phases)
            raise
        stats.succeeded(phases)

    # -- health and metadata --

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}

    def model_ready(self, name: str, version: str = "") -> bool:
        """Whether a model takes requests now (false, not an error, for an unknown one)."""
        ep = self.endpoints.get(name)
        known = ep is not None and version in ("", MODEL_VERSION)
        taking = known and not self.service.unloading(ep.runtime.name)
        return self.ready and taking

    def model_metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        ep = self.endpoint(name, version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        if ep.generate:
            inputs = [tensor(name=PROMPT, datatype="BYTES", shape=[1])]
            outputs = [
                tensor(name=TEXT, datatype="BYTES", shape=[-1]),
                tensor(name=TOKEN_IDS, datatype="INT64", shape=[-1]),
            ]
            platform = "gru_serve"
        else:
            vocab = ep.runtime.metadata.vocab_size
            inputs = [tensor(name=INPUT_IDS, datatype="INT64", shape=[-1, -1])]
            outputs = [tensor(name=LOGITS, datatype="FP32", shape=[-1, -1, vocab])]
            platform = triton_config.PLATFORM
        return pb.ModelMetadataResponse(
            name=ep.name, versions=[MODEL_VERSION], platform=platform, inputs=inputs, outputs=outputs
        )

    def model_config(self, name: str, version: str = "") -> mc.ModelConfig:
        ep = self.endpoint(name, version)
        rt, s = ep.runtime, self.service.settings
        device = "cuda" if self.service.provider(rt) == CUDA else "cpu"
        kind = mc.ModelInstanceGroup.KIND_GPU if device == "cuda" else mc.ModelInstanceGroup.KIND_CPU
        group = mc.ModelInstanceGroup(name=f"{ep.name}_{device}", kind=kind, count=1)
        if not ep.generate:
            # Triton's configuration for the model, as this server runs it. Built under a
            # placeholder name: Triton's name rules are stricter than ours.
            cfg = triton_config.model_config(
                rt.metadata,
                "model",
                max_batch_size=s.max_batch_size,
                max_sequence_idle_us=max(1, int(s.session_ttl_s * 1e6)),
            )
            cfg.name = ep.name
            del cfg.instance_group[:]
            cfg.instance_group.append(group)
            return cfg
        described = {
            "base_model": rt.name,
            "request_parameters": ", ".join(ep.parameters),
            "default_new_tokens": str(s.default_new_tokens),
            "max_new_tokens": str(s.max_new_tokens),
        }
        return mc.ModelConfig(
            name=ep.name,
            backend="gru_serve",
            max_batch_size=0,
            input=[mc.ModelInput(name=PROMPT, data_type=mc.TYPE_STRING, dims=[1])],
            output=[
                mc.ModelOutput(name=TEXT, data_type=mc.TYPE_STRING, dims=[-1]),
                mc.ModelOutput(name=TOKEN_IDS, data_type=mc.TYPE_INT64, dims=[-1]),
            ],
            model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
            instance_group=[group],
            parameters={k: mc.ModelParameter(string_value=v) for k, v in described.items()},
        )

    # -- statistics --

    def _stats_of(self, name: str, version: str) -> list[tuple[str, Stats]]:
        if name:
            return [(self._known(name, version).name, self.stats[name])]
        if version:
            raise InvalidArgument("a version needs a model name")
        return [(n, self.stats[n]) for n in self.endpoints]

    def statistics(self, name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        """One model's statistics, or every model's when name is empty (a model that is
        unloading included)."""
        stats = self._stats_of(name, version)
        return pb.ModelStatisticsResponse(model_stats=[s.pb(n, MODEL_VERSION) for n, s in stats])

    def statistics_json(self, name: str = "", version: str = "") -> dict[str, Any]:
        """`statistics` in Triton's REST shape: counts and durations as JSON numbers."""
        stats = self._stats_of(name, version)
        return {"model_stats": [s.json(n, MODEL_VERSION) for n, s in stats]}

    # -- the model repository --

    def repository_index(self, ready: bool = False) -> pb.RepositoryIndexResponse:
        """Every model the server knows (repository, --model, loaded), or only the READY ones."""
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                index(name=m.name, version=MODEL_VERSION, state=m.state, reason=m.reason)
                for m in self.repository.index(ready)
            ]
        )

    async def load_model(self, caller: Caller, name: str, parameters: list[str] | None = None) -> None:
        """Load or reload a repository model; returns once NAME and NAME-generate serve."""
        caller.require_admin(f"load of model '{name}'")
        for key in parameters or ():
            if key.startswith(LOAD_OVERRIDES):
                raise InvalidArgument(
                    f"parameter '{key}': gru-serve loads the repository's model file as it is; "
                    "a configuration or files given with the load are not supported"
                )
        await self.repository.load(name)

    async def unload_model(self, caller: Caller, name: str) -> None:
        """Unload a model (NAME and NAME-generate); returns once it is gone."""
        caller.require_admin(f"unload of model '{name}'")
        await self.repository.unload(name)

    # -- inference --

    async def infer(self, request: pb.ModelInferRequest, owner: str) -> pb.ModelInferResponse:
        """One unary request to the model it names (either endpoint kind)."""
        return await self.infer_on(self.endpoint(request.model_name, request.model_version), request, owner)

    async def infer_on(
        self, ep: Endpoint, request: pb.ModelInferRequest, owner: str
    ) -> pb.ModelInferResponse:
        if ep.generate:
            return await self._generate_unary(ep, request, owner)
        return await self._infer_logits(ep, request, owner)

    async def _infer_logits(
        self, ep: Endpoint, request: pb.ModelInferRequest, owner: str
    ) -> pb.ModelInferResponse:
        """One request to a model's raw endpoint: logits, on a sequence or stateless. It counts
        against max_streams and max_streams_per_token as a generation stream does."""
        with (
            self._timed(ep) as phases,
            self.service.using(ep.runtime),
            self.service.stream_slot(owner),
        ):
            check_parameters(request, ep)
            ids = read_inputs(request, ep)[INPUT_IDS]
            if ids.ndim != 2:
                raise InvalidArgument(
                    f"input '{INPUT_IDS}': shape must be [batch, seq], got {list(ids.shape)}"
                )
            requested_outputs(request, ep)
            seq = sequence_of(request)
            self.sequences.check_ids(ep.runtime, ids)
            self._check_response_size(ep, ids)
            phases.batch = ids.shape[0]
            phases.checked = time.perf_counter_ns()
            run = RunTimes()
            logits = await self.sequences.infer(ep.runtime.name, ids, seq, owner, run)
            phases.infer_start, phases.infer_end = run.start, run.end
            return response(request, ep, {LOGITS: logits})

    def _check_response_size(self, ep: Endpoint, ids: np.ndarray) -> None:
        """Refuse, before the model runs, logits larger than max_response_logits: their size is
        known from the ids (every id gets a row of the vocabulary)."""
        vocab, limit = ep.runtime.metadata.vocab_size, self.service.settings.max_response_logits
        if ids.size * vocab > limit:
            raise ResponseTooLarge(
                f"input '{INPUT_IDS}': {ids.size} ids x vocabulary {vocab} = {ids.size * vocab} "
                f"logits; the limit is max_response_logits={limit} (at most {limit // vocab} ids "
                "per request for this model)"
            )

    async def _generation(
        self, ep: Endpoint, request: pb.ModelInferRequest, owner: str
    ) -> AsyncIterator[Tokens | Finished]:
        """A generation request's token groups then Finished, via GenerationService.generate."""
        with self._timed(ep) as phases:
            check_parameters(request, ep)
            prompt_arr = read_inputs(request, ep)[PROMPT]
            if prompt_arr.size != 1:
                raise InvalidArgument(
                    f"input '{PROMPT}' must hold one string, got shape {list(prompt_arr.shape)}"
                )
            try:
                prompt = bytes(prompt_arr.reshape(-1)[0]).decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidArgument(f"input '{PROMPT}' is not UTF-8 text") from e
            requested_outputs(request, ep)
            max_new, params = sampling_of(request)
            seq = sequence_of(request)
            rt = ep.runtime
            phases.checked = time.perf_counter_ns()
            progress = Progress()  # started now: the engine's time to first token counts from here
            session_id = await self.sequences.session_for(rt, seq, owner) if seq else ""
            req = GenerateRequest(session_id, prompt, max_new, params, False, rt.name)
            async with contextlib.aclosing(self.service.generate(req, owner, progress)) as events:
                async for _, ev in events:
                    if isinstance(ev, Started):
                        continue
                    if isinstance(ev, Finished):
                        phases.infer_end = time.perf_counter_ns()
                        first = progress.started + ev.time_to_first_token_s
                        phases.infer_start = int(first * 1e9) if ev.time_to_first_token_s else 0
                    yield ev
            if seq and seq.end:
                await self.sequences.end(session_id)

    @staticmethod
    def _tokens(chunk: Tokens | None) -> dict[str, np.ndarray]:
        texts, ids = (chunk.texts, chunk.ids) if chunk else ([], [])
        text = np.empty(len(texts), dtype=object)
        text[:] = [t.encode() for t in texts]
        return {TEXT: text, TOKEN_IDS: np.array(ids, np.int64)}

    @staticmethod
    def _finish(f: Finished) -> dict[str, bool | int | str]:
        return {
            "finish_reason": f.reason,
            "prompt_tokens": f.prompt_tokens,
            "generated_tokens": f.generated_tokens,
            "tokens_seen": f.tokens_seen,
        }

    async def _generate_unary(
        self, ep: Endpoint, request: pb.ModelInferRequest, owner: str
    ) -> pb.ModelInferResponse:
        tokens: Tokens | None = None
        finish: dict[str, bool | int | str] = {}
        async for ev in self._generation(ep, request, owner):
            if isinstance(ev, Tokens):
                if tokens is None:
                    tokens = ev
                else:
                    tokens.extend(ev)
            else:
                finish = self._finish(ev)
        return response(request, ep, self._tokens(tokens), finish)

    async def generate_stream(
        self, ep: Endpoint, request: pb.ModelInferRequest, owner: str
    ) -> AsyncIterator[pb.ModelInferResponse]:
        """A generation request's responses as they come (Triton's decoupled streaming)."""
        empty_final = flag(request, EMPTY_FINAL)
        async for ev in self._generation(ep, request, owner):
            if isinstance(ev, Tokens):
                yield response(request, ep, self._tokens(ev), {FINAL: False})
            elif empty_final:
                yield response(request, ep, {}, {FINAL: True, **self._finish(ev)})

    def sequence_key(self, request: pb.ModelInferRequest, owner: str) -> str | None:
        """The session a request's sequence lives in, to run a sequence's requests in order."""
        ep = self.endpoints.get(request.model_name)
        try:
            seq = sequence_of(request)
        except errors.GruServeError:
            return None  # the request fails on its own turn
        if ep is None or seq is None:
            return None
        return sequence_session_id(owner, ep.runtime.name, seq.id)
