"""Repository loads with the engine process: READY means the engine serves the model (a file
the engine cannot load fails the load with the engine's reason, and nothing is left half
registered), and the engine loads off its I/O thread, so streams already running keep getting
tokens while a model loads."""

from __future__ import annotations

import itertools
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from gru_serve.client import Client
from gru_serve.core.models import engine_config
from gru_serve.engine.runtime import ModelRuntime, load_runtime
from gru_serve.grpc.generated.inference import grpc_service_pb2 as pb
from gru_serve.grpc.generated.inference import grpc_service_pb2_grpc as pb_grpc
from gru_serve.ops.errors import ModelLoadError
from gru_serve.ops.settings import Settings
from gru_serve.server import ThreadedServer
from gru_serve.shipped import shipped_models
from tests.support.serving import D2L, LONG, reference_generate

SKEWED = "skewed"  # opens in the front end; fails the fast path's load-time check in the engine
BIG = "big"  # the shipped BPE model: its engine load takes about a second here
STREAMS = 2


def skew(src: Path, dst: Path) -> None:
    """The exported graph's logits doubled after the head: the file is well formed and its
    metadata right (the front end's copy opens it), but the decode graph the engine derives
    from the weights no longer computes what the exported graph computes."""
    model = onnx.load(str(src))
    i, add = next((i, n) for i, n in enumerate(model.graph.node) if n.op_type == "Add")
    out = add.output[0]
    add.output[0] = out + "_unskewed"
    model.graph.initializer.append(numpy_helper.from_array(np.array(2.0, np.float32), "skew"))
    model.graph.node.insert(i + 1, helper.make_node("Mul", [out + "_unskewed", "skew"], [out]))
    onnx.save(model, str(dst))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    for name in (SKEWED, BIG):
        (root / name).mkdir()
    skew(D2L, root / SKEWED / "model.onnx")
    shutil.copy(shipped_models()["timemachine-bpe"], root / BIG / "model.onnx")
    return root


@pytest.fixture(scope="module")
def server(repo) -> Iterator[ThreadedServer]:
    settings = Settings(port=0, models=(str(D2L),), model_repository=str(repo), max_new_tokens=LONG)
    assert settings.engine == "process"
    srv = ThreadedServer(settings)
    yield srv
    srv.stop()


@pytest.fixture
def stub(server) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def states(stub: pb_grpc.GRPCInferenceServiceStub) -> dict[str, tuple[str, str]]:
    return {m.name: (m.state, m.reason) for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}


def test_a_model_only_the_engine_cannot_load_fails_the_load(server, stub, repo):
    path = repo / SKEWED / "model.onnx"
    # The reference: the front end's copy opens it, a full load (what the engine does) refuses it.
    load_runtime(path, engine_config(server.service.settings), SKEWED, front_end=True)
    with pytest.raises(ModelLoadError, match="fast path failed its check"):
        ModelRuntime(path)
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=SKEWED))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "fast path failed its check" in err.value.details()
    state, reason = states(stub)[SKEWED]
    assert state == "UNAVAILABLE" and "fast path failed its check" in reason
    assert SKEWED not in server.service.runtimes  # not registered half-loaded
    with pytest.raises(grpc.RpcError) as err, Client(server.target) as client:
        client.generate_text("time", model=SKEWED, max_new_tokens=3)
    assert "unknown model 'skewed'" in err.value.details()
    # The server serves on, and the same load fails the same way again (not a stale answer).
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=SKEWED))
    assert "fast path failed its check" in err.value.details()
    with Client(server.target) as client:
        text, _ = client.generate_text("time traveller", max_new_tokens=20)
    assert text == reference_generate(D2L, "time traveller", 20)


class Reader(threading.Thread):
    """Reads one long stream as fast as it comes, noting when each message arrived."""

    def __init__(self, client: Client) -> None:
        super().__init__(daemon=True)
        self.stream = client.generate("the time machine", max_new_tokens=LONG)
        self.arrivals: list[float] = []
        self.flowing = threading.Event()

    def run(self) -> None:
        try:
            for _ in self.stream:
                self.arrivals.append(time.perf_counter())
                if len(self.arrivals) >= 20:
                    self.flowing.set()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise

    def largest_gap(self, start: float, end: float) -> tuple[float, int]:
        """The longest wait between two messages around [start, end], and the messages in it."""
        times = self.arrivals
        gaps = [b - a for a, b in itertools.pairwise(times) if b >= start and a <= end]
        return max(gaps), sum(start <= t <= end for t in times)


def test_streams_keep_getting_tokens_while_the_engine_loads_a_model(server, stub):
    with Client(server.target) as client:
        readers = [Reader(client) for _ in range(STREAMS)]
        for r in readers:
            r.start()
        for r in readers:
            assert r.flowing.wait(60)
        start = time.perf_counter()
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=BIG))
        end = time.perf_counter()
        # READY now means the engine has it: a request at once is served by the new model.
        assert states(stub)[BIG] == ("READY", "")
        _, finished = client.generate_text("the time", model=BIG, max_new_tokens=8)
        assert finished.generated_tokens == 8
        for r in readers:
            r.stream.cancel()
        for r in readers:
            r.join(30)
    load_s = end - start
    gaps = [r.largest_gap(start, end) for r in readers]
    worst = max(g for g, _ in gaps)
    print(f"engine load of {BIG}: {load_s:.3f} s; largest token gap during it {worst * 1000:.1f} ms")
    assert all(n > 0 for _, n in gaps), gaps  # every stream got tokens while the model loaded
    assert worst < load_s / 4, f"a stream waited {worst:.3f} s during a {load_s:.3f} s load"
