"""Triton's statistics and model repository extensions over REST (gru_serve.http.repository_api),
with raw HTTP where the JSON's exact shape matters and tritonclient.http where a client's view
does; and numbers sent as strings to the REST generate extension."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from gru_serve.ops.settings import Settings
from gru_serve.sampling import SamplingParams
from gru_serve.server import ThreadedServer
from tests.support.serving import D2L, reference_generate

MODEL = "timemachine-d2l"
GENERATE = MODEL + "-generate"
PROMPT = "time traveller"


def get(server: ThreadedServer, path: str) -> httpx.Response:
    return httpx.get(server.http_target + path, timeout=60)


def post(server: ThreadedServer, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server.http_target + path, timeout=60, **kwargs)


def stat_of(server: ThreadedServer, model: str) -> dict:
    resp = get(server, f"/v2/models/{model}/stats")
    assert resp.status_code == 200, resp.text
    (stat,) = resp.json()["model_stats"]
    return stat


# -- statistics --


def test_stats_routes_and_their_shape(server):
    every = get(server, "/v2/models/stats")
    assert every.status_code == 200
    assert sorted(m["name"] for m in every.json()["model_stats"]) == [MODEL, GENERATE]
    for path in (f"/v2/models/{MODEL}/stats", f"/v2/models/{MODEL}/versions/1/stats"):
        (stat,) = get(server, path).json()["model_stats"]
        assert (stat["name"], stat["version"]) == (MODEL, "1")
        assert set(stat) >= {
            "last_inference",
            "inference_count",
            "execution_count",
            "inference_stats",
            "batch_stats",
        }
        phases = {"success", "fail", "queue", "compute_input", "compute_infer", "compute_output"}
        assert set(stat["inference_stats"]) >= phases
        assert all(isinstance(v, int) for d in stat["inference_stats"].values() for v in d.values())
    for path, words in (
        ("/v2/models/no-such-model/stats", ["no-such-model"]),
        (f"/v2/models/{MODEL}/versions/2/stats", ["version", "2"]),
    ):
        resp = get(server, path)
        assert resp.status_code == 404 and all(w in resp.json()["error"] for w in words)


def test_a_rest_generation_is_counted_in_every_phase(server):
    before = stat_of(server, GENERATE)
    resp = post(server, f"/v2/models/{GENERATE}/generate", json={"prompt": PROMPT, "max_new_tokens": 20})
    assert resp.status_code == 200 and resp.json()["text"] == reference_generate(D2L, PROMPT, 20)
    after = stat_of(server, GENERATE)
    for phase in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        b, a = before["inference_stats"][phase], after["inference_stats"][phase]
        assert a["count"] == b["count"] + 1 and a["ns"] > b["ns"], phase
    assert after["inference_count"] == before["inference_count"] + 1
    assert after["last_inference"] >= before["last_inference"]


def test_tritonclient_http_reads_the_statistics(server):
    client = httpclient.InferenceServerClient(server.http_target.removeprefix("http://"))
    try:
        stats = client.get_inference_statistics(MODEL)
        assert stats["model_stats"][0]["name"] == MODEL
        with pytest.raises(InferenceServerException) as err:
            client.get_inference_statistics("no-such-model")
        assert err.value.status() == "404"
    finally:
        client.close()


# -- the repository, without one configured --


def test_index_without_a_repository_lists_the_served_model(server):
    for kwargs in ({}, {"content": b""}, {"json": {}}, {"json": {"ready": True}}):
        resp = post(server, "/v2/repository/index", **kwargs)
        assert resp.status_code == 200, resp.text
        assert resp.json() == [{"name": MODEL, "version": "1", "state": "READY", "reason": ""}]
    for body, word in (({"ready": "maybe"}, "ready"), ({"readyy": True}, "readyy")):
        resp = post(server, "/v2/repository/index", json=body)
        assert resp.status_code == 400 and word in resp.json()["error"]


def test_load_and_unload_without_a_repository_are_refused(server):
    for action in ("load", "unload"):
        resp = post(server, f"/v2/repository/models/{MODEL}/{action}")
        assert resp.status_code == 400
        assert "no model repository" in resp.json()["error"]


# -- the repository --


@pytest.fixture(scope="module")
def repo_server(tmp_path_factory) -> Iterator[ThreadedServer]:
    repo: Path = tmp_path_factory.mktemp("repo")
    (repo / "extra").mkdir()
    shutil.copy(D2L, repo / "extra" / "model.onnx")  # the flat layout: NAME/model.onnx
    srv = ThreadedServer(Settings(port=0, models=(str(D2L),), model_repository=str(repo)), http=True)
    yield srv
    srv.stop()


def test_load_and_unload_over_rest(repo_server):
    index = post(repo_server, "/v2/repository/index").json()
    assert {"name": "extra", "version": "1", "state": "UNAVAILABLE", "reason": "not loaded"} in index
    resp = post(repo_server, "/v2/repository/models/extra/load", json={})
    assert (resp.status_code, resp.json()) == (200, {})
    assert get(repo_server, "/v2/models/extra-generate/ready").status_code == 200
    resp = post(
        repo_server, "/v2/models/extra-generate/generate", json={"prompt": PROMPT, "max_new_tokens": 30}
    )
    assert resp.json()["text"] == reference_generate(D2L, PROMPT, 30)
    assert stat_of(repo_server, "extra-generate")["inference_stats"]["success"]["count"] == 1
    resp = post(
        repo_server, "/v2/repository/models/extra/unload", json={"parameters": {"unload_dependents": False}}
    )
    assert (resp.status_code, resp.json()) == (200, {})
    assert {"name": "extra", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in post(
        repo_server, "/v2/repository/index"
    ).json()
    assert get(repo_server, "/v2/models/extra-generate/ready").status_code == 404
    assert get(repo_server, "/v2/models/extra/stats").status_code == 404
    resp = post(repo_server, "/v2/repository/models/no-such-model/load")
    assert resp.status_code == 404 and "no-such-model" in resp.json()["error"]
    resp = post(repo_server, "/v2/repository/models/extra/load", json={"parameters": {"config": "{}"}})
    assert resp.status_code == 400 and "config" in resp.json()["error"]


# -- numbers as strings --


def test_numeric_strings_over_rest(server):
    def generate(**params) -> httpx.Response:
        body = {"prompt": PROMPT, "max_new_tokens": 30, **params}
        return post(server, f"/v2/models/{GENERATE}/generate", json=body)

    numeric = generate(temperature=0.8, top_p=0.9, seed=3)
    strings = generate(temperature="0.8", top_p="0.9", seed="3")
    assert numeric.status_code == strings.status_code == 200
    want = reference_generate(D2L, PROMPT, 30, SamplingParams(temperature=0.8, top_p=0.9, seed=3))
    assert numeric.json()["text"] == strings.json()["text"] == want
    resp = generate(temperature="abc")
    assert resp.status_code == 400 and "'temperature'" in resp.json()["error"]
