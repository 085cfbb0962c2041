"""Generate the Python gRPC stubs from protos/ into gru_serve/grpc/generated/.

Run after changing a .proto (make protos); tests/unit/test_protos.py fails when the
committed stubs are stale.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
OUT = ROOT / "gru_serve" / "grpc" / "generated"
PACKAGE = "gru_serve.grpc.generated"


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = str(resources.files("grpc_tools") / "_proto")
    code = protoc.main(
        [
            "protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *files,
        ]
    )
    if code:
        sys.exit(f"protoc failed ({code})")
    tops = {f.split("/")[0] for f in files}
    # protoc writes absolute imports of the proto packages; make them imports of ours.
    pattern = re.compile(rf"^(from|import) ({'|'.join(map(re.escape, tops))})(\.| )", re.M)
    for py in out.rglob("*.py*"):
        py.write_text(pattern.sub(rf"\1 {PACKAGE}.\2\3", py.read_text()))
    for d in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (d / "__init__.py").touch()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(tmp, OUT)
    print(f"generated {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
