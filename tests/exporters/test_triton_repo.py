"""`gru-export triton-repo`: a Triton model repository for the shipped model, read back with
tritonclient's own ModelConfig message (so a field Triton does not know fails to parse)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format

from exporters import cli
from gru_serve.contract import STATE, STATE_OUT, graph_io, read_model
from tests.support.oip import triton_class, triton_pool

MODEL = Path(__file__).resolve().parents[2] / "gru_serve" / "models" / "timemachine-d2l" / "model.onnx"
TRITON_TYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32"}
MAX_BATCH, IDLE_US = 8, 5_000_000


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    argv = [
        "triton-repo",
        str(MODEL),
        "-o",
        str(out),
        "--max-batch-size",
        str(MAX_BATCH),
        "--max-sequence-idle-us",
        str(IDLE_US),
    ]
    assert cli.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def config(repo: Path):
    """config.pbtxt parsed as tritonclient's inference.ModelConfig (unknown fields raise)."""
    return text_format.Parse(
        (repo / "timemachine-d2l" / "config.pbtxt").read_text(), triton_class("inference.ModelConfig")()
    )


@pytest.fixture(scope="module")
def graph() -> onnx.ModelProto:
    return onnx.load(str(MODEL))


def type_name(value: int) -> str:
    return triton_pool().FindEnumTypeByName("inference.DataType").values_by_number[value].name


def triton_dims(onnx_dims: tuple) -> list[int]:
    """A batch-first ONNX shape as Triton writes it: without the batch axis, -1 where dynamic."""
    assert not isinstance(onnx_dims[0], int), "the batch axis must be dynamic"
    return [d if isinstance(d, int) else -1 for d in onnx_dims[1:]]


def test_layout(repo: Path) -> None:
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert files == ["timemachine-d2l/1/model.onnx", "timemachine-d2l/config.pbtxt"]
    assert (repo / "timemachine-d2l" / "1" / "model.onnx").read_bytes() == MODEL.read_bytes()


def test_model_and_batching(config) -> None:
    assert config.name == "timemachine-d2l"  # the metadata name, which is the directory name
    assert (config.platform, config.backend) == ("onnxruntime_onnx", "onnxruntime")
    assert config.max_batch_size == MAX_BATCH
    # Triton allows one scheduler: sequence batching, whose oldest strategy batches sequences.
    assert config.WhichOneof("scheduling_choice") == "sequence_batching"
    seq = config.sequence_batching
    assert seq.WhichOneof("strategy_choice") == "oldest"
    assert seq.oldest.max_candidate_sequences >= MAX_BATCH
    assert seq.max_sequence_idle_microseconds == IDLE_US
    assert not seq.control_input  # the graph has no START/READY/CORRID inputs


def test_inputs_and_outputs_match_the_graph(config, graph: onnx.ModelProto) -> None:
    io = graph_io(graph)
    state_names = {STATE, STATE_OUT}
    # Implicit state: state/state_out are sequence-batching state, not model inputs/outputs.
    assert {t.name for t in config.input} == {v.name for v in graph.graph.input} - state_names
    assert {t.name for t in config.output} == {v.name for v in graph.graph.output} - state_names
    for tensor in [*config.input, *config.output]:
        dtype, dims = io[tensor.name]
        assert type_name(tensor.data_type) == TRITON_TYPES[dtype], tensor.name
        assert list(tensor.dims) == triton_dims(dims), tensor.name
    assert [list(t.dims) for t in config.input] == [[-1]]
    assert [list(t.dims) for t in config.output] == [[-1, read_model(graph).vocab_size]]


def test_implicit_state(config, graph: onnx.ModelProto) -> None:
    io, meta = graph_io(graph), read_model(graph)
    [state] = config.sequence_batching.state
    assert (state.input_name, state.output_name) == (STATE, STATE_OUT)
    assert list(state.dims) == [meta.num_layers, meta.hidden_size]
    for name in (STATE, STATE_OUT):
        dtype, dims = io[name]
        assert type_name(state.data_type) == TRITON_TYPES[dtype]
        assert list(state.dims) == triton_dims(dims)
    [initial] = state.initial_state
    assert initial.WhichOneof("state_data") == "zero_data" and initial.zero_data
    assert (initial.data_type, list(initial.dims)) == (state.data_type, list(state.dims))
    assert initial.name


def test_instance_groups(config) -> None:
    kind = triton_pool().FindEnumTypeByName("inference.ModelInstanceGroup.Kind")
    groups = {kind.values_by_number[g.kind].name: g.count for g in config.instance_group}
    assert set(groups) == {"KIND_GPU", "KIND_CPU"}
    assert all(count >= 1 for count in groups.values())


def test_config_says_why(repo: Path) -> None:
    comments = "\n".join(
        line
        for line in (repo / "timemachine-d2l" / "config.pbtxt").read_text().splitlines()
        if line.startswith("#")
    )
    assert "dynamic_batching" in comments and "oldest" in comments
    assert "implicit state" in comments


def test_rerun_overwrites(tmp_path: Path) -> None:
    argv = ["triton-repo", str(MODEL), "-o", str(tmp_path), "--name", "tm"]
    assert cli.main([*argv, "--max-batch-size", "4"]) == 0
    assert cli.main([*argv, "--max-batch-size", "16"]) == 0
    text = (tmp_path / "tm" / "config.pbtxt").read_text()
    assert text_format.Parse(text, triton_class("inference.ModelConfig")()).max_batch_size == 16
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["1", "config.pbtxt", "model.onnx", "tm"]


@pytest.mark.parametrize("case", ["missing model", "not onnx", "output is a file"])
def test_errors_exit_2_with_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, out = MODEL, tmp_path / "repo"
    if case == "missing model":
        model = tmp_path / "nope.onnx"
    elif case == "not onnx":
        model = tmp_path / "junk.onnx"
        model.write_bytes(b"not a model")
    else:
        out.write_text("a file, not a directory")
    assert cli.main(["triton-repo", str(model), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gru-export: error: ") and err.count("\n") == 1, err
    assert not (out / "timemachine-d2l").exists()
