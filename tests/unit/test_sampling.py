import numpy as np
import pytest

from gru_serve.ops.errors import InvalidArgument
from gru_serve.sampling import SamplingParams, sample, uniforms


def rows(n, **kw):
    return [np.full(n, kw.get(k, d)) for k, d in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0))]


def test_greedy_rows_take_the_argmax():
    logits = np.random.default_rng(0).normal(size=(5, 28)).astype(np.float32)
    t, k, p = rows(5, temperature=0.0)
    assert (sample(logits, t, k, p, np.full(5, 0.5)) == logits.argmax(1)).all()


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = np.random.default_rng(1).normal(size=(64, 28))
    u = uniforms(np.arange(64, dtype=np.uint64), np.zeros(64, np.uint64))
    assert (sample(logits, *rows(64, top_k=1), u) == logits.argmax(1)).all()
    assert (sample(logits, *rows(64, top_p=1e-6), u) == logits.argmax(1)).all()


def test_draws_follow_the_softmax():
    logits = np.log(np.array([[0.5, 0.3, 0.2]]))
    n = 20_000
    u = uniforms(np.full(n, 3, np.uint64), np.arange(n, dtype=np.uint64))
    draws = sample(np.repeat(logits, n, 0), *rows(n), u)
    freq = np.bincount(draws, minlength=3) / n
    assert np.allclose(freq, [0.5, 0.3, 0.2], atol=0.015)


def test_top_k_and_top_p_restrict_the_support():
    logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1]]))
    n = 2000
    u = uniforms(np.full(n, 5, np.uint64), np.arange(n, dtype=np.uint64))
    assert set(sample(np.repeat(logits, n, 0), *rows(n, top_k=2), u)) == {0, 1}
    assert set(sample(np.repeat(logits, n, 0), *rows(n, top_p=0.65), u)) == {0, 1}


def test_a_row_does_not_depend_on_its_batch():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(32, 28))
    t = rng.uniform(0, 2, 32)
    k = rng.integers(0, 10, 32)
    p = rng.uniform(0.1, 1, 32)
    u = uniforms(np.arange(32, dtype=np.uint64), np.full(32, 9, np.uint64))
    batched = sample(logits, t, k, p, u)
    alone = [
        sample(logits[i : i + 1], t[i : i + 1], k[i : i + 1], p[i : i + 1], u[i : i + 1])[0]
        for i in range(32)
    ]
    assert list(batched) == alone


def test_uniforms_are_deterministic_and_spread():
    u = uniforms(np.full(10_000, 7, np.uint64), np.arange(10_000, dtype=np.uint64))
    assert np.array_equal(u, uniforms(np.full(10_000, 7, np.uint64), np.arange(10_000, dtype=np.uint64)))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_checked_names_the_bad_field(kwargs, field):
    with pytest.raises(InvalidArgument, match=f"sampling.{field}"):
        SamplingParams.checked(**kwargs)


def test_unseeded_requests_get_a_random_seed():
    assert SamplingParams.checked().seed != SamplingParams.checked().seed


@pytest.mark.parametrize("t", [1e-320, 1e-40, 9e-6])
def test_a_vanishing_temperature_is_greedy(t):
    """JSON carries temperatures far below float32's range; dividing by one overflowed the
    logits into NaN probabilities (found by the HTTP property test)."""
    assert SamplingParams.checked(temperature=t).temperature == 0.0
    logits = np.random.default_rng(0).normal(size=(4, 28)).astype(np.float32)
    params = SamplingParams.checked(temperature=t)
    row = np.full(4, params.temperature)
    got = sample(logits, row, np.zeros(4, np.int64), np.ones(4), np.full(4, 0.5))
    assert (got == logits.argmax(axis=1)).all()
