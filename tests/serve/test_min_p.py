"""min_p (as vLLM defines it: after temperature, a token whose probability is below
min_p x the largest probability is removed, then top-k and top-p) end to end: gRPC, the OpenAI
body, the inference protocol's parameter and the CLI flag give the tokens of a numpy reference
written here from the definition over the plain exported graph; the step path and the fused
graph give the same tokens (greedy and seeded, batched with rows that do not use it); min_p = 1
is the greedy text; a min_p outside [0, 1] is refused naming the field."""

import json
import re
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import openai
import pytest

from gru_serve.client import Client, sampling
from gru_serve.engine.runtime import ModelRuntime
from gru_serve.reference import fused_generate, step_generate
from gru_serve.sampling import SamplingParams
from gru_serve.server import ThreadedServer
from tests.support.cli import cli, start
from tests.support.serving import D2L, openai_client, plain_model, start_http_server, start_server

PROMPT, N = "the time traveller", 60
GENERATE = "timemachine-d2l-generate"
SEEDED = [
    {"temperature": 1.0, "min_p": 0.2, "seed": 5},
    {"temperature": 1.5, "min_p": 0.05, "seed": 11},
    {"temperature": 2.5, "min_p": 0.05, "top_k": 8, "top_p": 0.95, "seed": 3},
]
_M = (1 << 64) - 1


