import pytest

from gru_serve.settings import Settings


def test_flags_override_environment_override_defaults():
    env = {"GRU_SERVE_PORT": "6000", "GRU_SERVE_MAX_BATCH_SIZE": "8", "GRU_SERVE_MODELS": "a=x.onnx,y.onnx"}
    s = Settings.load(env, port=7000, device=None)
    assert s.port == 7000 and s.max_batch_size == 8 and s.device == "auto"
    assert s.models == ("a=x.onnx", "y.onnx")


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ValueError, match="GRU_SERVE_PORT"):
        Settings.load({"GRU_SERVE_PORT": "eighty"})
