"""Session records compared bit for bit, as every store's tests need."""

from __future__ import annotations

import numpy as np

from gru_serve.stores.sessions import SessionRecord


def _meta(r: SessionRecord) -> tuple:
    cps = [(c.turn, c.tokens_seen, c.committed) for c in r.checkpoints]
    return (
        r.session_id,
        r.model,
        r.model_hash,
        r.owner,
        r.tokens_seen,
        r.created,
        r.last_used,
        r.version,
        cps,
    )


def _arrays(r: SessionRecord) -> list[np.ndarray | None]:
    return [r.state, r.logits, *(x for c in r.checkpoints for x in (c.state, c.logits))]


def same(a: SessionRecord, b: SessionRecord) -> None:
    """Equal bit for bit: every float32 (NaN, -0.0 and denormals included) and every time."""
    assert _meta(a) == _meta(b)
    for x, y in zip(_arrays(a), _arrays(b), strict=True):
        if x is None:
            assert y is None
        else:
            assert y.dtype == np.float32 and x.shape == y.shape and x.tobytes() == y.tobytes()
