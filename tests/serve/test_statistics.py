"""Triton's statistics extension in full, read by unmodified tritonclients over both transports,
and numbers sent as strings (Triton's C++ client has no double parameters).

tritonclient.grpc runs in a subprocess (tests/support/tritonclient_calls.py: its protobuf
messages clash with our stubs'); tritonclient.http runs here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import tritonclient.http as httpclient

from gru_serve.core.sequences import Sequence
from gru_serve.grpc.generated.inference import grpc_service_pb2_grpc as pb_grpc
from gru_serve.ops.settings import Settings
from gru_serve.sampling import SamplingParams
from gru_serve.server import ThreadedServer
from tests.support.oip import GENERATE, MODEL, generate_request, ids_request, text_of, tritonclient_grpc
from tests.support.serving import D2L, reference_generate

PHASES = ("queue", "compute_input", "compute_infer", "compute_output")
DURATIONS = ("success", "fail", *PHASES)


def canonical(model_stat: dict[str, Any]) -> dict[str, Any]:
    """A model's statistics whichever client read them: protobuf's JSON (tritonclient.grpc's
    as_json) writes uint64 as strings and leaves zero fields out; Triton's REST JSON has
    numbers."""

    def duration(d: dict | None) -> tuple[int, int]:
        d = d or {}
        return int(d.get("count", 0)), int(d.get("ns", 0))

    stats = model_stat.get("inference_stats", {})
    return {
        "name": model_stat["name"],
        "version": model_stat.get("version", ""),
        "last_inference": int(model_stat.get("last_inference", 0)),
        "inference_count": int(model_stat.get("inference_count", 0)),
        "execution_count": int(model_stat.get("execution_count", 0)),
        **{name: duration(stats.get(name)) for name in DURATIONS},
        "batches": {
            int(b["batch_size"]): {p: duration(b.get(p)) for p in PHASES[1:]}
            for b in model_stat.get("batch_stats", [])
        },
    }


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    """A server of its own: its statistics count this module's requests only."""
    srv = ThreadedServer(Settings(port=0, models=(str(D2L),)), http=True)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def traffic(server) -> dict[str, Any]:
    """Known requests: to MODEL batches of 1 (stateless and on a sequence) and 3, and one
    failure; to GENERATE one streamed and one unary generation, and one failure. Then the
    statistics as tritonclient.grpc and tritonclient.http read them."""
    t0_ms = int(time.time() * 1000)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(ids_request([[3, 4, 5]]))
        stub.ModelInfer(ids_request([[3, 4, 5, 6]] * 3))
        stub.ModelInfer(ids_request([[7, 8]], seq=Sequence("stats", start=True, end=True)))
        with pytest.raises(grpc.RpcError) as bad:
            stub.ModelInfer(ids_request([[1, 999]]))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        streamed = generate_request("time traveller", "s", max_new_tokens=30)
        streamed.parameters["triton_enable_empty_final_response"].bool_param = True
        messages = list(stub.ModelStreamInfer(iter([streamed])))
        assert not any(m.error_message for m in messages)
        stub.ModelInfer(generate_request("the machine", max_new_tokens=20))
        with pytest.raises(grpc.RpcError) as bad:
            stub.ModelInfer(generate_request("the machine", max_new_tokens=20, top_k="many"))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    t1_ms = int(time.time() * 1000)
    got = tritonclient_grpc(
        server.target,
        [
            {"name": MODEL, "method": "get_inference_statistics", "args": [MODEL]},
            {"name": GENERATE, "method": "get_inference_statistics", "args": [GENERATE]},
            {"name": "versioned", "method": "get_inference_statistics", "args": [MODEL, "1"]},
            {"name": "all", "method": "get_inference_statistics"},
        ],
    )
    http = httpclient.InferenceServerClient(server.http_target.removeprefix("http://"))
    try:
        rest = {
            MODEL: http.get_inference_statistics(MODEL),
            GENERATE: http.get_inference_statistics(GENERATE),
            "versioned": http.get_inference_statistics(MODEL, "1"),
            "all": http.get_inference_statistics(),
        }
    finally:
        http.close()
    return {"grpc": got, "http": rest, "window_ms": (t0_ms, t1_ms)}


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_statistics_count_every_phase_of_the_logits_model(traffic, transport):
    (stat,) = traffic[transport][MODEL]["model_stats"]
    s = canonical(stat)
    assert (s["name"], s["version"]) == (MODEL, "1")
    assert s["success"][0] == 3 and s["fail"][0] == 1
    assert s["inference_count"] == 1 + 3 + 1 and s["execution_count"] == 3
    for phase in PHASES:
        count, ns = s[phase]
        assert count == 3 and ns > 0, phase
    # The phases split each request's time: together they are the successes' time, exactly.
    assert sum(s[p][1] for p in PHASES) == s["success"][1]
    assert set(s["batches"]) == {1, 3}
    assert {p: c for p, (c, _) in s["batches"][1].items()} == dict.fromkeys(PHASES[1:], 2)
    assert {p: c for p, (c, _) in s["batches"][3].items()} == dict.fromkeys(PHASES[1:], 1)
    assert all(ns > 0 for b in s["batches"].values() for _, ns in b.values())
    start, end = traffic["window_ms"]
    assert start <= s["last_inference"] <= end


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_statistics_count_every_phase_of_the_generation_model(traffic, transport):
    (stat,) = traffic[transport][GENERATE]["model_stats"]
    s = canonical(stat)
    assert (s["name"], s["version"]) == (GENERATE, "1")
    assert s["success"][0] == 2 and s["fail"][0] == 1 and s["fail"][1] > 0
    assert s["inference_count"] == 2 and s["execution_count"] == 2
    for phase in PHASES:
        count, ns = s[phase]
        assert count == 2 and ns > 0, phase
    assert sum(s[p][1] for p in PHASES) == s["success"][1]
    assert set(s["batches"]) == {1}
    assert all(count == 2 and ns > 0 for count, ns in s["batches"][1].values())


