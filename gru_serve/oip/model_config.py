"""Triton's model configuration (`inference.ModelConfig`) for a model of the contract, with
Triton holding the hidden state as sequence-batching state. The server reports it over the
inference protocol's ModelConfig, and `gru-export triton-repo` writes it as config.pbtxt; the
message is built from the generated protobuf classes, so every field name, type and enum value
is checked by construction."""

from __future__ import annotations

import re

from gru_serve.contract import BATCH_AXIS, INPUT_IDS, LOGITS, STATE, STATE_OUT, ModelMetadata
from gru_serve.grpc.generated.inference import model_config_pb2 as mc

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_SEQUENCE_IDLE_US = 60_000_000
# Candidate sequences per model instance, per batch slot: sequences beyond the candidates wait
# in a backlog until a candidate sequence ends or idles out, and a stored state costs only
# layers x hidden floats, so keep several sessions per slot in play.
CANDIDATES_PER_SLOT = 4
# Triton model names are directory names in the repository.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_DATA_TYPES = {"int64": mc.TYPE_INT64, "float32": mc.TYPE_FP32}


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"Triton model name {name!r} must be letters, digits, '_', '.' or '-' "
            "(a directory name), not starting with '.' or '-'"
        )
    return name


def _tensor(meta: ModelMetadata, name: str) -> tuple[int, list[int]]:
    """(Triton data type, dims without the batch axis, -1 for a dynamic axis) of a contract tensor."""
    dtype, shape = meta.expected_shapes()[name]
    assert shape[0] == BATCH_AXIS, f"contract tensor {name} is not batch-first"
    return _DATA_TYPES[dtype], [d if isinstance(d, int) else -1 for d in shape[1:]]


def model_config(
    meta: ModelMetadata,
    name: str,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_sequence_idle_us: int = DEFAULT_MAX_SEQUENCE_IDLE_US,
) -> mc.ModelConfig:
    """Triton's configuration for a model of the contract, with Triton holding the state."""
    check_name(name)
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if max_sequence_idle_us < 1:
        raise ValueError(f"max_sequence_idle_microseconds must be >= 1, got {max_sequence_idle_us}")
    ids_type, ids_dims = _tensor(meta, INPUT_IDS)
    logits_type, logits_dims = _tensor(meta, LOGITS)
    state_type, state_dims = _tensor(meta, STATE)
    out_type, out_dims = _tensor(meta, STATE_OUT)
    assert (state_type, state_dims) == (out_type, out_dims), "state and state_out differ"
    seq = mc.ModelSequenceBatching
    return mc.ModelConfig(
        name=name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=max_batch_size,
        input=[mc.ModelInput(name=INPUT_IDS, data_type=ids_type, dims=ids_dims)],
        output=[mc.ModelOutput(name=LOGITS, data_type=logits_type, dims=logits_dims)],
        sequence_batching=seq(
            max_sequence_idle_microseconds=max_sequence_idle_us,
            oldest=seq.StrategyOldest(max_candidate_sequences=CANDIDATES_PER_SLOT * max_batch_size),
            state=[
                seq.State(
                    input_name=STATE,
                    output_name=STATE_OUT,
                    data_type=state_type,
                    dims=state_dims,
                    initial_state=[
                        seq.InitialState(name="zero", data_type=state_type, dims=state_dims, zero_data=True)
                    ],
                )
            ],
        ),
        instance_group=[
            mc.ModelInstanceGroup(name=f"{name}_gpu", kind=mc.ModelInstanceGroup.KIND_GPU, count=1),
            mc.ModelInstanceGroup(name=f"{name}_cpu", kind=mc.ModelInstanceGroup.KIND_CPU, count=1),
        ],
    )
