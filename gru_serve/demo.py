"""`make demo` before the server existed: stream a greedy continuation in-process."""

from __future__ import annotations

import sys

import numpy as np

from gru_serve.runtime import ModelRuntime
from gru_serve.shipped import default_model_path


def main(prompt: str = "time traveller", tokens: int = 200) -> None:
    rt = ModelRuntime(default_model_path())
    print(f"{rt.metadata.name} on {rt.provider}: ", end="")
    ids = rt.vocab.encode(prompt)
    sys.stdout.write(rt.vocab.decode(ids))
    logits, state = rt.step(np.array([ids], dtype=np.int64), rt.zero_state())
    for _ in range(tokens):
        nxt = int(logits[0, -1].argmax())
        sys.stdout.write(rt.vocab.token(nxt))
        sys.stdout.flush()
        logits, state = rt.step(np.array([[nxt]], dtype=np.int64), state)
    print()


if __name__ == "__main__":
    main()
