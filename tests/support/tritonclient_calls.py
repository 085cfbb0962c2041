"""Make calls with an unmodified tritonclient.grpc and print what came back as JSON.

    python tests/support/tritonclient_calls.py HOST:PORT < calls.json

In a process of its own: tritonclient.grpc and gru-serve's generated stubs both register the
protobuf messages `inference.*` in the default descriptor pool (see triton_client_check.py).
The input is a JSON list of {"name", "method", "args"?, "kwargs"?}: `method` is a method of
tritonclient.grpc.InferenceServerClient (called with as_json=True where it takes it), or
"generate" (args: model, prompt, parameters), a unary infer of a generation model returning
{"text", "token_ids"}. The output maps each name to the result, or to {"error": {"status",
"message"}} when the server refused the call.
"""

from __future__ import annotations

import inspect
import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def generate(client: grpcclient.InferenceServerClient, model: str, prompt: str, parameters: dict) -> dict:
    inp = grpcclient.InferInput("prompt", [1], "BYTES")
    inp.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    result = client.infer(model, [inp], parameters=parameters)
    text = result.as_numpy("text")
    return {
        "text": "".join(t.decode() for t in text),
        "token_ids": [int(t) for t in result.as_numpy("token_ids")],
    }


def call(client: grpcclient.InferenceServerClient, step: dict[str, Any]) -> Any:
    args, kwargs = step.get("args", []), step.get("kwargs", {})
    if step["method"] == "generate":
        return generate(client, *args, **kwargs)
    method = getattr(client, step["method"])
    if "as_json" in inspect.signature(method).parameters:
        kwargs = {"as_json": True, **kwargs}
    return method(*args, **kwargs)


def main() -> int:
    out: dict[str, Any] = {}
    with grpcclient.InferenceServerClient(sys.argv[1]) as client:
        for step in json.load(sys.stdin):
            try:
                out[step["name"]] = call(client, step)
            except InferenceServerException as e:
                out[step["name"]] = {"error": {"status": str(e.status()), "message": e.message()}}
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
