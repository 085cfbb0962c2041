"""A failure crosses the engine protocol as its status in the one table (gRPC code name, HTTP
status) and message, and is rebuilt on the front end as the table's class for that status."""

from __future__ import annotations

import msgspec
import pytest

from gru_serve.engine import protocol as proto
from gru_serve.ops import errors
from gru_serve.outputs import FailedEvent

# The table as the gRPC and HTTP specifications name it (google.rpc.Code and RFC 9110), written
# out here rather than read from the code under test.
EXPECTED = {
    errors.InvalidArgument: ("INVALID_ARGUMENT", 400),
    errors.ResourceExhausted: ("RESOURCE_EXHAUSTED", 429),
    errors.ResponseTooLarge: ("RESOURCE_EXHAUSTED", 413),
    errors.Unavailable: ("UNAVAILABLE", 503),
    errors.Internal: ("INTERNAL", 500),
}


@pytest.mark.parametrize("kind", list(EXPECTED), ids=lambda k: k.__name__)
def test_an_error_travels_as_its_status_and_comes_back_as_its_class(kind):
    msg = proto.event_out(7, FailedEvent(kind("the limit is max_queue")))
    wire = msgspec.msgpack.decode(proto.encoder.encode(msg))
    assert wire == ["FailedOut", 7, *EXPECTED[kind], "the limit is max_queue"]
    back = proto.event_in(
        proto.from_engine.decode(
            proto.encoder.encode(proto.Batch("m", proto.SchedulerStats(0, 0, 0, 0, 0, 0, 0), [msg]))
        ).events[0],
        None,
        0,
    )
    assert type(back.error) is kind and str(back.error) == "the limit is max_queue"


def test_a_bug_and_an_unknown_status_come_back_as_internal():
    msg = proto.event_out(1, FailedEvent(RuntimeError("boom")))
    assert (msg.code, msg.http) == ("INTERNAL", 500)
    unknown = proto.FailedOut(2, "NO_SUCH_CODE", 599, "what")
    assert type(proto.event_in(unknown, None, 0).error) is errors.Internal
