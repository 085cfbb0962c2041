"""The PyTorch side of the bench: the eager timings subprocess and the baseline gRPC server
serve the same model and the same API."""

import json
import subprocess
import sys

from exporters.model import greedy_continue, load_checkpoint
from exporters.torch_bench import model_from_onnx
from gru_serve import launch
from gru_serve.bench import served
from gru_serve.client import Client
from tests.support.paths import REPO
from tests.support.serving import D2L


def test_the_torch_model_from_onnx_is_the_checkpoint():
    net, vocab = model_from_onnx(D2L)
    ck = load_checkpoint(REPO / "checkpoints" / "timemachine-d2l.pt")
    assert greedy_continue(net, vocab, "time traveller", 80) == greedy_continue(
        ck.model, ck.vocab, "time traveller", 80
    )


def test_torch_bench_prints_json():
    argv = [sys.executable, "-m", "exporters.torch_bench", "--model", str(D2L), "--tokens", "20",
            "--batched-tokens", "40", "--batches", "1,4", "--repeats", "1"]  # fmt: skip
    out = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120).stdout)
    assert out["d2l"]["tokens_per_s"] > 0 and out["no_grad"]["us_per_token"] > 0
    assert [r["batch"] for r in out["batched"]] == [1, 4] and out["batched_1_thread"][0]["threads"] == 1
    assert out["d2l_sample"].startswith("time traveller")


def test_baseline_server_speaks_the_same_api():
    baseline = launch.Server(served.baseline_argv(D2L, 2), name="baseline")
    with baseline.start() as srv, Client(srv.target) as c:
        msgs = list(c.generate("time traveller", max_new_tokens=40))
        assert all(len(m.tokens) == 1 for m in msgs[:-1]) and msgs[-1].finished.generated_tokens == 40
        net, vocab = model_from_onnx(D2L)
        assert "time traveller" + "".join(m.tokens[0].text for m in msgs[:-1]) == greedy_continue(
            net, vocab, "time traveller", 40
        )
