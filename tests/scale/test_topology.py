"""docker/compose.yaml without containers: Redis, two `gru-serve serve` processes and Envoy
(rendered from docker/envoy.yaml). Sessions move between replicas, survive a SIGKILL
mid-stream and a restart of every replica, and the service rides out a Redis outage."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc
import pytest

from gru_serve.client import Client, StreamLost, sampling
from gru_serve.runtime import ModelRuntime
from gru_serve.sampling import SamplingParams
from tests.serve.conftest import reference_generate

from .conftest import DOCKER, NOT_SERVING, SERVING, Topology, health, wait_for

PROMPT = "time traveller"
PARAMS = {
    "greedy": (SamplingParams(), sampling()),
    "seeded": (SamplingParams(temperature=0.8, top_k=10, seed=11), sampling(0.8, 10, None, 11)),
}
LEASE_S = 3.0  # RedisStore's default lease TTL


@pytest.fixture(scope="module")
def runtime() -> ModelRuntime:
    from .conftest import D2L

    return ModelRuntime(D2L)


def healthcheck(target: str, service: str = "") -> int:
    """The image's HEALTHCHECK command (docker/healthcheck.py), its exit status."""
    cmd = [sys.executable, str(DOCKER / "healthcheck.py"), target, service]
    return subprocess.run(cmd, capture_output=True, timeout=30).returncode


def generate_when_free(c: Client, sid: str, n: int, params, timeout: float) -> tuple[str, float]:
    """Generate on a session, retrying while another request's lease holds it (bounded)."""
    t0 = time.monotonic()
    while True:
        try:
            text, _ = c.generate_text(session_id=sid, max_new_tokens=n, params=params)
            return text, time.monotonic() - t0
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ABORTED or time.monotonic() - t0 > timeout:
                raise
        time.sleep(0.05)


@pytest.mark.parametrize("kind", PARAMS)
def test_a_conversation_alternating_replicas_gives_the_single_process_output(cluster, runtime, kind):
    ref_params, params = PARAMS[kind]
    expected = reference_generate(runtime, PROMPT, 90, ref_params)
    logged = len(cluster.envoy.upstreams_used())
    with Client(cluster.envoy.target) as c:
        sid = c.create_session(PROMPT).session_id
        parts = [c.generate_text(session_id=sid, max_new_tokens=30, params=params)[0] for _ in range(3)]
        assert c.get_session(sid).tokens_seen == len(PROMPT) + 90
    assert "".join(parts) == expected
    wait_for(lambda: len(cluster.envoy.upstreams_used()) >= logged + 5, 5, "envoy logs the calls")
    generate_calls = cluster.envoy.upstreams_used()[logged + 1 : logged + 4]
    assert set(generate_calls) == {r.target for r in cluster.replicas}, generate_calls

    # And by hand, strictly A, B, A, B: the same text.
    a, b = (Client(r.target) for r in cluster.replicas)
    with a, b:
        sid = a.create_session(PROMPT).session_id
        parts = [c.generate_text(session_id=sid, max_new_tokens=30, params=params)[0] for c in (b, a, b)]
    assert "".join(parts) == expected


def test_sessions_survive_a_restart_of_every_replica(cluster, runtime):
    ref_params, params = PARAMS["seeded"]
    with Client(cluster.envoy.target) as c:
        sid = c.create_session(PROMPT).session_id
        first, _ = c.generate_text(session_id=sid, max_new_tokens=30, params=params)
    for r in cluster.replicas:
        assert r.stop() == 0  # SIGTERM: drained, exit 0
    for r in cluster.replicas:
        r.start()
    with Client(cluster.envoy.target) as c:
        assert c.get_session(sid).tokens_seen == len(PROMPT) + 30
        second, _ = c.generate_text(session_id=sid, max_new_tokens=30, params=params)
    assert first + second == reference_generate(runtime, PROMPT, 60, ref_params)