def _uniform(seed: int, position: int) -> float:
    """splitmix64 of (seed, position), the server's documented counter-based draw."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
    return ((z ^ (z >> 31)) >> 11) * 2.0**-53


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _draw(logits: np.ndarray, o: dict, u: float) -> int:
    """One token from the definitions: temperature, min_p, top-k, top-p, inverse CDF."""
    t = float(np.float32(o.get("temperature", 0.0)))  # every transport holds floats at float32
    if t == 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / t
    probs = _softmax(z)
    z = np.where(probs < float(np.float32(o.get("min_p", 0.0))) * probs.max(), -np.inf, z)
    k = o.get("top_k", 0)
    if 0 < k < len(z):
        z = np.where(z >= np.sort(z)[::-1][k - 1], z, -np.inf)
    probs = _softmax(z)
    p = float(np.float32(o.get("top_p", 1.0)))
    if p < 1.0:
        order = np.argsort(-probs, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]
        keep = np.zeros(len(probs), bool)
        keep[order[mass_before < p]] = True
        probs = np.where(keep, probs, 0.0)
    cdf = np.cumsum(probs)
    return min(int((cdf < u * cdf[-1]).sum()), len(cdf) - 1)


def reference(prompt: str, n: int, o: dict) -> tuple[str, list[int]]:
    """The plain exported graph in a bare onnxruntime session, one token per call at batch 1."""
    session, meta = plain_model(str(D2L))
    vocab = json.loads(meta["gru_serve.vocab"])
    norm = json.loads(meta["gru_serve.normalization"])
    text = re.sub(norm["pattern"], norm["replacement"], prompt.lower() if norm["lowercase"] else prompt)
    index = {c: i for i, c in enumerate(vocab)}
    ids = [index.get(c, index.get("<unk>", 0)) for c in text]
    state = np.zeros((1, int(meta["gru_serve.num_layers"]), int(meta["gru_serve.hidden_size"])), np.float32)
    logits, state = session.run(["logits", "state_out"], {"input_ids": np.array([ids]), "state": state})
    out: list[int] = []
    for j in range(n):
        tok = _draw(logits[0, -1], o, _uniform(o.get("seed", 0), len(ids) + j))
        out.append(tok)
        logits, state = session.run(["logits", "state_out"], {"input_ids": np.array([[tok]]), "state": state})
    return "".join(vocab[t] for t in out), out


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    srv = start_http_server()  # the fused path (fast_path on, the default)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def step_server() -> Iterator[ThreadedServer]:
    srv = start_server(fast_path="off")  # the step path: numpy sampling after each decode step
    yield srv
    srv.stop()


def test_min_p_filters_the_reference():
    """The reference's min_p is not a no-op: the seeded texts differ from min_p = 0's."""
    for o in SEEDED:
        assert reference(PROMPT, N, o)[0] != reference(PROMPT, N, {**o, "min_p": 0.0})[0]


@pytest.mark.parametrize("o", [{}, {"min_p": 0.3}, *SEEDED], ids=["greedy", "greedy-min_p", "a", "b", "c"])
def test_grpc_step_and_fused_paths_equal_the_reference(server, step_server, o):
    want = reference(PROMPT, N, o)[0]
    for srv in (server, step_server):
        with Client(srv.target) as c:
            text, fin = c.generate_text(PROMPT, max_new_tokens=N, params=sampling(**o))
        assert (text, fin.generated_tokens) == (want, N)


def test_the_fused_graph_equals_the_step_path_batched():
    """The fused graph itself (K = 16 per run), a batch mixing min_p rows with greedy, plain
    sampling and top-k/top-p rows, against the step path and the reference row by row."""
    rt = ModelRuntime(D2L)
    assert rt.has_fused
    rows = [{}, {"temperature": 1.0, "seed": 9}, {"temperature": 0.9, "top_k": 5, "seed": 4}, *SEEDED]
    texts = (PROMPT, "it was", "the machine", "so", "time", "we")
    params = [SamplingParams.checked(**o) for o in rows]
    prompts = [rt.tokenizer.encode(t) for t in texts]
    fused, _, _ = fused_generate(rt, prompts, params, N, 16)
    for r, (o, p) in enumerate(zip(rows, params, strict=True)):
        step, _, _ = step_generate(rt.step, prompts[r], rt.zero_state(), p, N)
        assert fused[r] == step == reference(texts[r], N, o)[1], (r, o)


def test_min_p_1_is_the_greedy_text(server):
    greedy = reference(PROMPT, N, {})[0]
    with Client(server.target) as c:
        assert (
            c.generate_text(PROMPT, max_new_tokens=N, params=sampling(temperature=1.3, min_p=1.0, seed=8))[0]
            == greedy
        )
    with openai_client(server) as oai:
        r = oai.completions.create(
            model="", prompt=PROMPT, max_tokens=N, temperature=1.3, extra_body={"min_p": 1}
        )
    assert r.choices[0].text == greedy


@pytest.mark.parametrize("o", SEEDED, ids=["a", "b", "c"])
def test_openai_and_inference_protocol_take_min_p(server, o):
    want = reference(PROMPT, N, o)[0]
    extra = {k: v for k, v in o.items() if k not in ("temperature", "top_p", "seed")}
    with openai_client(server) as oai:
        r = oai.completions.create(
            model="",
            prompt=PROMPT,
            max_tokens=N,
            temperature=o["temperature"],
            top_p=o.get("top_p"),
            seed=o["seed"],
            extra_body=extra,
        )
    assert r.choices[0].text == want
    with httpx.Client(base_url=server.http_target, timeout=60) as http:
        body = {"prompt": PROMPT, "max_new_tokens": N, **o}  # parameters as top-level fields
        r = http.post(f"/v2/models/{GENERATE}/generate", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["text"] == want
        # and in `parameters`, min_p as a string (Triton's C++ client has no double parameters)
        body = {"prompt": PROMPT, "max_new_tokens": N, "parameters": {**o, "min_p": str(o["min_p"])}}
        assert http.post(f"/v2/models/{GENERATE}/generate", json=body).json()["text"] == want


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_min_p_outside_0_1_is_refused_naming_the_field(server, bad):
    with Client(server.target) as c, pytest.raises(grpc.RpcError) as err:
        c.generate_text(PROMPT, max_new_tokens=5, params=sampling(temperature=1.0, min_p=bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.min_p must be in [0, 1]" in err.value.details()
    if bad == bad:  # JSON has no NaN
        with openai_client(server) as oai, pytest.raises(openai.BadRequestError) as e:
            oai.completions.create(model="", prompt=PROMPT, max_tokens=5, extra_body={"min_p": bad})
        assert "sampling.min_p must be in [0, 1]" in str(e.value)
        with httpx.Client(base_url=server.http_target, timeout=60) as http:
            r = http.post(f"/v2/models/{GENERATE}/generate", json={"prompt": PROMPT, "min_p": bad})
        assert r.status_code == 400 and "sampling.min_p must be in [0, 1]" in r.text


def test_cli_flag():
    proc, target = start()
    try:
        o = SEEDED[0]
        r = cli(
            "generate",
            PROMPT,
            "--max-tokens",
            str(N),
            "--temperature",
            "1",
            "--min-p",
            "0.2",
            "--seed",
            "5",
            "--target",
            target,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout == reference(PROMPT, N, o)[0] + "\n"
        bad = cli("generate", "x", "--min-p", "2", "--target", target)
        assert bad.returncode == 1 and "INVALID_ARGUMENT: sampling.min_p must be in [0, 1]" in bad.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
