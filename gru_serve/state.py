"""The model's recurrent state: what it is (StateSpec, from the model contract) and the one codec
that turns a state, a batch of states or logits into bytes and back.

Every session store, checkpoint, snapshot, prefix-cache entry and engine message uses it. The
bytes are raw little-endian float32 in C order, one tensor after another in the spec's order (a
batch: each tensor's whole [batch, ...] in turn). A one-tensor state is therefore exactly
``np.asarray(state, '<f4').tobytes()``, the layout earlier gru-serve versions wrote, so their
Redis and SQLite records and snapshot blobs read unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gru_serve.contract import STATE, ModelMetadata
from gru_serve.ops.errors import Internal

DTYPE = np.dtype("<f4")

# A state in memory: a one-tensor state is its array (a GRU's [layers, hidden]); a state of
# several tensors (an LSTM's h and c) is a tuple of arrays in the spec's order. In a batch each
# array has the batch axis first.
State = np.ndarray | tuple[np.ndarray, ...]


class StateSizeError(Internal):
    """Bytes whose length does not fit the shapes they are read with (a corrupt record, another
    model's layout, a bug on the wire); the message names the tensor and both lengths."""


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # without the batch axis

    @property
    def nbytes(self) -> int:
        return DTYPE.itemsize * math.prod(self.shape)


@dataclass(frozen=True)
class StateSpec:
    """The state's tensors, in the order the codec writes them."""

    tensors: tuple[Tensor, ...]

    def __post_init__(self) -> None:
        names = [t.name for t in self.tensors]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"a state has one or more tensors with distinct names, got {names}")
        if any(d < 1 for t in self.tensors for d in t.shape):
            raise ValueError(f"state tensor sizes must be positive: {self.describe()}")

    @classmethod
    def of(cls, meta: ModelMetadata) -> StateSpec:
        """The state the contract gives a model: one tensor, STATE [layers, hidden]."""
        return _contract_spec(meta.num_layers, meta.hidden_size)

    @classmethod
    def single(cls, shape: Sequence[int], name: str = STATE) -> StateSpec:
        return cls((Tensor(name, tuple(int(d) for d in shape)),))

    @classmethod
    def of_shapes(cls, shapes: Sequence[Sequence[int]]) -> StateSpec:
        """Tensors by shape alone (stores keep no names): one is STATE, several STATE0, STATE1..."""
        if len(shapes) == 1:
            return cls.single(shapes[0])
        return cls(tuple(Tensor(f"{STATE}{i}", tuple(int(d) for d in s)) for i, s in enumerate(shapes)))

    @classmethod
    def like(cls, state: State) -> StateSpec:
        """The spec of a state in hand: records carry their own shapes."""
        return cls.of_shapes([a.shape for a in tensors(state)])

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(t.shape for t in self.tensors)

    def describe(self) -> str:
        """The shapes as the stores keep them: "2,64" for one tensor (the form they always had),
        "2,64;2,64" for two."""
        return ";".join(",".join(map(str, t.shape)) for t in self.tensors)

    @classmethod
    def parse(cls, text: str) -> StateSpec:
        return cls.of_shapes([tuple(int(d) for d in part.split(",") if d) for part in text.split(";")])

    def to_json(self) -> list[Any]:
        """The shapes as snapshot headers keep them: [2, 64] for one tensor (the form they always
        had), [[2, 64], [2, 64]] for two."""
        shapes = [list(t.shape) for t in self.tensors]
        return shapes[0] if len(shapes) == 1 else shapes

    @classmethod
    def from_json(cls, shapes: list[Any]) -> StateSpec:
        if all(isinstance(d, int) for d in shapes):
            return cls.single(shapes)
        return cls.of_shapes(shapes)

    def from_bytes(self, data: bytes | memoryview) -> State:
        """The state in `data`; StateSizeError unless it is exactly nbytes long."""
        _check("state", len(data), self.nbytes)
        return self._read(memoryview(data), ())

    def batch_from_bytes(self, data: bytes | memoryview, batch: int | None = None) -> State:
        """A batch of states (each tensor [batch, *shape]); batch None: as many as `data` holds."""
        if batch is None:
            if len(data) % self.nbytes:
                raise StateSizeError(
                    f"state batch: {len(data)} bytes, not a multiple of one state's {self.nbytes}"
                )
            batch = len(data) // self.nbytes
        _check("state batch", len(data), batch * self.nbytes)
        return self._read(memoryview(data), (batch,))

    def _read(self, data: memoryview, lead: tuple[int, ...]) -> State:
        rows, at, out = math.prod(lead), 0, []
        for t in self.tensors:
            n = rows * t.nbytes
            out.append(array_from_bytes(data[at : at + n], (*lead, *t.shape), t.name))
            at += n
        return out[0] if len(out) == 1 else tuple(out)


@functools.cache
def _contract_spec(layers: int, hidden: int) -> StateSpec:
    # Cached (a spec is immutable): the engine client asks for one with every event it dispatches.
    return StateSpec.single((layers, hidden))


def tensors(state: State) -> tuple[np.ndarray, ...]:
    """A state's arrays, in order (one for a one-tensor state)."""
    return state if isinstance(state, tuple) else (state,)


def to_bytes(x: State) -> bytes:
    """A state, a batch of states or logits as bytes: each array raw '<f4' in C order, in turn."""
    return b"".join(np.ascontiguousarray(a, DTYPE).tobytes() for a in tensors(x))


def array_from_bytes(data: bytes | memoryview, shape: Sequence[int], what: str) -> np.ndarray:
    """A float32 array of `shape` (one axis may be -1: as many as `data` holds), writable and
    native-endian; StateSizeError naming `what` unless the length fits."""
    known = DTYPE.itemsize * math.prod(d for d in shape if d != -1)
    if -1 in shape:
        if (len(data) % known) if known else len(data):
            raise StateSizeError(f"{what}: {len(data)} bytes, not a multiple of {known}")
        shape = tuple((len(data) // known if known else 0) if d == -1 else d for d in shape)
    else:
        _check(what, len(data), known)
    return np.frombuffer(data, DTYPE).reshape(shape).astype(np.float32)


def logits_from_bytes(data: bytes | memoryview, vocab: int) -> np.ndarray:
    """One next-token distribution, [vocab]."""
    return array_from_bytes(data, (vocab,), "logits")


def _check(what: str, actual: int, expected: int) -> None:
    if actual != expected:
        raise StateSizeError(f"{what}: {actual} bytes where {expected} were expected")
