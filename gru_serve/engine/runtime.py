"""The onnxruntime sessions behind a model: providers, threads, the batched step, and the fast
decode path.

Besides the exported graph (which runs prompts of any length), a runtime builds the decode
step and the fused K-token graph of gru_serve.graphs from the model's own weights,
when it recognises them as a GRU language model. Both compute the same function as the
exported graph (checked at load, within 1e-4); every decode step (`step` with seq = 1) runs
the derived graph, so the step path and the fused path give identical numbers, whatever the
batch.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from gru_serve.contract import INPUT_IDS, LOGITS, STATE, STATE_OUT, ContractError, ModelMetadata, read_model
from gru_serve.engine.config import EngineConfig
from gru_serve.engine.cuda import CUDA_OPTIONS, ort_log, ort_reason, prepare_cuda
from gru_serve.engine.device_batch import Decoder, FusedBatch
from gru_serve.engine.device_graphs import rebuild_graph, take_graph
from gru_serve.engine.placement import Placement, profiling_options, read_profile
from gru_serve.graphs.decode import decode_graph
from gru_serve.graphs.fused import FUSED_OUTPUTS, fused_graph
from gru_serve.graphs.weights import NotAGRULanguageModel, gru_weights
from gru_serve.ops.errors import ModelLoadError
from gru_serve.sampling import SamplingParams, column_feeds, columns
from gru_serve.served import CPU, CUDA
from gru_serve.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

# Weights beyond which a model gets the decode step but no fused loop (see _decode_only). The
# shipped models hold 0.1 to 2.4 MiB.
FUSED_MAX_WEIGHT_BYTES = 64 << 20

GRAPH_OPTIMIZATION = {
    "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"  # auto | cuda | cpu
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization: str = "all"  # off | basic | extended | all
    fast_path: bool = True  # derive the decode-step and fused graphs from the weights
    # Profile every session at load and refuse a compute node outside the provider in use
    # (always on under CUDA: gru_serve.engine.placement).
    check_placement: bool = False


def load_metadata(path: Path) -> tuple[ModelMetadata, bytes]:
    """Read and check a model file; any problem is one ModelLoadError line naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"model {path}: {e.strerror or e}") from e
    try:
        model = onnx.load_from_string(raw)
    except Exception as e:
        raise ModelLoadError(f"model {path}: not an ONNX model ({type(e).__name__})") from e
    try:
        return read_model(model), raw
    except ContractError as e:
        raise ModelLoadError(f"model {path}: {e}") from e


