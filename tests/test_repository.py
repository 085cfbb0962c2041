"""The tree itself: what every clone carries, and the layering the architecture promises."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_TRACKED_BYTES = 8 * 1024 * 1024
# The shipped models and their checkpoints are the product; anything else this large is a run
# output that slipped in (a 61 MiB onnxruntime profile once did).
LARGE_FILES_ALLOWED_UNDER = ("checkpoints/", "gru_serve/models/")


def test_no_tracked_file_over_8_mib_outside_models_and_checkpoints():
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(
        b"\0"
    )
    too_large = {
        name: size
        for name in (n.decode() for n in names if n)
        if not name.startswith(LARGE_FILES_ALLOWED_UNDER)
        and (ROOT / name).is_file()
        and (size := (ROOT / name).stat().st_size) > MAX_TRACKED_BYTES
    }
    assert not too_large, f"tracked files over 8 MiB: {too_large}"


def imported_top_level_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_the_server_package_imports_neither_torch_nor_the_exporters():
    """gru_serve is the runtime image: PyTorch and the export side stay out of it, even lazily."""
    offenders = {
        str(path.relative_to(ROOT)): found
        for path in sorted((ROOT / "gru_serve").rglob("*.py"))
        if (found := imported_top_level_packages(path) & {"torch", "exporters"})
    }
    assert not offenders, offenders
