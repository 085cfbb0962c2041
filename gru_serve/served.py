"""A loaded model as the layers above the engine see it: its name and its contract's metadata,
and the onnxruntime provider names the engine reports for where it runs."""

from __future__ import annotations

from typing import Protocol

from gru_serve.contract import ModelMetadata

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ServedModel(Protocol):
    """What front ends read of a model the engine serves (gru_serve.engine.runtime.ModelRuntime
    is one): they never run it."""

    name: str
    metadata: ModelMetadata
