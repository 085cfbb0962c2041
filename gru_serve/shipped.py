"""The models shipped inside the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_MODEL = "timemachine-d2l"


def models_dir() -> Path:
    return Path(str(resources.files("gru_serve") / "models"))


def shipped_models() -> dict[str, Path]:
    """name -> path of model.onnx, the default model first."""
    found = {p.parent.name: p for p in sorted(models_dir().glob("*/model.onnx"))}
    return dict(sorted(found.items(), key=lambda kv: kv[0] != DEFAULT_MODEL))


def default_model_path() -> Path:
    return models_dir() / DEFAULT_MODEL / "model.onnx"
