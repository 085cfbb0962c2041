"""Where onnxruntime runs each node, read from its profile: every compute node of every session
on the provider in use, and a check that fails when one runs elsewhere or a session asked for
CUDA silently runs on the CPU."""

import json
from pathlib import Path

import onnxruntime as ort
import pytest

from gru_serve.bench import gpu
from gru_serve.engine import runtime as runtime_module
from gru_serve.engine.placement import profiling_options, read_profile
from gru_serve.engine.runtime import ModelRuntime, RuntimeOptions
from gru_serve.ops.errors import ModelLoadError
from gru_serve.shipped import shipped_models
from tests.support.serving import D2L

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
GRAPHS = {"exported", "decode", "fused", "fused_single", "take", "rebuild"}


@pytest.mark.parametrize("model", ["timemachine-d2l", "timemachine-full"])
def test_every_compute_node_of_every_session_runs_on_the_cpu_provider(model):
    rt = ModelRuntime(shipped_models()[model], RuntimeOptions("cpu", check_placement=True))
    assert set(rt.placement) == GRAPHS
    for graph, where in rt.placement.items():
        assert where.ok and where.misplaced == [], graph
        assert set(where.counts) == {CPU} and where.counts[CPU] > 0, graph
        assert where.memcpy == 0, graph
    # The fused graph's three branches (greedy, temperature, top-k/top-p) were all run: its
    # sampler's sort and scatter ran.
    assert rt.placement["fused"].counts[CPU] > 3 * rt.placement["decode"].counts[CPU]


def _profiled_session(providers: list) -> ort.InferenceSession:
    so = ort.SessionOptions()
    profiling_options(so)
    return ort.InferenceSession(str(D2L), so, providers=providers)


def _run(session: ort.InferenceSession) -> None:
    import numpy as np

    session.run(None, {"input_ids": np.zeros((2, 3), np.int64), "state": np.zeros((2, 1, 256), np.float32)})


def test_a_node_placed_elsewhere_fails_the_check(tmp_path):
    """A real CPU profile with one compute node's provider rewritten, as onnxruntime writes a
    node it put on another device."""
    session = _profiled_session([CPU])
    _run(session)
    path = session.end_profiling()
    events = json.loads(Path(path).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["args"].get("op_name") == "GRU"]
    assert nodes, "the exported graph runs a GRU node"
    nodes[0]["args"]["provider"] = "ElsewhereExecutionProvider"
    edited = tmp_path / "profile" / "p.json"
    edited.parent.mkdir()
    edited.write_text(json.dumps(events))
    where = read_profile(edited, CPU)
    assert not where.ok
    assert [(op, prov) for _, op, prov in where.misplaced] == [("GRU", "ElsewhereExecutionProvider")]
    assert "GRU" in where.problem("exported") and "not on CPUExecutionProvider" in where.problem("exported")


def test_the_runtime_refuses_a_model_with_a_node_elsewhere(monkeypatch):
    real = runtime_module.read_profile

    def moved(path, expected):
        events = json.loads(Path(path).read_text())
        for e in events:
            if e.get("cat") == "Node" and e["args"].get("op_name") == "Gemm":
                e["args"]["provider"] = "ElsewhereExecutionProvider"
                break
        Path(path).write_text(json.dumps(events))
        return real(path, expected)

    monkeypatch.setattr(runtime_module, "read_profile", moved)
    with pytest.raises(
        ModelLoadError, match=r"not on CPUExecutionProvider: .*\(Gemm\) on ElsewhereExecutionProvider"
    ):
        ModelRuntime(D2L, RuntimeOptions("cpu", check_placement=True))


@pytest.mark.skipif(CUDA not in ort.get_available_providers(), reason="needs the GPU build of onnxruntime")
def test_a_session_asked_for_cuda_that_falls_back_fails_the_check():
    """Here CUDA cannot start (no GPU, or no CUDA libraries): the session is created without an
    error and get_providers() may even list CUDA first on a GPU machine; the profile says the
    nodes ran on the CPU."""
    _, where = gpu.exported_on_cuda(D2L.read_bytes())
    if where.counts.get(CUDA):
        pytest.skip("CUDA starts on this machine")
    assert not where.ok
    ops = {op for _, op, _ in where.misplaced}
    assert "GRU" in ops
    # Shape reading and integer shape arithmetic are allowed wherever they run.
    assert "Shape" not in ops
    assert set(where.counts) == {CPU}
