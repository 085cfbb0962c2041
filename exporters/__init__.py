"""Export PyTorch GRU language models to gru-serve's stateful ONNX (see OWN_MODELS.md).

`exporters.export_module(module, path, tokenizer=..., time_major=..., name=...)` exports and
validates any GRU LM module; `exporters.validate_module` checks an exported file against one.
They are imported on first use, so `import exporters` does not load torch.
"""

from typing import Any

__all__ = ["export_module", "validate_module"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from exporters import export

        return getattr(export, name)
    raise AttributeError(f"module 'exporters' has no attribute {name!r}")
