"""The GPU check: on a CUDA machine, the CUDA execution provider's parity with the CPU (the
exported graph, the derived decode step and the fused loop) and the in-process bench, in one
short run. Without CUDA it says so and returns 0 without running anything."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gru_serve.errors import ModelLoadError
from gru_serve.runtime import CUDA, ModelRuntime, RuntimeOptions
from gru_serve.sampling import SamplingParams, sample, uniforms
from gru_serve.shipped import default_model_path


def _chain(rt: ModelRuntime, ids: np.ndarray, prompt: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    logits, state = rt.step(ids[:, :prompt], rt.zero_state(ids.shape[0]))
    out = [(logits, state)]
    for t in range(prompt, ids.shape[1]):
        logits, state = rt.step(ids[:, t : t + 1], state)
        out.append((logits, state))
    return out


def _generate(rt: ModelRuntime, params: list[SamplingParams], n: int, fused_k: int) -> list[list[int]]:
    """n tokens per row from 'time traveller', by decode steps (fused_k 1) or fused runs."""
    ids = np.array([rt.vocab.encode("time traveller")] * len(params), np.int64)
    logits, state = rt.step(ids, rt.zero_state(len(params)))
    logits = logits[:, -1]
    t = np.array([p.temperature for p in params])
    k = np.array([p.top_k for p in params], np.int64)
    p_ = np.array([p.top_p for p in params])
    seeds = np.array([p.seed for p in params], np.uint64)
    pos = np.full(len(params), ids.shape[1], np.uint64)
    out: list[list[int]] = [[] for _ in params]
    done = 0
    while done < n:
        tok = sample(logits, t, k, p_, uniforms(seeds, pos + done))
        kk = min(fused_k, n - done)
        if kk == 1:
            lg, state = rt.step(tok[:, None].astype(np.int64), state)
            logits = lg[:, 0]
            for r in range(len(params)):
                out[r].append(int(tok[r]))
        else:
            u = np.stack([uniforms(seeds, pos + done + j) for j in range(1, kk + 1)], axis=1)
            sampled, step_logits, step_states = rt.fused(tok, state, t, k, p_, u)
            for r in range(len(params)):
                out[r] += [int(tok[r]), *sampled[: kk - 1, r].tolist()]
            logits, state = step_logits[kk - 1], step_states[kk - 1]
        done += kk
    return out


def gpu_check(model: Path | None = None, out: Path | None = None) -> int:
    model = model or default_model_path()
    available = ort.get_available_providers()
    if CUDA not in available:
        print(
            f"gpu check: SKIPPED: this onnxruntime build has no CUDA execution provider (providers: "
            f"{', '.join(available)}); install onnxruntime-gpu on a machine with an NVIDIA GPU"
        )
        return 0
    try:
        gpu = ModelRuntime(model, RuntimeOptions("cuda"))
    except ModelLoadError as e:
        print(f"gpu check: SKIPPED: {e}")
        return 0
    cpu = ModelRuntime(model, RuntimeOptions("cpu"))
    report: dict = {
        "providers": available,
        "fast_path_cuda": gpu.fast_path_note,
        "fast_path_cpu": cpu.fast_path_note,
    }
    rng = np.random.default_rng(0)
    ids = rng.integers(0, gpu.metadata.vocab_size, (7, 216), dtype=np.int64)
    worst = {"logits": 0.0, "state": 0.0}
    for (gl, gs), (cl, cs) in zip(_chain(gpu, ids), _chain(cpu, ids), strict=True):
        worst["logits"] = max(worst["logits"], float(np.abs(gl - cl).max()))
        worst["state"] = max(worst["state"], float(np.abs(gs - cs).max()))
    report["cuda_vs_cpu_max_abs_diff"] = worst
    ok = worst["logits"] <= 1e-3 and worst["state"] <= 1e-4
    params = [
        SamplingParams(),
        SamplingParams(temperature=1.0, seed=7),
        SamplingParams(temperature=0.8, top_k=5, seed=3),
    ]
    steps = _generate(gpu, params, 120, 1)
    if gpu.has_fused:
        fused = _generate(gpu, params, 120, 16)
        report["cuda_fused_equals_step_path"] = fused == steps
        ok &= fused == steps
    report["greedy_cuda_equals_cpu"] = steps[0] == _generate(cpu, params[:1], 120, 1)[0]
    from gru_serve.bench import inprocess

    cfg = inprocess.InProcessConfig(model, tokens=500, batched_tokens=8000, repeats=2, fused_k=(16, 32))
    exported = ModelRuntime(model, RuntimeOptions("cuda", fast_path=False))
    t0 = time.perf_counter()
    report["batch1"] = inprocess.batch1(cfg, exported, gpu)
    report["batched"] = inprocess.batched(cfg, exported, gpu)
    report["bench_seconds"] = time.perf_counter() - t0
    report["parity_ok"] = bool(ok)
    text = json.dumps(report, indent=1)
    if out:
        out.write_text(text + "\n")
    print(text)
    print(
        f"gpu check: parity {'OK' if ok else 'FAILED'} (CUDA vs CPU max |diff| logits {worst['logits']:.2e}, "
        f"state {worst['state']:.2e})"
    )
    return 0 if ok else 1