def test_redis_down_is_unavailable_and_not_serving_then_recovers_without_restarts(cluster, runtime):
    with Client(cluster.envoy.target) as c:
        sid = c.create_session(PROMPT).session_id
    pids = [r.pid for r in cluster.replicas]
    cluster.redis.stop()
    try:
        for r in cluster.replicas:
            with Client(r.target) as c:
                for call in (lambda: c.create_session(PROMPT), lambda: c.generate_text(session_id=sid)):
                    with pytest.raises(grpc.RpcError) as err:
                        call()
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert f"session store {cluster.redis.url} unreachable" in err.value.details()
            wait_for(lambda r=r: health(r.target) == NOT_SERVING, 5, f"{r.name} NOT_SERVING")
            assert health(r.target, "liveness") == SERVING  # alive: no orchestrator restart
            assert healthcheck(r.target) == 1 and healthcheck(r.target, "liveness") == 0
        # Envoy's health checks take both replicas out; with none left it routes to all of them
        # anyway (panic mode), so the caller hears the replica's own answer.
        wait_for(lambda: cluster.envoy.healthy() == set(), 10, "envoy takes both replicas out")
        assert health(cluster.envoy.target) == NOT_SERVING
        with Client(cluster.envoy.target) as c, pytest.raises(grpc.RpcError) as err:
            c.create_session(PROMPT)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # through the load balancer too
        assert f"session store {cluster.redis.url} unreachable" in err.value.details()
    finally:
        cluster.redis.start()  # same port, empty
    for r in cluster.replicas:
        wait_for(lambda r=r: health(r.target) == SERVING, 10, f"{r.name} SERVING again")
        assert healthcheck(r.target) == 0
        with Client(r.target) as c:
            sid = c.create_session(PROMPT).session_id
            text, _ = c.generate_text(session_id=sid, max_new_tokens=20)
        assert text == reference_generate(runtime, PROMPT, 20)
    assert [r.pid for r in cluster.replicas] == pids  # no replica was restarted


@pytest.mark.parametrize("via", ["envoy", "direct"])
def test_sigkill_mid_stream_keeps_the_committed_session_for_the_other_replica(
    cluster: Topology, runtime, via
):
    target = cluster.envoy.target if via == "envoy" else cluster.replicas[0].target
    with Client(target) as c:
        sid = c.create_session(PROMPT).session_id
        stream = c.generate(session_id=sid, max_new_tokens=500_000)
        assert next(stream).tokens  # tokens flow; the session is leased by the replica serving it
        with cluster.redis.client() as r:
            holder = r.get(f"gru:lease:{sid}")
        assert holder is not None, "a streaming session holds a lease"
        victim = cluster.replica_of_pid(int(holder.decode().split(":")[-2]))
        survivor = next(r for r in cluster.replicas if r is not victim)
        victim.kill()

        ended: list[grpc.RpcError] = []

        def drain() -> None:
            try:
                for msg in stream:
                    assert not msg.HasField("finished")
            except grpc.RpcError as e:
                ended.append(e)

        t = threading.Thread(target=drain)
        t.start()
        t.join(30)
        assert ended, "the stream did not end after its replica died"
        lost = ended[0]
        assert lost.code() == grpc.StatusCode.UNAVAILABLE, lost
        if via == "direct":  # the connection drops
            assert not isinstance(lost, StreamLost), lost
        else:
            # Envoy has already sent the response headers, so it can only reset the stream:
            # plain gRPC reads that as INTERNAL, gru_serve.client as UNAVAILABLE (StreamLost).
            assert isinstance(lost, StreamLost), lost
            assert lost.cause.code() == grpc.StatusCode.INTERNAL
            assert "Received RST_STREAM with error code 2" in lost.cause.details()

    with Client(survivor.target if via == "direct" else target) as c:
        # Committed state intact: still just the prompt, on the surviving replica.
        assert c.get_session(sid).tokens_seen == len(PROMPT)
        # Busy until the dead holder's lease runs out, then it continues exactly.
        text, waited = generate_when_free(c, sid, 30, sampling(), timeout=LEASE_S + 5)
        assert waited <= LEASE_S + 1, f"the session stayed busy {waited:.1f} s"
        assert text == reference_generate(runtime, PROMPT, 30)
        assert c.get_session(sid).tokens_seen == len(PROMPT) + 30
