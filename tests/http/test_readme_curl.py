"""The README's curl examples, run as written (the real curl) against a live server on an
ephemeral port, each answer checked against gRPC or the plain exported model."""

import json
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gru_serve.client import Client
from tests.support.serving import D2L, plain_model, reference_generate

README = Path(__file__).resolve().parents[2] / "README.md"
PROMPT = "the time traveller"


def readme_commands() -> list[str]:
    text = README.read_text()
    block = re.search(r"<!-- http-examples.*?-->\n```sh\n(.*?)```", text, re.S)
    assert block, "README.md lost its http-examples block"
    return [c.strip() for c in block.group(1).replace("\\\n", " ").splitlines() if c.strip()]


@pytest.fixture(scope="module")
def answers(server) -> list[str]:
    host = server.http_target.removeprefix("http://")
    out = []
    for command in readme_commands():
        assert shlex.split(command)[0] == "curl"
        r = subprocess.run(
            ["bash", "-c", command.replace("localhost:8000", host)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, (command, r.stderr)
        out.append(r.stdout)
    return out


def test_the_readme_shows_the_http_examples():
    assert len(readme_commands()) == 10


def test_completions_examples_give_the_grpc_text(server, answers):
    with Client(server.target) as c:
        grpc_text, _ = c.generate_text(PROMPT, max_new_tokens=40)
    assert grpc_text == reference_generate(D2L, PROMPT, 40)
    models = json.loads(answers[0])
    assert [m["id"] for m in models["data"]] == ["timemachine-d2l"]
    assert json.loads(answers[1])["choices"][0]["text"] == grpc_text
    events = [line[6:] for line in answers[2].splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"]) == grpc_text
    generate = json.loads(answers[7])
    assert generate["text"] == grpc_text


def test_session_health_and_metadata_examples(server, answers):
    session = json.loads(answers[3])
    with Client(server.target) as c:
        assert c.get_session(session["session_id"]).tokens_seen == session["tokens_seen"] == len("the time")
    assert answers[4].strip() == "200"
    assert json.loads(answers[5])["name"] == "timemachine-d2l"


def test_infer_example_equals_the_plain_model(answers):
    reply = json.loads(answers[6])
    (logits,) = reply["outputs"]
    plain, meta = plain_model(str(D2L))
    state = np.zeros((1, int(meta["gru_serve.num_layers"]), int(meta["gru_serve.hidden_size"])), np.float32)
    want, _ = plain.run(None, {"input_ids": np.array([[20, 8, 5]], np.int64), "state": state})
    assert logits["shape"] == list(want.shape)
    np.testing.assert_allclose(np.array(logits["data"], np.float32).reshape(want.shape), want, atol=1e-5)


def test_statistics_and_repository_examples(answers):
    stats = json.loads(answers[8])
    assert "timemachine-d2l" in {s["name"] for s in stats["model_stats"]}
    index = json.loads(answers[9])
    assert {"name": "timemachine-d2l", "state": "READY"}.items() <= next(
        m for m in index if m["name"] == "timemachine-d2l"
    ).items()