class ModelRuntime:
    """One model loaded into onnxruntime. `step` runs the contract on numpy arrays; with the
    fast path, steps of seq = 1 run the derived decode graph and `fused` runs K of them."""

    def __init__(self, path: Path, options: RuntimeOptions = RuntimeOptions(), name: str = "") -> None:
        self.path = Path(path)
        self.options = options
        self.metadata, raw = load_metadata(self.path)
        self.name = name or self.metadata.name
        self.model_hash = hashlib.sha256(raw).hexdigest()
        try:
            self.tokenizer: Tokenizer = load_tokenizer(self.metadata)
        except ContractError as e:
            raise ModelLoadError(f"model {self.path}: {e}") from e
        self.cuda_reason = ""  # onnxruntime's reason when CUDA was wanted and did not start
        self._profiles: dict[str, str] = {}  # graph -> profiling folder, until checked
        self.placement: dict[str, Placement] = {}  # graph -> where its nodes ran (when checked)
        self.session, self.provider = self._create_session(raw, options)
        self._reference: ort.InferenceSession | None = None
        self.decode_session: ort.InferenceSession | None = None
        self.fused_session: ort.InferenceSession | None = None
        self.fused_single: ort.InferenceSession | None = None  # the fused graph for batch 1
        self.take_session: ort.InferenceSession | None = None  # rows of a device tensor
        self.rebuild_session: ort.InferenceSession | None = None  # a batch's state, rows changed
        self.fused_cost = (15e-6, 2.2e-6)  # seconds per fused step: a + b x batch (measured at load)
        self.fast_path_note = "off (RuntimeOptions.fast_path=False)"
        if options.fast_path:
            self._derive(onnx.load_from_string(raw))
        if self.profiling:
            self._check_placement()
        if self.fused_session is not None:
            self.fused_cost = self._measure_fused_cost()

    @property
    def profiling(self) -> bool:
        """Whether this load profiles its sessions to check where their nodes run."""
        return self.options.check_placement or self.provider == CUDA

    def _session_options(self, options: RuntimeOptions, graph: str = "") -> ort.SessionOptions:
        if options.graph_optimization not in GRAPH_OPTIMIZATION:
            raise ModelLoadError(
                f"graph_optimization must be one of {', '.join(GRAPH_OPTIMIZATION)}, "
                f"got {options.graph_optimization!r}"
            )
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.graph_optimization_level = GRAPH_OPTIMIZATION[options.graph_optimization]
        if graph:
            self._profiles[graph] = profiling_options(so)
        return so

    def _providers(self) -> list:
        return [(CUDA, CUDA_OPTIONS), CPU] if self.provider == CUDA else [CPU]

    def _derived_session(self, model: bytes, graph: str) -> ort.InferenceSession:
        so = self._session_options(self.options, graph if self.profiling else "")
        return ort.InferenceSession(model, so, providers=self._providers())

    def _create_session(self, raw: bytes, options: RuntimeOptions) -> tuple[ort.InferenceSession, str]:
        if options.device not in ("auto", "cuda", "cpu"):
            raise ModelLoadError(f"device must be auto, cuda or cpu, got {options.device!r}")
        want_cuda = options.device != "cpu" and CUDA in ort.get_available_providers()
        # Profiled when it may run on CUDA (or when asked): where its nodes run is checked.
        so = self._session_options(options, "exported" if want_cuda or options.check_placement else "")
        providers = [(CUDA, CUDA_OPTIONS), CPU] if want_cuda else [CPU]
        preload = prepare_cuda() if want_cuda else ""
        # onnxruntime's errors (why CUDA did not start) are read back, logged and reported once.
        ort.set_default_logger_severity(3)
        try:
            with ort_log() as lines:
                session = ort.InferenceSession(raw, so, providers=providers)
        except Exception as e:
            shutil.rmtree(self._profiles.pop("exported", ""), ignore_errors=True)
            raise ModelLoadError(
                f"model {self.path}: onnxruntime cannot load it: {str(e).splitlines()[0]}"
            ) from e
        finally:
            ort.set_default_logger_severity(2)
        active = session.get_providers()
        # get_available_providers() lists CUDA whenever the GPU build is installed; only the
        # session knows whether CUDA really initialised.
        if CUDA in active:
            return session, CUDA
        if want_cuda:
            self.cuda_reason = ort_reason(lines) or preload or "no reason given"
        if not options.check_placement:
            self._drop_profile(session, "exported")
        if options.device == "cuda":
            raise ModelLoadError(
                f"--device cuda: CUDA is not active in onnxruntime {ort.__version__} (built for CUDA 13 "
                f"and cuDNN 9): {self.cuda_reason or 'no CUDA provider'}; "
                "install gru-serve[cuda] for the CUDA libraries, check the GPU, or use --device cpu"
            )
        if options.device == "auto":
            why = (
                f"onnxruntime could not initialise CUDA: {self.cuda_reason}"
                if want_cuda
                else "this onnxruntime build has no CUDA provider"
            )
            log.warning("running on CPU: %s", why)
        return session, CPU

    def _drop_profile(self, session: ort.InferenceSession, graph: str) -> None:
        folder = self._profiles.pop(graph, None)
        if folder is not None:
            read_profile(session.end_profiling(), CPU)  # only to remove the file

    @property
    def reference(self) -> ort.InferenceSession:
        """The load check's reference: the exported graph in a CPU session, whatever the device,
        so the check does not share the device's numerics (TF32, cuDNN's GRU)."""
        if self._reference is None:
            if self.provider == CPU:
                self._reference = self.session
            else:
                so = self._session_options(self.options)
                self._reference = ort.InferenceSession(self.path.read_bytes(), so, providers=[CPU])
        return self._reference

    def _derive(self, model: onnx.ModelProto) -> None:
        """Build the decode and fused sessions; keep them only if they compute what the
        exported graph computes (logits within 1e-4, states within 1e-5)."""
        try:
            weights = gru_weights(model)
        except NotAGRULanguageModel as e:
            self.fast_path_note = f"off: {e}"
            log.info("model %s: no fast decode path (%s); every step runs the exported graph", self.name, e)
            return
        weight_bytes = weights.head_w.nbytes + sum(a.nbytes for layer in weights.layers for a in layer)
        try:
            decode = self._derived_session(decode_graph(model, weights).SerializeToString(), "decode")
            if weight_bytes > FUSED_MAX_WEIGHT_BYTES:
                self._decode_only(decode, weight_bytes)
                return
            fused_bytes = fused_graph(model, weights).SerializeToString()
            fused = self._derived_session(fused_bytes, "fused")
        except Exception as e:  # e.g. a large vocabulary's tables past protobuf's 2 GB, or memory
            why = str(e).splitlines()[0] if str(e) else ""
            self.fast_path_note = f"off: the derived graphs cannot be built ({type(e).__name__}: {why})"
            log.warning(
                "model %s: fast path %s; every step runs the exported graph", self.name, self.fast_path_note
            )
            return
        problem = self._check_derived(decode, fused)
        single = None
        if not problem:
            # onnxruntime plans a Loop body's memory for the batch size a session sees first;
            # batch 1 (one stream, where latency counts most) keeps a session of its own that
            # sees nothing else: about 7% faster per token here.
            single = self._derived_session(fused_bytes, "fused_single")
            problem = self._check_derived(decode, single, batch=1)
        if problem:
            self._refuse(problem)
        self.decode_session, self.fused_session, self.fused_single = decode, fused, single
        self.take_session = self._derived_session(take_graph().SerializeToString(), "take")
        self.rebuild_session = self._derived_session(rebuild_graph().SerializeToString(), "rebuild")
        self.fast_path_note = "on: derived decode step (Gather + GRU cell) and fused K-token Loop"

    def _measure_fused_cost(self) -> tuple[float, float]:
        """Seconds per fused step as a + b x batch on the device in use: K = 8 steps at batch 1
        and 64 (the best of two runs each, after a warm-up), for the scheduler's round budget."""
        per_step = []
        for batch in (1, 64):
            fb = FusedBatch(self, self.zero_state(batch), {})  # greedy: every option at its default
            tokens, u = np.zeros(batch, np.int64), np.zeros((batch, 8))
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                fb.run(tokens, u)
                best = min(best, time.perf_counter() - t0)
            per_step.append(best / 8)
        b = max((per_step[1] - per_step[0]) / 63, 0.0)
        return max(per_step[0] - b, 1e-7), b

    def fused_batch(self, state: np.ndarray, cols: Mapping[str, np.ndarray]) -> FusedBatch:
        """A batch's fused loop, its state and sampler columns put where the model runs."""
        return FusedBatch(self, state, cols)

    def fused_step_cost(self, batch: int) -> float:
        """The measured seconds per fused step at this batch size."""
        a, b = self.fused_cost
        return a + b * batch

    def _check_placement(self) -> None:
        """Run each profiled session on inputs reaching every branch, read where its nodes ran,
        and refuse the model when a compute node ran outside the provider in use."""
        for graph in list(self._profiles):
            session = self._session_of(graph)
            if session is None:
                self._profiles.pop(graph)
                continue
            self._exercise(graph, session)
            self.placement[graph] = read_profile(session.end_profiling(), self.provider)
            self._profiles.pop(graph)
        problems = [p.problem(g) for g, p in self.placement.items() if p.problem(g)]
        if problems:
            raise ModelLoadError(
                f"model {self.path}: onnxruntime does not run it all on {self.provider}: "
                + "; ".join(problems)
            )

    def _session_of(self, graph: str) -> ort.InferenceSession | None:
        return {
            "exported": self.session,
            "decode": self.decode_session,
            "fused": self.fused_session,
            "fused_single": self.fused_single,
            "take": self.take_session,
            "rebuild": self.rebuild_session,
        }.get(graph)

    def _exercise(self, graph: str, session: ort.InferenceSession) -> None:
        """Runs that reach every node of `graph` (the fused graph's three branches)."""
        batch = 1 if graph == "fused_single" else 2
        state = self.zero_state(batch)
        if graph in ("exported", "decode"):
            session.run(
                None, {INPUT_IDS: np.zeros((batch, 1 if graph == "decode" else 3), np.int64), STATE: state}
            )
        elif graph in ("fused", "fused_single"):
            for params in (SamplingParams(), SamplingParams(1.0), SamplingParams(1.0, 3, 0.9)):
                fb = FusedBatch(self, state, columns([params] * batch), session)
                fb.run(np.zeros(batch, np.int64), np.full((batch, 2), 0.5))
                fb.rows_logits([(0, 0)])
        elif graph == "rebuild":
            fb = FusedBatch(self, state, {})
            fb.rebuild(np.array([1, 2]), self.zero_state(1))

    def _refuse(self, problem: str) -> None:
        """The derived graphs were built but do not compute what the exported graph computes:
        serving them would give other tokens, and serving without them would be slower than
        asked, so the load fails (exit 2 at start) and says how to serve it anyway."""
        what = "the fused graph is not bit-identical to the decode step" if problem == "fused" else problem
        raise ModelLoadError(
            f"model {self.path}: the fast path failed its check at load ({what}); "
            "--fast-path off serves it with the exported graph alone"
        )

    def _decode_only(self, decode: ort.InferenceSession, weight_bytes: int) -> None:
        """A large model keeps the decode step and no fused loop: the loop holds three copies
        of the weights in each of its two sessions (a 33k-word vocabulary at 650 hidden took
        14 GB and 47 s to load), for a few percent per token."""
        problem = self._check_derived(decode, None)
        if problem:
            self._refuse(problem)
        self.decode_session = decode
        self.fast_path_note = (
            f"decode step only: the fused loop is skipped for weights of {weight_bytes / 2**20:.0f} MiB "
            f"(over {FUSED_MAX_WEIGHT_BYTES >> 20} MiB)"
        )
        log.info("model %s: %s", self.name, self.fast_path_note)

    def _check_derived(
        self, decode: ort.InferenceSession, fused: ort.InferenceSession | None, batch: int = 3
    ) -> str:
        """'' when the decode graph computes the exported graph's function (logits within 1e-4,
        state within 1e-5, against the exported graph on the CPU) and the fused graph is
        bit-identical to chained decode steps."""
        reference = self.reference
        # Every token id once (up to 1024 of them) through one decode step, so a fault that
        # touches only some ids of the input table cannot hide from the random sample below.
        every = np.arange(min(self.metadata.vocab_size, 1024), dtype=np.int64)[:, None]
        zero = np.zeros((len(every), *self.state_shape), np.float32)
        want = reference.run([LOGITS], {INPUT_IDS: every, STATE: zero})[0]
        if not np.allclose(decode.run([LOGITS], {INPUT_IDS: every, STATE: zero})[0], want, atol=1e-4, rtol=0):
            return "the derived decode graph's logits differ from the model's"
        rng = np.random.default_rng(0)
        length = 5
        ids = rng.integers(0, self.metadata.vocab_size, (batch, length), dtype=np.int64)
        state = (rng.standard_normal((batch, *self.state_shape)) * 0.5).astype(np.float32)
        want_logits, want_state = reference.run([LOGITS, STATE_OUT], {INPUT_IDS: ids, STATE: state})
        got_state, steps = state, []
        for t in range(length):
            got_logits, got_state = decode.run(
                [LOGITS, STATE_OUT], {INPUT_IDS: ids[:, t : t + 1], STATE: got_state}
            )
            steps.append((got_logits[:, 0], got_state))
            if not np.allclose(got_logits[:, 0], want_logits[:, t], atol=1e-4, rtol=0):
                return "the derived decode graph's logits differ from the model's"
        if not np.allclose(got_state, want_state, atol=1e-5, rtol=0):
            return "the derived decode graph's state differs from the model's"
        if fused is None:
            return ""
        # The fused graph, greedy, from the decode path's own tokens: bit-identical or unused.
        sampled, logits, states = fused.run(
            list(FUSED_OUTPUTS),
            {
                "tokens": ids[:, 0],
                STATE: state,
                **column_feeds({}, batch),  # greedy: every option at its default
                "uniforms": np.zeros((batch, 4)),
            },
        )
        s, ok = state, True
        tok = ids[:, 0]
        for k in range(4):
            lg, s = decode.run([LOGITS, STATE_OUT], {INPUT_IDS: tok[:, None], STATE: s})
            ok &= np.array_equal(lg[:, 0], logits[k]) and np.array_equal(s, states[k])
            tok = lg[:, 0].argmax(axis=1)
            ok &= np.array_equal(tok, sampled[k])
        return "" if ok else "fused"

    @property
    def state_shape(self) -> tuple[int, int]:
        return self.metadata.num_layers, self.metadata.hidden_size

    def zero_state(self, batch: int = 1) -> np.ndarray:
        return np.zeros((batch, *self.state_shape), dtype=np.float32)

    def _session_for(self, ids: np.ndarray) -> ort.InferenceSession:
        return self.decode_session if ids.shape[1] == 1 and self.decode_session is not None else self.session

    def step(self, ids: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, state_out = self._session_for(ids).run([LOGITS, STATE_OUT], {INPUT_IDS: ids, STATE: state})
        return logits, state_out

    @property
    def device(self) -> str:
        return "cuda" if self.provider == CUDA else "cpu"

    def decoder(self, state: np.ndarray) -> Decoder:
        """A decode loop for this batch with IOBinding and preallocated buffers."""
        return Decoder(self, state)

    @property
    def has_fused(self) -> bool:
        return self.fused_session is not None

    def fused(
        self,
        tokens: np.ndarray,
        state: np.ndarray,
        cols: Mapping[str, np.ndarray],
        uniforms: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Feed tokens [B], then K = uniforms.shape[1] times: sample the next token with
        uniforms[:, k] (as gru_serve.sampling.sample does) and feed it. Returns time-major
        sampled [K, B], step_logits [K, B, V] and step_states [K, B, L, H]: entry k is what
        follows the k-th fed token (the given one is k = 0)."""
        if self.fused_session is None:
            raise RuntimeError(f"model {self.name}: no fused graph ({self.fast_path_note})")
        session = self.fused_single if len(tokens) == 1 else self.fused_session
        sampled, logits, states = session.run(
            list(FUSED_OUTPUTS),
            {
                "tokens": tokens.astype(np.int64, copy=False),
                STATE: state,
                **column_feeds(cols, len(tokens)),
                "uniforms": uniforms.astype(np.float64, copy=False),
            },
        )
        return sampled, logits, states


def load_runtime(path: Path, config: EngineConfig, name: str = "", front_end: bool = False) -> ModelRuntime:
    """A model file as the server serves it: checked against the contract, in onnxruntime with
    the config's device and threads, warmed up (the first run allocates). Any problem is one
    ModelLoadError naming the file. front_end: the copy of a front end whose engine is another
    process: its metadata and tokenizer, with the exported graph opened on the CPU (never run:
    the engine runs everything)."""
    if front_end:
        return ModelRuntime(path, RuntimeOptions("cpu", 1, 1, fast_path=False), name)
    options = RuntimeOptions(
        config.device,
        config.intra_op_threads,
        config.inter_op_threads,
        fast_path=config.fast_path == "on",
    )
    rt = ModelRuntime(path, options, name)
    rt.step(np.zeros((1, 1), np.int64), rt.zero_state())
    return rt
