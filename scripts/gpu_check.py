"""GPU check: on a CUDA machine, the CUDA execution provider's parity with the CPU (exported
graph, decode step, fused loop) and the in-process bench, in one short run. Without CUDA it
prints why and exits 0.

    python scripts/gpu_check.py [--model MODEL.onnx] [--json OUT.json]
"""

import argparse
import sys
from pathlib import Path

from gru_serve.bench.gpu import gpu_check

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="ONNX model (default: the shipped d2l model)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args()
    sys.exit(gpu_check(args.model, args.json))
