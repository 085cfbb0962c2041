"""The GPU check: on a machine with an NVIDIA GPU, that onnxruntime really runs the model on
CUDA, the CUDA execution provider's parity with the CPU (the exported graph, the derived decode
step and the fused loop) and the in-process bench, in one short run. It fails (returns 1) when
a session asked for CUDA runs on another provider, when the fast path is off on CUDA, or when
parity fails; only on a machine without an NVIDIA GPU does it print SKIPPED and return 0."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gru_serve.contract import INPUT_IDS, LOGITS, STATE, STATE_OUT
from gru_serve.engine.cuda import CUDA_OPTIONS, cuda_status, prepare_cuda
from gru_serve.engine.placement import Placement, profiling_options, read_profile
from gru_serve.engine.runtime import ModelRuntime, RuntimeOptions
from gru_serve.ops.errors import ModelLoadError
from gru_serve.reference import chained_run, fused_generate, step_generate
from gru_serve.sampling import SamplingParams
from gru_serve.served import CPU, CUDA
from gru_serve.shipped import default_model_path

ATOL = {"logits": 1e-3, "state": 1e-4}


class CheckFailed(Exception):
    pass


def nvidia_gpu_present() -> bool:
    """Asked of the driver, never of onnxruntime: a CPU-only onnxruntime, or CUDA libraries it
    cannot load, must fail the check on a GPU machine, not skip it."""
    if Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia").exists():
        return True
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def exported_on_cuda(raw: bytes, batch: int = 7) -> tuple[ort.InferenceSession, Placement]:
    """The exported graph in a session asked for CUDA, profiled over one run: where its nodes
    ran (get_providers() lists the providers registered, not where nodes run)."""
    prepare_cuda()
    so = ort.SessionOptions()
    profiling_options(so)
    session = ort.InferenceSession(raw, so, providers=[(CUDA, CUDA_OPTIONS), CPU])
    meta = session.get_inputs()
    layers, hidden = meta[1].shape[1], meta[1].shape[2]
    session.run(
        None,
        {INPUT_IDS: np.zeros((batch, 3), np.int64), STATE: np.zeros((batch, layers, hidden), np.float32)},
    )
    return session, read_profile(session.end_profiling(), CUDA)


def _on_cuda(what: str, placement: Placement) -> None:
    # onnxruntime falls back to the CPU provider, with no error, when CUDA does not initialise,
    # and may place single nodes on the CPU: the profile says where each node ran.
    problem = placement.problem(what)
    if problem:
        elsewhere = ", ".join(sorted(p for p in placement.counts if p != CUDA)) or "no provider"
        ok, reason = cuda_status()
        raise CheckFailed(
            f"CUDA was asked for, but {what} runs on {elsewhere} ({problem}; onnxruntime providers: "
            f"{', '.join(ort.get_available_providers())}"
            + ("" if ok else f"; onnxruntime says: {reason}")
            + ")"
        )


def _max_diff(a: list, b: list) -> dict[str, float]:
    worst = {"logits": 0.0, "state": 0.0}
    for (al, as_), (bl, bs) in zip(a, b, strict=True):
        worst["logits"] = max(worst["logits"], float(np.abs(al - bl).max()))
        worst["state"] = max(worst["state"], float(np.abs(as_ - bs).max()))
    return worst


def _parity(model: Path, report: dict) -> tuple[bool, ModelRuntime]:
    raw = model.read_bytes()
    cuda, placement = exported_on_cuda(raw)
    _on_cuda("the check's session of the exported graph", placement)
    try:
        # The runtime profiles its sessions at load under CUDA and refuses misplaced nodes.
        gpu = ModelRuntime(model, RuntimeOptions("cuda"))
    except ModelLoadError as e:
        raise CheckFailed(str(e)) from e
    if not gpu.has_fused:
        raise CheckFailed(f"the fast path is off on CUDA: {gpu.fast_path_note}")
    for graph, where in gpu.placement.items():
        _on_cuda(f"the server runtime's {graph} graph", where)
    cpu = ModelRuntime(model, RuntimeOptions("cpu"))
    report.update(
        providers=ort.get_available_providers(),
        fast_path_cuda=gpu.fast_path_note,
        placement={g: {"nodes": p.counts, "memcpy": p.memcpy} for g, p in gpu.placement.items()},
        fused_cost_cuda=gpu.fused_cost,
    )

    def plain(session: ort.InferenceSession):
        return lambda ids, state: tuple(session.run([LOGITS, STATE_OUT], {INPUT_IDS: ids, STATE: state}))

    ids = np.random.default_rng(0).integers(0, gpu.metadata.vocab_size, (7, 216), dtype=np.int64)
    zero = gpu.zero_state(7)
    report["exported_cuda_vs_cpu_max_abs_diff"] = _max_diff(
        chained_run(plain(cuda), ids, zero, 16), chained_run(plain(cpu.session), ids, zero, 16)
    )
    # The server's own sessions (decode step and all), with the server's CUDA options.
    report["server_cuda_vs_cpu_max_abs_diff"] = _max_diff(
        chained_run(gpu.step, ids, zero, 16), chained_run(cpu.step, ids, zero, 16)
    )
    ok = all(
        report[key][name] <= atol
        for key in ("exported_cuda_vs_cpu_max_abs_diff", "server_cuda_vs_cpu_max_abs_diff")
        for name, atol in ATOL.items()
    )
    params = [
        SamplingParams(),
        SamplingParams(temperature=1.0, seed=7),
        SamplingParams(temperature=0.8, top_k=5, seed=3),
    ]
    prompt = gpu.tokenizer.encode("time traveller")
    steps = [step_generate(gpu.step, prompt, gpu.zero_state(), p, 120)[0] for p in params]
    fused = fused_generate(gpu, [prompt] * len(params), params, 120, 16)[0]
    report["cuda_fused_equals_step_path"] = fused == steps
    greedy_cpu = step_generate(cpu.step, prompt, cpu.zero_state(), params[0], 120)[0]
    report["greedy_cuda_equals_cpu"] = steps[0] == greedy_cpu
    return ok and fused == steps, gpu


def gpu_check(model: Path | None = None, out: Path | None = None, assume_gpu: bool = False) -> int:
    """`assume_gpu` runs the check as if an NVIDIA GPU were present (to test the check where
    none is)."""
    model = model or default_model_path()
    if not (assume_gpu or nvidia_gpu_present()):
        print(
            "gpu check: SKIPPED: no NVIDIA GPU on this machine (no /dev/nvidia0 or "
            "/proc/driver/nvidia, and nvidia-smi -L fails or is absent)"
        )
        return 0
    report: dict = {}
    try:
        ok, gpu = _parity(model, report)
    except CheckFailed as e:
        print(f"gpu check: FAILED: {e}")
        return 1
    from gru_serve.bench import inprocess

    cfg = inprocess.InProcessConfig(model, tokens=500, batched_tokens=8000, repeats=2, fused_k=(16, 32))
    exported = ModelRuntime(model, RuntimeOptions("cuda", fast_path=False))
    t0 = time.perf_counter()
    report["batch1"] = inprocess.batch1(cfg, exported, gpu)
    report["batched"] = inprocess.batched(cfg, exported, gpu)
    report["bench_seconds"] = time.perf_counter() - t0
    report["parity_ok"] = ok
    text = json.dumps(report, indent=1)
    if out:
        out.write_text(text + "\n")
    print(text)
    diffs = ", ".join(
        f"{key.split('_')[0]} logits {report[key]['logits']:.2e} state {report[key]['state']:.2e}"
        for key in ("exported_cuda_vs_cpu_max_abs_diff", "server_cuda_vs_cpu_max_abs_diff")
    )
    print(
        f"gpu check: parity {'OK' if ok else 'FAILED'} (CUDA vs CPU max |diff|: {diffs}; "
        f"fused = step path: {report['cuda_fused_equals_step_path']})"
    )
    return 0 if ok else 1
