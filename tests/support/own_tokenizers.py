"""Independent references for models that bring their own tokenizer."""

from pathlib import Path

import numpy as np
import onnxruntime as ort

from gru_serve.client import Client
from gru_serve.reference import step_generate
from gru_serve.sampling import SamplingParams


def reference_ids(path: Path, backend, prompt: str, n: int, params: SamplingParams) -> list[int]:
    """The ONNX file as written, in a bare onnxruntime session: the prompt (encoded by the
    `tokenizers` library) prefilled in one call, then one token per call, state chained."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    shape = (1, int(meta["gru_serve.num_layers"]), int(meta["gru_serve.hidden_size"]))
    ids = backend.encode(prompt, add_special_tokens=False).ids

    def step(x: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, state = session.run(["logits", "state_out"], {"input_ids": x, "state": state})
        return logits, state

    out, _, _ = step_generate(step, ids, np.zeros(shape, np.float32), params, n)
    return out


def stream(client: Client, prompt: str, **kw) -> tuple[list[int], list[str], object]:
    ids, texts, finished = [], [], None
    for msg in client.generate(prompt, **kw):
        ids += [t.id for t in msg.tokens]
        texts += [t.text for t in msg.tokens]
        if msg.HasField("finished"):
            finished = msg.finished
    return ids, texts, finished
