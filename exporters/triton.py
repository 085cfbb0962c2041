"""Write a Triton Inference Server model repository for an exported model.

    REPO/<name>/config.pbtxt
    REPO/<name>/1/model.onnx

Triton keeps each sequence's hidden state itself (implicit state management): the graph's
`state` input and `state_out` output are declared as sequence-batching state, not as model
inputs and outputs, so a client sends only `input_ids` with a sequence id and gets `logits`.
The configuration is gru_serve.oip.model_config's (the server reports the same one over the
inference protocol), printed in protobuf text format.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf import text_format

from gru_serve.contract import INPUT_IDS, LOGITS, STATE, STATE_OUT, ContractError, ModelMetadata, read_model
from gru_serve.grpc.generated.inference import model_config_pb2 as mc
from gru_serve.oip.model_config import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_SEQUENCE_IDLE_US,
    check_name,
    model_config,
)

VERSION = "1"
MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"


@dataclass(frozen=True)
class TritonRepository:
    model_dir: Path
    config_path: Path
    model_path: Path
    config: mc.ModelConfig


def render(config: mc.ModelConfig, meta: ModelMetadata) -> str:
    """config.pbtxt: a comment that says why it is so, then the message in text format."""
    layers_hidden = f"[{meta.num_layers}, {meta.hidden_size}]"
    header = f"""\
# Triton model configuration written by `gru-export triton-repo` for {meta.name!r}
# (GRU LM, {meta.num_layers} x {meta.hidden_size} hidden, vocabulary {meta.vocab_size}).
#
# Stateful model, implicit state: Triton stores each sequence's hidden state. The graph's
# '{STATE}' input and '{STATE_OUT}' output are the sequence_batching state below (dims
# {layers_hidden}, without the batch axis), not model inputs/outputs: a request carries only
# '{INPUT_IDS}' [batch, seq] with sequence_id / sequence_start / sequence_end, and gets
# '{LOGITS}'. A sequence starts from a zero state (initial_state zero_data), so the model needs
# no START/READY control inputs. Send sequence_end on a sequence's last request to free its state.
#
# Batching: Triton does not allow dynamic_batching together with sequence_batching; the
# sequence batcher's 'oldest' strategy is its dynamic batcher for sequences: it batches the
# oldest pending request of each candidate sequence (at most one request per sequence).
# Requests batch together only when their shapes match (e.g. one new token each).
#
# Instances: one on the GPU, one on the CPU; Triton fails to load the model on a machine
# without a GPU, so remove the KIND_GPU group there.
"""
    return header + "\n" + text_format.MessageToString(config)


def load_model(path: Path) -> ModelMetadata:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # onnx raises DecodeError, ValidationError, ... on bad files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ContractError(f"{path} is not a valid ONNX model: {msg}") from e
    return read_model(model)


def _write_atomically(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_repository(
    model_path: Path,
    repo: Path,
    name: str | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_sequence_idle_us: int = DEFAULT_MAX_SEQUENCE_IDLE_US,
) -> TritonRepository:
    """Write (or overwrite) REPO/<name>/config.pbtxt and REPO/<name>/1/model.onnx.

    The model name defaults to the model's metadata name. A missing model or an unwritable
    repository raises OSError; a model that breaks the contract raises ContractError.
    """
    model_path, repo = Path(model_path), Path(repo)
    meta = load_model(model_path)
    if name is None:
        try:
            name = check_name(meta.name)
        except ValueError as e:
            raise ContractError(f"model metadata 'gru_serve.name': {e}; give a name") from e
    config = model_config(meta, name, max_batch_size, max_sequence_idle_us)
    model_dir = repo / name
    try:
        (model_dir / VERSION).mkdir(parents=True, exist_ok=True)
        target = model_dir / VERSION / MODEL_FILE
        _write_atomically(target, lambda tmp: shutil.copyfile(model_path, tmp))
        config_path = model_dir / CONFIG_FILE
        text = render(config, meta)
        _write_atomically(config_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as e:
        raise OSError(
            f"cannot write the Triton repository {repo}: "
            f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}"
        ) from e
    return TritonRepository(model_dir, config_path, target, config)


def parse_name(text: str) -> str:
    """argparse type for --name."""
    try:
        return check_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def parse_positive_int(text: str) -> int:
    """argparse type for sizes and durations."""
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from e
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
