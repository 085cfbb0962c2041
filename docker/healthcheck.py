#!/usr/bin/env python3
"""Container health check: exit 0 when gru-serve's gRPC health service says SERVING.

Usage: gru-healthcheck [TARGET] [SERVICE]. TARGET defaults to 127.0.0.1:$GRU_SERVE_PORT
(50051), SERVICE to "" (the whole server: NOT_SERVING while the session store is unreachable
or the server drains); "liveness" only asks whether the process answers. Plaintext only: with
--tls-cert use an exec probe that speaks TLS, or Kubernetes' own gRPC probe.
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else f"127.0.0.1:{os.environ.get('GRU_SERVE_PORT', '50051')}"
    service = argv[2] if len(argv) > 2 else ""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=4
            )
        except grpc.RpcError as e:
            print(f"{target}: {e.code().name}: {e.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
