#!/usr/bin/env bash
# One prepared run for the first lent GPU (about 5 minutes); everything goes to $OUT.
#   OUT=/some/dir scripts/gpu_session.sh
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
export NVIDIA_TF32_OVERRIDE=0
LIMIT=120
step() { echo "== $1" | tee -a "$OUT/summary.txt"; shift; timeout "$LIMIT" "$@" >>"$OUT/summary.txt" 2>&1; echo "rc=$?" >>"$OUT/summary.txt"; }
step "nvidia-smi" nvidia-smi
step "cuda provider" "$PY" -c "from gru_serve.engine.cuda import cuda_status; print(cuda_status())"
for tf32 in 0 1; do
  step "exported graph CPU vs CUDA (NVIDIA_TF32_OVERRIDE=$([ $tf32 = 0 ] && echo 0 || echo unset))" env $([ $tf32 = 1 ] && echo -u NVIDIA_TF32_OVERRIDE) "$PY" - <<'PY'
import json, numpy as np, onnxruntime as ort
from gru_serve.shipped import default_model_path
from gru_serve.engine.cuda import CUDA_OPTIONS
from gru_serve.served import CPU, CUDA
import os; tf32 = os.environ.get("NVIDIA_TF32_OVERRIDE")
ort.preload_dlls()  # not prepare_cuda: it would turn TF32 off for the "unset" run
p = str(default_model_path()); cpu = ort.InferenceSession(p, providers=[CPU]); gpu = ort.InferenceSession(p, providers=[(CUDA, CUDA_OPTIONS), CPU])
L, H = cpu.get_inputs()[1].shape[1:]
m = json.loads(cpu.get_modelmeta().custom_metadata_map["gru_serve.vocab"]); every = np.arange(len(m))[:, None]
z = np.zeros((len(every), L, H), np.float32)
d = float(np.abs(cpu.run(None, {"input_ids": every, "state": z})[0] - gpu.run(None, {"input_ids": every, "state": z})[0]).max())
ids = np.random.default_rng(0).integers(0, len(m), (4, 216)); s1 = s2 = np.zeros((4, L, H), np.float32); worst = 0.0
for t in range(216):
    a, s1 = cpu.run(None, {"input_ids": ids[:, t:t+1], "state": s1}); b, s2 = gpu.run(None, {"input_ids": ids[:, t:t+1], "state": s2})
    worst = max(worst, float(np.abs(a - b).max()))
print(json.dumps({"tf32_override": tf32, "every_token_max_abs": d, "chained_216_max_abs": worst, "state_max_abs": float(np.abs(s1 - s2).max())}))
PY
done
step "gpu_check.py" "$PY" scripts/gpu_check.py --json "$OUT/gpu_check.json"
step "placement and fused K=64, CUDA beside CPU" "$PY" - "$OUT" <<'PY'
import json, sys, time, numpy as np
from gru_serve.engine.device_batch import FusedBatch
from gru_serve.engine.runtime import ModelRuntime, RuntimeOptions
from gru_serve.sampling import uniforms
from gru_serve.shipped import default_model_path
out = {}
gpu = ModelRuntime(default_model_path(), RuntimeOptions("cuda")); cpu = ModelRuntime(default_model_path(), RuntimeOptions("cpu", check_placement=True))
out["placement_cuda"] = {g: {"nodes": p.counts, "memcpy": p.memcpy} for g, p in gpu.placement.items()}
out["placement_cpu"] = {g: {"nodes": p.counts, "memcpy": p.memcpy} for g, p in cpu.placement.items()}
out["fused_cost"] = {"cuda": gpu.fused_cost, "cpu": cpu.fused_cost}
for b in (1, 64, 256):
    for name, t in (("greedy", 0.0), ("sampled", 1.0)):
        row = {}
        for dev, rt in (("cuda", gpu), ("cpu", cpu)):
            fb = FusedBatch(rt, rt.zero_state(b), np.full(b, t), np.zeros(b, np.int64), np.ones(b))
            seeds = np.arange(b, dtype=np.uint64); tok = np.zeros(b, np.int64); toks = []
            t0 = time.perf_counter()
            for r in range(4):
                u = np.stack([uniforms(seeds, np.full(b, 64 * r + j, np.uint64)) for j in range(64)], axis=1)
                s = fb.run(tok, u); tok = s[-1]; toks.append(s)
            row[dev] = {"tok_s": 4 * 64 * b / (time.perf_counter() - t0)}; row[dev + "_tokens"] = np.concatenate(toks)
        row["same_tokens"] = bool(np.array_equal(row.pop("cuda_tokens"), row.pop("cpu_tokens")))
        out[f"fused_k64_b{b}_{name}"] = row
text = json.dumps(out, indent=1); print(text); open(sys.argv[1] + "/fused.json", "w").write(text)
PY
LIMIT=150 step "served bench 1/64/256 streams" "$PY" -m gru_serve.cli bench --quick --concurrency 1,64,256 \
  --no-tuning --no-scaleout --no-prefix --no-http --no-interference -o "$OUT/bench"
echo "see $OUT/summary.txt" 
