"""The gate every call of either transport passes: the accepted tokens, the drain that refuses new
calls, and the count of calls in flight that a drain waits for. gRPC's interceptor and the HTTP
front apply it; the server's drain closes it."""

from __future__ import annotations

import asyncio

from gru_serve.ops.auth import Tokens

# Sent with every call a draining server refuses before doing any work: a load balancer may
# replay exactly these on another replica (docker/envoy.yaml retries on it).
REFUSED_HEADER = "x-gru-serve-refused"
DRAINING = "the server is draining: retry on another replica"


class Gate:
    def __init__(self, tokens: Tokens | None = None) -> None:
        self.tokens = tokens or Tokens()  # no tokens: authentication off
        self.draining = False  # set by the server's drain: new calls are refused
        self.in_flight = 0  # calls being served, health checks aside
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self) -> None:
        """A call (of any transport) begins: a drain waits for it."""
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self.idle.set()
