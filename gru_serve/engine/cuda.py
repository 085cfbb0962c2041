"""onnxruntime's CUDA provider: TF32 off, the CUDA libraries preloaded, whether the provider
starts here, and onnxruntime's own log read back for its reasons."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
from collections.abc import Iterator

import onnxruntime as ort

from gru_serve.served import CPU, CUDA

log = logging.getLogger(__name__)

# onnxruntime's CUDA provider turns TF32 on by default: 10-bit mantissas in every MatMul, which
# would put the derived graphs outside the load-time check's bounds and the output off PyTorch's.
# use_tf32 reaches cuBLAS only; cuDNN (the exported graph's GRU) keeps its default math mode,
# TF32 on Ampere and later, unless NVIDIA_TF32_OVERRIDE=0 is in the environment when the
# libraries load (the engine's environment and the CUDA image set it; so does prepare_cuda).
CUDA_OPTIONS = {"use_tf32": "0"}
TF32_ENV = {"NVIDIA_TF32_OVERRIDE": "0"}

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def ort_log() -> Iterator[list[str]]:
    """onnxruntime's own log lines written during the block (its logger writes to fd 2, not
    through Python), each also logged here (info) so that nothing it said is lost; the caller
    warns once, with the reason."""
    lines: list[str] = []
    with tempfile.TemporaryFile() as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            for line in _ANSI.sub("", f.read().decode(errors="replace")).splitlines():
                if line.strip():
                    lines.append(line.strip())
                    log.info("onnxruntime: %s", line.strip())


def ort_reason(lines: list[str]) -> str:
    """onnxruntime's reason in its log lines: the text after its last 'FAIL : ' or ']'."""
    for line in reversed(lines):
        if "FAIL : " in line:
            return line.rsplit("FAIL : ", 1)[1]
    return lines[-1].rsplit("] ", 1)[-1] if lines else ""


_preloaded: list[str] = []


def prepare_cuda() -> str:
    """Before the first CUDA session: TF32 off for cuBLAS and cuDNN alike, and the CUDA 13,
    cuBLAS and cuDNN 9 libraries of the `cuda` extra (the nvidia-* wheels) loaded with
    onnxruntime.preload_dlls. Returns what preload_dlls said (it prints the libraries it could
    not load), once."""
    os.environ.update(TF32_ENV)
    if not _preloaded:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                ort.preload_dlls()
            except Exception as e:  # a missing folder or a library that will not load: said below
                print(f"{type(e).__name__}: {e}")
        _preloaded.append(" ".join(out.getvalue().split()))
    return _preloaded[0]


def cuda_status() -> tuple[bool, str]:
    """(True, '') when onnxruntime starts its CUDA provider here, else (False, onnxruntime's
    reason): a one-node session asked for CUDA, with onnxruntime's log read back."""
    if CUDA not in ort.get_available_providers():
        return False, f"this onnxruntime build ({ort.__version__}) has no CUDA provider"
    preload = prepare_cuda()
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Neg", ["x"], ["y"])],
            "probe",
            [x],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    ort.set_default_logger_severity(3)
    try:
        with ort_log() as lines:
            session = ort.InferenceSession(model.SerializeToString(), providers=[(CUDA, CUDA_OPTIONS), CPU])
    except Exception as e:
        return False, str(e).splitlines()[0]
    finally:
        ort.set_default_logger_severity(2)
    if CUDA in session.get_providers():
        return True, ""
    return False, ort_reason(lines) or preload or "onnxruntime fell back to the CPU without saying why"
