"""GPU check: on a machine with an NVIDIA GPU, that onnxruntime runs the model on CUDA, the CUDA
execution provider's parity with the CPU (exported graph, decode step, fused loop) and the
in-process bench, in one short run. Exits 1 when a session asked for CUDA runs elsewhere, the
fast path is off or parity fails; prints SKIPPED and exits 0 only where there is no NVIDIA GPU.

    python scripts/gpu_check.py [--model MODEL.onnx] [--json OUT.json] [--assume-gpu]
"""

import argparse
import sys
from pathlib import Path

from gru_serve.bench.gpu import gpu_check

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="ONNX model (default: the shipped d2l model)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.add_argument(
        "--assume-gpu",
        action="store_true",
        help="run as if an NVIDIA GPU were present (tests the check on a machine without one)",
    )
    args = p.parse_args()
    sys.exit(gpu_check(args.model, args.json, args.assume_gpu))
