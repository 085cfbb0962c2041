"""Hypothesis settings and the status-code oracle the bad-input tests share."""

import grpc
from hypothesis import HealthCheck, settings

OK = "OK"
RUN = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def code_of(call) -> str:
    try:
        call()
        return OK
    except grpc.RpcError as e:
        assert e.code() != grpc.StatusCode.INTERNAL and e.code() != grpc.StatusCode.UNKNOWN, e.details()
        return e.code().name
