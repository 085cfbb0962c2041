"""Drive a gru-serve server with an unmodified tritonclient.grpc and print what it saw as JSON.

    python tests/support/triton_client_check.py HOST:PORT < scenarios.json

Runs in its own process: tritonclient.grpc and gru-serve's generated stubs both register the
protobuf messages `inference.*` in the default descriptor pool, so they cannot be imported in
one process. This script imports nothing from gru_serve. The input is a JSON list of
{"name": ..., "scenario": ..., **arguments}; the output maps each name to its result, or to
{"exception": ...} when the scenario itself failed.
"""

from __future__ import annotations

import json
import queue
import sys
import traceback
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

TIMEOUT_S = 120.0


def error_of(e: InferenceServerException) -> dict[str, str]:
    return {"status": str(e.status()), "message": e.message()}


def ids_input(ids: list[list[int]]) -> grpcclient.InferInput:
    arr = np.array(ids, dtype=np.int64)
    inp = grpcclient.InferInput("input_ids", list(arr.shape), "INT64")
    inp.set_data_from_numpy(arr)
    return inp


def prompt_input(prompt: str) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("prompt", [1], "BYTES")
    inp.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    return inp


def metadata(client: grpcclient.InferenceServerClient, model: str, generate: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "generate_ready": client.is_model_ready(generate),
        "unknown_ready": client.is_model_ready("no-such-model"),
        "server_metadata": client.get_server_metadata(as_json=True),
        "model_metadata": client.get_model_metadata(model, as_json=True),
        "generate_metadata": client.get_model_metadata(generate, as_json=True),
        "model_config": client.get_model_config(model, as_json=True),
        "generate_config": client.get_model_config(generate, as_json=True),
        "statistics": client.get_inference_statistics(model, as_json=True),
    }
    try:
        client.get_model_metadata("no-such-model")
        out["unknown_metadata"] = None
    except InferenceServerException as e:
        out["unknown_metadata"] = error_of(e)
    return out


def sequence(
    client: grpcclient.InferenceServerClient, model: str, sequence_id: int | str, chunks: list[list[int]]
) -> dict[str, Any]:
    """start, continue..., end on one sequence id; then one more request without start."""
    logits = []
    for i, chunk in enumerate(chunks):
        result = client.infer(
            model,
            [ids_input([chunk])],
            outputs=[grpcclient.InferRequestedOutput("logits")],
            request_id=f"req-{i}",
            sequence_id=sequence_id,
            sequence_start=i == 0,
            sequence_end=i == len(chunks) - 1,
        )
        response = result.get_response()
        assert response.id == f"req-{i}", response.id
        logits.append(result.as_numpy("logits").tolist())
    try:
        client.infer(model, [ids_input([chunks[-1]])], sequence_id=sequence_id)
        after_end = None
    except InferenceServerException as e:
        after_end = error_of(e)
    return {"logits": logits, "after_end": after_end}


def stream(
    client: grpcclient.InferenceServerClient, model: str, prompt: str, max_new_tokens: int
) -> dict[str, Any]:
    """A bad request then a greedy generation on one stream: the error arrives as a message and
    the stream goes on."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(
            model,
            [prompt_input(prompt)],
            request_id="bad",
            parameters={"max_tokens": 5},
            enable_empty_final_response=True,
        )
        client.async_stream_infer(
            model,
            [prompt_input(prompt)],
            request_id="gen",
            parameters={"max_new_tokens": max_new_tokens, "temperature": 0.0},
            enable_empty_final_response=True,
        )
        errors, pieces, token_ids, responses, final = [], [], [], 0, None
        while final is None:
            result, error = results.get(timeout=TIMEOUT_S)
            if error is not None:
                errors.append(str(error))
                continue
            response = result.get_response()
            responses += 1
            assert response.id == "gen", response.id
            params = response.parameters
            text = result.as_numpy("text")
            if text is not None:
                pieces.extend(t.decode() for t in text)
                token_ids.extend(int(t) for t in result.as_numpy("token_ids"))
            if params["triton_final_response"].bool_param:
                final = {
                    "outputs": len(response.outputs),
                    "finish_reason": params["finish_reason"].string_param,
                    "generated_tokens": params["generated_tokens"].int64_param,
                }
    finally:
        client.stop_stream()
    return {
        "text": "".join(pieces),
        "token_ids": token_ids,
        "responses": responses,
        "final": final,
        "errors": errors,
    }


def bad_inputs(client: grpcclient.InferenceServerClient, model: str) -> dict[str, Any]:
    cases: dict[str, Any] = {}

    def attempt(name: str, model_name: str, inp: grpcclient.InferInput) -> None:
        try:
            client.infer(model_name, [inp])
            cases[name] = None
        except InferenceServerException as e:
            cases[name] = error_of(e)

    wrong_dtype = grpcclient.InferInput("input_ids", [1, 3], "INT32")
    wrong_dtype.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.int32))
    attempt("wrong_dtype", model, wrong_dtype)
    wrong_shape = grpcclient.InferInput("input_ids", [3], "INT64")
    wrong_shape.set_data_from_numpy(np.array([1, 2, 3], dtype=np.int64))
    attempt("wrong_shape", model, wrong_shape)
    short = grpcclient.InferInput("input_ids", [1, 4], "INT64")
    short.set_data_from_numpy(np.array([[1, 2, 3, 4]], dtype=np.int64))
    short.set_shape([1, 5])  # the shape now promises 40 bytes; 32 go
    attempt("byte_length", model, short)
    attempt("unknown_model", "no-such-model", ids_input([[1, 2, 3]]))
    try:
        client.infer(model, [ids_input([[1, 2]])], sequence_id="never-started")
        cases["unknown_sequence"] = None
    except InferenceServerException as e:
        cases["unknown_sequence"] = error_of(e)
    return cases


SCENARIOS = {"metadata": metadata, "sequence": sequence, "stream": stream, "bad_inputs": bad_inputs}


def main() -> int:
    target = sys.argv[1]
    plan = json.load(sys.stdin)
    out: dict[str, Any] = {}
    with grpcclient.InferenceServerClient(target) as client:
        for step in plan:
            args = {k: v for k, v in step.items() if k not in ("name", "scenario")}
            try:
                out[step["name"]] = SCENARIOS[step["scenario"]](client, **args)
            except Exception as e:
                out[step["name"]] = {"exception": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