def test_both_transports_give_the_same_numbers(traffic):
    grpc_, http_ = traffic["grpc"], traffic["http"]
    for key in (MODEL, GENERATE, "versioned"):
        assert [canonical(m) for m in grpc_[key]["model_stats"]] == [
            canonical(m) for m in http_[key]["model_stats"]
        ]
    by_name = {m["name"]: canonical(m) for m in grpc_["all"]["model_stats"]}
    assert set(by_name) == {MODEL, GENERATE}
    assert by_name == {m["name"]: canonical(m) for m in http_["all"]["model_stats"]}
    assert by_name[MODEL] == canonical(grpc_[MODEL]["model_stats"][0])


def test_rest_statistics_are_json_numbers(traffic):
    """Triton's REST API writes counts and durations as numbers (protobuf's JSON would write
    uint64 as strings); tritonclient.http hands them on as parsed."""
    (stat,) = traffic["http"][MODEL]["model_stats"]
    assert isinstance(stat["inference_count"], int) and isinstance(stat["last_inference"], int)
    assert all(isinstance(v, int) for d in stat["inference_stats"].values() for v in d.values())
    assert all(isinstance(b["batch_size"], int) for b in stat["batch_stats"])


# -- numbers as strings --


def test_numeric_strings_sample_as_numbers(server):
    prompt, n = "time traveller", 40
    numeric = {"temperature": 0.8, "top_p": 0.9, "seed": 3, "max_new_tokens": n}
    strings = {"temperature": "0.8", "top_p": "0.9", "seed": 3, "max_new_tokens": n}
    every_string = {"temperature": "0.8", "top_p": "0.9", "seed": "3", "max_new_tokens": str(n), "top_k": "0"}
    got = tritonclient_grpc(
        server.target,
        [
            {"name": "numeric", "method": "generate", "args": [GENERATE, prompt, numeric]},
            {"name": "strings", "method": "generate", "args": [GENERATE, prompt, strings]},
            {"name": "every_string", "method": "generate", "args": [GENERATE, prompt, every_string]},
            {
                "name": "abc",
                "method": "generate",
                "args": [GENERATE, prompt, {**strings, "temperature": "abc"}],
            },
            {"name": "seed", "method": "generate", "args": [GENERATE, prompt, {**strings, "seed": "3.5"}]},
        ],
    )
    want = reference_generate(D2L, prompt, n, SamplingParams(temperature=0.8, top_p=0.9, seed=3))
    assert got["numeric"]["text"] == want
    assert got["strings"] == got["numeric"] and got["every_string"] == got["numeric"]
    for name, param in (("abc", "temperature"), ("seed", "seed")):
        error = got[name]["error"]
        assert error["status"] == "StatusCode.INVALID_ARGUMENT"
        assert f"'{param}'" in error["message"], error


def test_a_numeric_string_out_of_range_names_its_parameter(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(generate_request("time", max_new_tokens=5, top_p="1.5"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in err.value.details()
        resp = stub.ModelInfer(generate_request("time", max_new_tokens="5", top_k=" 1 "))
        texts, ids = text_of(resp)
        assert len(ids) == 5 and "".join(texts) == reference_generate(D2L, "time", 5)
