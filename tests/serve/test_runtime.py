import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gru_serve.client import Client, sampling
from gru_serve.engine.runtime import ModelRuntime, RuntimeOptions
from gru_serve.ops.errors import ModelLoadError
from gru_serve.served import CUDA
from tests.support.serving import D2L, start_server


def cuda_active() -> bool:
    return ModelRuntime(D2L, RuntimeOptions("auto")).provider == CUDA


@pytest.mark.skipif(cuda_active(), reason="this machine has CUDA")
def test_cuda_refuses_to_start_without_cuda():
    with pytest.raises(ModelLoadError, match="--device cuda: CUDA is not active"):
        ModelRuntime(D2L, RuntimeOptions("cuda"))


@pytest.mark.skipif(cuda_active(), reason="this machine has CUDA")
def test_auto_falls_back_to_cpu_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="gru_serve.engine.runtime"):
        rt = ModelRuntime(D2L, RuntimeOptions("auto"))
    assert rt.provider == "CPUExecutionProvider" and rt.session.get_providers() == ["CPUExecutionProvider"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "running on CPU" in warnings[0].getMessage()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert "could not initialise CUDA" in warnings[0].getMessage()


def test_iobinding_decoder_equals_plain_step(runtime):
    state = np.random.default_rng(0).normal(size=(2, 1, 256)).astype(np.float32)
    dec = runtime.decoder(state)
    for tokens in ([1, 2], [3, 4], [5, 6]):  # three steps: each of the two state buffers in turn
        logits, state = runtime.step(np.array(tokens, np.int64)[:, None], state)
        assert np.array_equal(dec.step(np.array(tokens)), logits[:, 0])
        assert np.array_equal(dec.state(), state)


def test_server_with_iobinding_gives_the_same_tokens(client):
    srv = start_server(io_binding="on", engine="thread")  # reads the scheduler
    try:
        assert srv.service.schedulers["timemachine-d2l"].io_binding
        with Client(srv.target) as c:
            for params in (None, sampling(temperature=1.0, seed=5)):
                s1, s2 = c.create_session("the time"), client.create_session("the time")
                for n in (7, 30):  # a second call on the same session continues on-device state
                    assert (
                        c.generate_text("", session_id=s1.session_id, max_new_tokens=n, params=params)[0]
                        == client.generate_text(
                            "", session_id=s2.session_id, max_new_tokens=n, params=params
                        )[0]
                    )
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.graph.input[0].__setattr__("name", "ids"), "no tensor 'input_ids'"),
        (
            lambda m: next(p for p in m.metadata_props if p.key == "gru_serve.hidden_size").__setattr__(
                "value", "128"
            ),
            "'state' axis 2 is 256, metadata says 128",
        ),
        (
            lambda m: m.metadata_props.remove(
                next(p for p in m.metadata_props if p.key == "gru_serve.vocab")
            ),
            "missing 'gru_serve.vocab'",
        ),
    ],
)
def test_bad_models_are_refused_with_one_line(tmp_path, mutate, message):
    model = onnx.load(str(D2L))
    mutate(model)
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelLoadError, match=message) as err:
        ModelRuntime(path)
    assert "\n" not in str(err.value)


def test_missing_and_truncated_models_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="No such file"):
        ModelRuntime(tmp_path / "none.onnx")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(D2L.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match=r"not an ONNX model|cannot load"):
        ModelRuntime(cut)


@pytest.mark.parametrize("problem", ["logits differ by up to 0.3 (atol 1e-4)", "fused"])
def test_a_fast_path_that_fails_its_check_fails_the_load(monkeypatch, problem):
    """A derived graph that does not compute what the exported graph computes is not served,
    nor silently dropped: the load fails, naming the way to serve the model anyway."""
    calls = []

    def check(self, decode, fused, batch=3):
        calls.append(batch)
        return problem

    monkeypatch.setattr(ModelRuntime, "_check_derived", check)
    with pytest.raises(ModelLoadError, match=r"fast path failed its check at load .*--fast-path off"):
        ModelRuntime(D2L)
    assert calls
    assert not ModelRuntime(D2L, RuntimeOptions(fast_path=False)).has_fused


def test_the_front_ends_copy_runs_nothing_and_the_engine_reports_its_provider():
    srv = start_server()  # the engine in its own process
    try:
        rt = srv.service.runtimes["timemachine-d2l"]
        assert not rt.has_fused and rt.session.get_providers() == ["CPUExecutionProvider"]
        assert srv.service.model_info().provider == ModelRuntime(D2L).provider
    finally:
        srv.stop()
