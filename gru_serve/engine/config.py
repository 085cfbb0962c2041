"""The engine's own settings: what a model's runtime and scheduler need, and nothing else (no
tokens, keys or front-end options). The front end builds it from its Settings
(gru_serve.core.models.engine_config) and hands it to a thread-mode scheduler or, as JSON in the
environment, to the engine process."""

from __future__ import annotations

import msgspec


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Each field is the server setting of that name (gru_serve.ops.settings, where its --help
    text is), with the same default."""

    device: str = "auto"
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    io_binding: str = "auto"
    fast_path: str = "on"
    max_batch_size: int = 256
    max_queue: int = 1024
    fused_tokens: int = 64
    round_budget_ms: float = 16.0
    prefill_chunk: int = 512
    log_level: str = "INFO"

    def io_binding_on(self, device: str) -> bool:
        """Whether a scheduler of a model running on `device` decodes with IOBinding."""
        return self.io_binding == "on" or (self.io_binding == "auto" and device == "cuda")


FIELDS = EngineConfig.__struct_fields__
