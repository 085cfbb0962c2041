import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from gru_serve.ops.settings import ENV_PREFIX, Settings, allowed

MISSING = "/nonexistent/model.onnx"  # were a bad setting let through, start-up stops here, not serving


def serve(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    return subprocess.run(
        [sys.executable, "-m", "gru_serve.cli", "serve", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_flags_override_environment_override_defaults():
    env = {"GRU_SERVE_PORT": "6000", "GRU_SERVE_MAX_BATCH_SIZE": "8", "GRU_SERVE_MODELS": "a=x.onnx,y.onnx"}
    s = Settings.load(env, port=7000, device=None)
    assert s.port == 7000 and s.max_batch_size == 8 and s.device == "auto"
    assert s.models == ("a=x.onnx", "y.onnx")


def test_the_process_environment_is_read_and_an_explicit_one_replaces_it(monkeypatch):
    monkeypatch.setenv("GRU_SERVE_PORT", "6000")
    monkeypatch.setenv("GRU_SERVE_AUTH_TOKENS", "alice,bob")
    assert Settings.load(port=None).port == 6000 and Settings(max_queue=3).auth_tokens == ("alice", "bob")
    assert Settings.load(port="7000").port == 7000
    assert Settings.load({}).port == 50051 and Settings.load({}).auth_tokens == ()


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ValueError, match="GRU_SERVE_PORT"):
        Settings.load({"GRU_SERVE_PORT": "eighty"})


def test_direct_construction_checks_ranges_too():
    with pytest.raises(ValidationError):
        Settings(max_batch_size=0)
    with pytest.raises(ValidationError):
        Settings(max_new_tokens=8, default_new_tokens=9)


def test_the_log_line_hides_bearer_tokens():
    s = Settings(auth_tokens=("s3cret-a", "s3cret-b"))
    assert "s3cret" not in s.describe() and "s3cret" not in repr(s)
    assert "auth_tokens=('***', '***')" in s.describe()


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["--max-batch-size", "0"], {}, ["--max-batch-size", "GRU_SERVE_MAX_BATCH_SIZE", ">= 1", "'0'"]),
        ([], {"GRU_SERVE_MAX_QUEUE": "-5"}, ["--max-queue", "GRU_SERVE_MAX_QUEUE", ">= 1", "'-5'"]),
        (["--round-budget-ms", "0"], {}, ["--round-budget-ms", "a number > 0"]),
        (["--grace-s", "-1"], {}, ["--grace-s", "a number >= 0", "'-1'"]),
        (["--prefill-chunk", "100"], {}, ["--prefill-chunk", "GRU_SERVE_PREFILL_CHUNK", "multiple of 64"]),
        ([], {"GRU_SERVE_PREFILL_CHUNK": "0"}, ["--prefill-chunk", "an integer >= 64", "'0'"]),
        (["--frontends", "2"], {}, ["--frontends 2 needs --session-store redis://"]),
        (["--frontends", "2", "--engine", "thread"], {}, ["--frontends 2 needs --engine process"]),
        (["--fast-path", "maybe"], {}, ["--fast-path", "one of on, off", "'maybe'"]),
        (["--port", "65536"], {}, ["--port", "GRU_SERVE_PORT", "0..65535"]),
        ([], {"GRU_SERVE_DEVICE": "gpu"}, ["--device", "one of auto, cuda, cpu", "'gpu'"]),
        (["--default-new-tokens", "9", "--max-new-tokens", "8"], {}, ["--default-new-tokens", "<="]),
        (["--tls-cert", "server.pem"], {}, ["--tls-cert", "--tls-key"]),
    ],
)
def test_out_of_range_settings_are_refused_at_start_with_one_line(args, env, words):
    r = serve("--port", "0", "--model", MISSING, *args, env=env)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("gru-serve: error: ") and MISSING not in lines[0]
    for w in words:
        assert w in lines[0]


def test_a_flag_overrides_a_bad_environment_value():
    env = {"GRU_SERVE_MAX_BATCH_SIZE": "0"}
    r = serve("--port", "0", "--model", MISSING, "--max-batch-size", "4", env=env)
    assert r.returncode == 2 and MISSING in r.stderr and "max-batch-size" not in r.stderr


def test_help_shows_each_setting_from_its_one_definition():
    r = serve("--help")
    assert r.returncode == 0
    flat = "".join(r.stdout.split())  # argparse wraps help (at spaces and hyphens)
    for name, f in Settings.model_fields.items():
        assert f.description, f"{name} has no docstring"
        for text in (f.description, ENV_PREFIX + name.upper(), allowed(name)):
            assert "".join(text.split()) in flat, f"{name}: {text!r} is not in --help"
