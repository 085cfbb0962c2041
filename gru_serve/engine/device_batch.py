"""A batch's state kept where the model runs (on the GPU under CUDA) between calls, with
IOBinding: FusedBatch for the fused K-token loop, Decoder for the one-token decode step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
import onnxruntime as ort

from gru_serve.contract import INPUT_IDS, LOGITS, STATE, STATE_OUT, ModelMetadata
from gru_serve.graphs.fused import FUSED_OUTPUTS
from gru_serve.sampling import column_feeds


class Sessions(Protocol):
    """What these read of a gru_serve.engine.runtime.ModelRuntime (which makes them)."""

    name: str
    device: str
    metadata: ModelMetadata
    fast_path_note: str
    session: ort.InferenceSession
    decode_session: ort.InferenceSession | None
    fused_session: ort.InferenceSession | None
    fused_single: ort.InferenceSession | None
    take_session: ort.InferenceSession | None
    rebuild_session: ort.InferenceSession | None


class FusedBatch:
    """The fused loop of one batch with IOBinding: the batch's state and the sampler's settings
    stay where the model runs (on the GPU under CUDA) from one round to the next. A round sends
    its tokens and uniforms, and brings back only the sampled tokens; logits and states of
    single rows (those that finish or leave, the logprob rows) are fetched by `rows_logits`
    and `rows_states`. On the CPU the same calls run with CPU OrtValues."""

    def __init__(
        self,
        rt: Sessions,
        state: np.ndarray | ort.OrtValue,
        cols: Mapping[str, np.ndarray],
        session: ort.InferenceSession | None = None,
    ) -> None:
        if rt.fused_session is None or rt.take_session is None:
            raise RuntimeError(f"model {rt.name}: no fused graph ({rt.fast_path_note})")
        self.rt = rt
        self.device = rt.device
        self.batch = state.shape()[0] if isinstance(state, ort.OrtValue) else len(state)
        self.session = session or (rt.fused_single if self.batch == 1 else rt.fused_session)
        # [B, L, H], where the model runs
        self.state = state if isinstance(state, ort.OrtValue) else self._put(state, np.float32)
        # The sampler's columns (gru_serve.sampling.COLUMNS; one not given: its default)
        self._params = {name: self._put(a, a.dtype) for name, a in column_feeds(cols, self.batch).items()}
        self._logits: ort.OrtValue | None = None  # step_logits [K, B, V] of the last run
        self._states: ort.OrtValue | None = None  # step_states [K, B, L, H] of the last run
        self.k = 0

    def _put(self, a: np.ndarray, dtype) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, dtype), self.device, 0)

    def run(self, tokens: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        """Feed tokens [B], then K = uniforms.shape[1] sampled steps (as ModelRuntime.fused).
        Returns sampled [K, B] on the host; the state moves on to the one after step K - 1."""
        b = self.session.io_binding()
        b.bind_ortvalue_input("tokens", self._put(tokens, np.int64))
        b.bind_ortvalue_input(STATE, self.state)
        for name, value in self._params.items():
            b.bind_ortvalue_input(name, value)
        b.bind_ortvalue_input("uniforms", self._put(uniforms, np.float64))
        b.bind_output(FUSED_OUTPUTS[0], "cpu")
        b.bind_output(FUSED_OUTPUTS[1], self.device)
        b.bind_output(FUSED_OUTPUTS[2], self.device)
        self.session.run_with_iobinding(b)
        sampled, self._logits, self._states = b.get_outputs()
        self.k = uniforms.shape[1]
        last = np.stack([np.full(self.batch, self.k - 1), np.arange(self.batch)], axis=1)
        self.state = self._take(self._states, last, self.device)
        return sampled.numpy()

    def _take(self, x: ort.OrtValue, index: np.ndarray, where: str) -> ort.OrtValue:
        """x[index[i, 0], index[i, 1]] for each i, on `where`."""
        session = self.rt.take_session
        b = session.io_binding()
        b.bind_ortvalue_input("x", x)
        b.bind_ortvalue_input("index", self._put(index, np.int64))
        b.bind_output("rows", where)
        session.run_with_iobinding(b)
        return b.get_outputs()[0]

    def rows_logits(self, pairs: list[tuple[int, int]]) -> np.ndarray:
        """step_logits[k, i] of the last run for each (k, i), on the host: [len(pairs), V]."""
        assert self._logits is not None
        return self._take(self._logits, np.array(pairs, np.int64).reshape(-1, 2), "cpu").numpy()

    def rows_states(self, pairs: list[tuple[int, int]]) -> np.ndarray:
        """step_states[k, i] of the last run for each (k, i), on the host: [len(pairs), L, H]."""
        assert self._states is not None
        return self._take(self._states, np.array(pairs, np.int64).reshape(-1, 2), "cpu").numpy()

    def host_state(self) -> np.ndarray:
        """The whole current state [B, L, H] on the host."""
        return self.state.numpy()

    def rebuild(self, order: np.ndarray, new_rows: np.ndarray) -> ort.OrtValue:
        """A state for another batch, without leaving the device: row j is this batch's row
        order[j] when order[j] < B, else new_rows[order[j] - B] (new_rows [N, L, H] from the host)."""
        session = self.rt.rebuild_session
        assert session is not None
        b = session.io_binding()
        b.bind_ortvalue_input("x", self.state)
        b.bind_ortvalue_input("extra", self._put(new_rows, np.float32))
        b.bind_ortvalue_input("order", self._put(order, np.int64))
        b.bind_output("rows", self.device)
        session.run_with_iobinding(b)
        return b.get_outputs()[0]

    def with_members(
        self,
        order: np.ndarray,
        new_rows: np.ndarray,
        cols: Mapping[str, np.ndarray],
    ) -> FusedBatch:
        """The FusedBatch of the batch whose rows `order` and `new_rows` give (see rebuild)."""
        return FusedBatch(self.rt, self.rebuild(order, new_rows), cols)


class Decoder:
    """The decode step of one batch with IOBinding: preallocated ids and logits buffers and a
    double-buffered state that stays where the model runs (on the GPU under CUDA), so a step
    copies only token ids in and logits out."""

    def __init__(self, rt: Sessions, state: np.ndarray) -> None:
        self.rt = rt
        self.batch = state.shape[0]
        self.session = rt.decode_session or rt.session
        self.ids = np.zeros((self.batch, 1), np.int64)
        self.logits = np.zeros((self.batch, 1, rt.metadata.vocab_size), np.float32)
        device = rt.device
        if device == "cpu":
            self._host = [np.array(state, np.float32, order="C"), np.empty_like(state, np.float32)]
            self._states = [ort.OrtValue.ortvalue_from_numpy(h) for h in self._host]
        else:
            self._host = []
            self._states = [
                ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(state, np.float32), device, 0),
                ort.OrtValue.ortvalue_from_shape_and_type(state.shape, np.float32, device, 0),
            ]
        ids, logits = (
            ort.OrtValue.ortvalue_from_numpy(self.ids),
            ort.OrtValue.ortvalue_from_numpy(self.logits),
        )
        self._bindings = []
        for src in (0, 1):
            b = self.session.io_binding()
            b.bind_ortvalue_input(INPUT_IDS, ids)
            b.bind_ortvalue_input(STATE, self._states[src])
            b.bind_ortvalue_output(LOGITS, logits)
            b.bind_ortvalue_output(STATE_OUT, self._states[1 - src])
            self._bindings.append(b)
        self._cur = 0

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed tokens [B]; returns the logits [B, V] (a view, overwritten by the next step)."""
        self.ids[:, 0] = tokens
        self.session.run_with_iobinding(self._bindings[self._cur])
        self._cur = 1 - self._cur
        return self.logits[:, 0]

    def state(self) -> np.ndarray:
        """The batch's state [B, L, H] (on CPU a view, overwritten by the next step)."""
        if self._host:
            return self._host[self._cur]
        return self._states[self._cur].numpy()

    def load(self, state: np.ndarray) -> None:
        if self._host:
            np.copyto(self._host[self._cur], state)
        else:
            self._states[self._cur].update_inplace(np.ascontiguousarray(state, np.float32))
