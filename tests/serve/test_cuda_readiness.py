"""Ready for CUDA without a GPU: TF32 off in the engine's environment and the CUDA image, the
load check's reference on the CPU, and onnxruntime's own reason when CUDA cannot start."""

import ctypes
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import pytest

from gru_serve.engine.runtime import ModelRuntime, RuntimeOptions
from gru_serve.ops.errors import ModelLoadError
from tests.support.serving import D2L

ROOT = Path(__file__).resolve().parents[2]
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def _dlopen_reason() -> str | None:
    """Why the dynamic loader refuses onnxruntime's CUDA provider library here (None: it loads)."""
    lib = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not lib.exists():
        return None
    try:
        ctypes.CDLL(str(lib))
    except OSError as e:
        found = re.search(r"(lib[\w.+-]+\.so[\w.]*: cannot open shared object file)", str(e))
        return found.group(1) if found else str(e)
    return None


REASON = _dlopen_reason()
needs_broken_cuda = pytest.mark.skipif(REASON is None, reason="onnxruntime's CUDA provider loads here")


def test_the_engine_process_runs_with_tf32_off(server):
    """The real server's engine process (engine=process, the default) has NVIDIA_TF32_OVERRIDE=0
    in its environment, whatever the device, so cuDNN's GRU never rounds to TF32."""
    engines = [
        p
        for p in psutil.Process().children(recursive=True)
        if "gru_serve.engine.process" in " ".join(p.cmdline())
    ]
    assert engines, "the server has an engine process"
    environ = Path(f"/proc/{engines[0].pid}/environ").read_bytes().split(b"\0")
    assert b"NVIDIA_TF32_OVERRIDE=0" in environ


def test_the_cuda_image_sets_tf32_off():
    text = (ROOT / "docker" / "Dockerfile.cuda").read_text().replace("\\\n", " ")
    final_stage = text.rsplit("\nFROM ", 1)[1]
    envs = [line for line in final_stage.splitlines() if line.startswith("ENV ")]
    assert any(re.search(r"(^|\s)NVIDIA_TF32_OVERRIDE=0(\s|$)", line) for line in envs)


def test_a_cuda_session_is_prepared_with_tf32_off():
    """Before its first CUDA session the runtime puts TF32 off in its own environment (for the
    libraries it loads), in a fresh interpreter."""
    code = (
        "import os; from gru_serve.engine.runtime import ModelRuntime, RuntimeOptions;"
        f"ModelRuntime({str(D2L)!r}, RuntimeOptions('auto'));"
        "print(os.environ.get('NVIDIA_TF32_OVERRIDE'))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    want = "0" if CUDA in ort.get_available_providers() else "None"
    assert r.stdout.strip().splitlines()[-1] == want, r.stderr


def test_the_load_checks_reference_is_a_cpu_session_of_the_exported_graph():
    rt = ModelRuntime(D2L, RuntimeOptions("cpu"))
    # As it would be under CUDA: the reference is a session of its own, on the CPU.
    rt.provider, rt._reference = CUDA, None
    ref = rt.reference
    assert ref is not rt.session and ref.get_providers() == [CPU]
    bare = ort.InferenceSession(str(D2L), providers=[CPU])
    ids = np.random.default_rng(0).integers(0, rt.metadata.vocab_size, (3, 7), dtype=np.int64)
    feed = {"input_ids": ids, "state": rt.zero_state(3)}
    for a, b in zip(ref.run(None, feed), bare.run(None, feed), strict=True):
        assert np.array_equal(a, b)


@needs_broken_cuda
def test_device_cuda_says_onnxruntimes_reason():
    with pytest.raises(ModelLoadError) as e:
        ModelRuntime(D2L, RuntimeOptions("cuda"))
    assert REASON in str(e.value) and "CUDA 12/13" not in str(e.value)


@needs_broken_cuda
def test_gru_serve_info_prints_onnxruntimes_reason(server):
    r = subprocess.run(
        [sys.executable, "-m", "gru_serve.cli", "info", "--target", server.target],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("cuda here"))
    assert "cannot start" in line and REASON in line
