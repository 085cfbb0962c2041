"""SamplingParams is one definition for every transport: `checked` holds temperature and top_p at
gRPC's float32 precision whoever builds it (OpenAI's and the inference protocol's JSON carry
doubles), and it crosses to the engine process whole."""

import numpy as np
import pytest

from gru_serve.engine import protocol as proto
from gru_serve.sampling import SamplingParams


@pytest.mark.parametrize("x", [0.7, 0.1, 1.3, 0.123456789])
def test_a_double_is_taken_at_float32_precision(x):
    want = float(np.float32(x))  # what gRPC's float field delivers
    assert want != x  # these doubles are not float32 values
    p = SamplingParams.checked(temperature=x, top_p=min(x, 1.0), seed=1)
    assert p.temperature == want and p.top_p == float(np.float32(min(x, 1.0)))
    assert p == SamplingParams.checked(temperature=np.float32(x), top_p=np.float32(min(x, 1.0)), seed=1)


def test_out_of_range_values_are_reported_as_sent():
    with pytest.raises(Exception, match=r"temperature must be in \[0, 100\], got 1e\+300"):
        SamplingParams.checked(temperature=1e300)


def test_the_engine_protocol_carries_it_whole():
    params = SamplingParams.checked(temperature=0.7, top_k=5, top_p=0.9, seed=(1 << 64) - 1, stop=("a", "\n"))
    msg = proto.Submit(1, "m", b"", b"", None, 3, params, 0, False, [], False, 0, False)
    back = proto.to_engine.decode(proto.encoder.encode(msg))
    assert isinstance(back.params, SamplingParams) and back.params == params
