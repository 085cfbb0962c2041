"""The onnxruntime session behind a model: providers, threads, and the batched step."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from gru_serve.contract import INPUT_IDS, LOGITS, STATE, STATE_OUT, ContractError, ModelMetadata, read_model
from gru_serve.errors import ModelLoadError
from gru_serve.vocab import Vocabulary

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"  # auto | cuda | cpu
    intra_op_threads: int = 1
    inter_op_threads: int = 1


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
    """One model loaded into onnxruntime. `step` runs the contract on numpy arrays."""

    def __init__(self, path: Path, options: RuntimeOptions = RuntimeOptions(), name: str = "") -> None:
        self.path = Path(path)
        self.metadata, raw = load_metadata(self.path)
        self.name = name or self.metadata.name
        self.model_hash = hashlib.sha256(raw).hexdigest()
        self.vocab = Vocabulary(self.metadata.vocab, self.metadata.normalization)
        self.session, self.provider = self._create_session(raw, options)

    def _create_session(self, raw: bytes, options: RuntimeOptions) -> tuple[ort.InferenceSession, str]:
        if options.device not in ("auto", "cuda", "cpu"):
            raise ModelLoadError(f"device must be auto, cuda or cpu, got {options.device!r}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        # onnxruntime logs two errors when CUDA libraries are missing; we say it once, below.
        ort.set_default_logger_severity(4)
        want_cuda = options.device != "cpu" and CUDA in ort.get_available_providers()
        providers = [CUDA, CPU] if want_cuda else [CPU]
        try:
            session = ort.InferenceSession(raw, so, providers=providers)
        except Exception as e:
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
        if options.device == "cuda":
            raise ModelLoadError(
                "--device cuda: CUDA is not active in onnxruntime (installed providers: "
                f"{', '.join(ort.get_available_providers())}; session got {', '.join(active)}); "
                "check the GPU, the CUDA 12/13 and cuDNN 9 libraries, or use --device cpu"
            )
        if options.device == "auto":
            why = (
                "onnxruntime could not initialise CUDA (no GPU or CUDA/cuDNN libraries)"
                if want_cuda
                else "this onnxruntime build has no CUDA provider"
            )
            log.warning("running on CPU: %s", why)
        return session, CPU

    @property
    def state_shape(self) -> tuple[int, int]:
        return self.metadata.num_layers, self.metadata.hidden_size

    def zero_state(self, batch: int = 1) -> np.ndarray:
        return np.zeros((batch, *self.state_shape), dtype=np.float32)

    def step(self, ids: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, state_out = self.session.run([LOGITS, STATE_OUT], {INPUT_IDS: ids, STATE: state})
        return logits, state_out

    @property
    def device(self) -> str:
        return "cuda" if self.provider == CUDA else "cpu"

    def to_device(self, state: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(state), self.device, 0)

    def bound_step(self, ids: np.ndarray, state: ort.OrtValue) -> tuple[np.ndarray, ort.OrtValue]:
        """The step with IOBinding: the state stays where the model runs (on the GPU under
        CUDA); only ids go in and logits come out through host memory."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_IDS, ids)
        binding.bind_ortvalue_input(STATE, state)
        binding.bind_output(LOGITS, "cpu")
        binding.bind_output(STATE_OUT, self.device, 0)
        self.session.run_with_iobinding(binding)
        logits, state_out = binding.get_outputs()
        return logits.numpy(), state_out
