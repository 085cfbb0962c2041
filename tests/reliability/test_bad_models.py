"""Bad models: the server refuses to start, with one clear line."""

import subprocess
import sys

import onnx
import pytest

from gru_serve.shipped import default_model_path
from tests.support.reliability import TALLY, record


def mutated(tmp_path, name, change):
    model = onnx.load(str(default_model_path()))
    change(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def set_prop(key, value):
    def change(model):
        next(p for p in model.metadata_props if p.key == key).value = value

    return change


def lbr0(model):
    gru = next(n for n in model.graph.node if n.op_type == "GRU")
    next(a for a in gru.attribute if a.name == "linear_before_reset").i = 0


CASES = {
    "missing file": (lambda tmp: tmp / "absent.onnx", "No such file"),
    "truncated": (lambda tmp: _truncated(tmp), "not an ONNX model"),
    "wrong input name": (
        lambda tmp: mutated(tmp, "in", lambda m: setattr(m.graph.input[0], "name", "tokens")),
        "no tensor 'input_ids'",
    ),
    "wrong output name": (
        lambda tmp: mutated(tmp, "out", lambda m: setattr(m.graph.output[1], "name", "h")),
        "no tensor 'state_out'",
    ),
    "wrong metadata": (
        lambda tmp: mutated(tmp, "meta", set_prop("gru_serve.vocab_size", "30")),
        "'gru_serve.vocab_size' is 30",
    ),
    "linear_before_reset=0": (lambda tmp: mutated(tmp, "lbr", lbr0), "linear_before_reset=0"),
}


def _truncated(tmp):
    path = tmp / "truncated.onnx"
    path.write_bytes(default_model_path().read_bytes()[:100_000])
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_model_refuses_to_start_with_one_line(tmp_path, case):
    make, message = CASES[case]
    path = make(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "gru_serve.cli", "serve", "--port", "0", "--model", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in r.stderr.splitlines() if line.startswith("gru-serve: error:")]
    assert r.returncode == 2
    assert len(errors) == 1 and message in errors[0] and str(path) in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    TALLY["bad models refused"] += 1
    record(f"bad model: {case}", exit_code=2, message=errors[0].removeprefix("gru-serve: error: "))
