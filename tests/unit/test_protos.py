import filecmp
import importlib.util
from pathlib import Path

from tests.support.paths import REPO


def test_generated_stubs_are_up_to_date(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    committed = REPO / "gru_serve" / "grpc" / "generated"
    fresh = sorted(
        p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    ours = sorted(
        p.relative_to(committed) for p in committed.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    assert fresh == ours, "run `make protos`"
    for rel in fresh:
        assert filecmp.cmp(tmp_path / rel, committed / rel, shallow=False), (
            f"{rel} is stale: run `make protos`"
        )
