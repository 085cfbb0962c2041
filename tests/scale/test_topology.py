"""docker/compose.yaml without containers: Redis, three `gru-serve serve` processes and Envoy
(rendered from docker/envoy.yaml). A session's turns stay on one replica (affinity) and move
when it leaves; sessions survive a SIGKILL mid-stream and a restart of every replica; a
draining replica leaves Envoy's rotation within seconds; the service rides out a Redis outage."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest

from gru_serve.bench.topology import DOCKER, NOT_SERVING, SERVING, Envoy, Replica, Topology, health, wait_for
from gru_serve.client import Client, StreamLost, sampling
from gru_serve.engine.runtime import ModelRuntime
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as pb
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2_grpc as pb_grpc
from gru_serve.launch import free_port
from gru_serve.sampling import SamplingParams
from tests.support.serving import reference_generate

PROMPT = "time traveller"
PARAMS = {
    "greedy": (SamplingParams(), sampling()),
    "seeded": (SamplingParams(temperature=0.8, top_k=10, seed=11), sampling(0.8, 10, None, 11)),
}
LEASE_S = 3.0  # RedisStore's default lease TTL


@pytest.fixture(scope="module")
def runtime() -> ModelRuntime:
    from gru_serve.bench.topology import D2L

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
def test_a_conversation_through_envoy_or_alternating_replicas_gives_the_single_process_output(
    cluster, runtime, kind
):
    ref_params, params = PARAMS[kind]
    expected = reference_generate(runtime, PROMPT, 90, ref_params)
    logged = len(cluster.envoy.upstreams_used())
    with Client(cluster.envoy.target) as c:
        sid = c.create_session(PROMPT).session_id
        parts = [c.generate_text(session_id=sid, max_new_tokens=30, params=params)[0] for _ in range(3)]
        assert c.get_session(sid).tokens_seen == len(PROMPT) + 90
    assert "".join(parts) == expected
    wait_for(lambda: len(cluster.envoy.upstreams_used()) >= logged + 5, 5, "envoy logs the calls")
    turns = cluster.envoy.upstreams_used()[logged + 1 : logged + 5]
    assert len(set(turns)) == 1, f"a session's calls go to one replica: {turns}"

    # By hand, strictly A, B, A, B: the same text (each replica's local copy goes stale and is
    # read again from Redis).
    a, b = (Client(r.target) for r in cluster.replicas[:2])
    with a, b:
        sid = a.create_session(PROMPT).session_id
        parts = [c.generate_text(session_id=sid, max_new_tokens=30, params=params)[0] for c in (b, a, b)]
    assert "".join(parts) == expected


def generate_calls(replica) -> float:
    return replica.metrics().get(
        'gru_serve_requests_total{code="OK",method="/gru_serve.v1.GenerationService/Generate"}', 0.0
    )


def test_affinity_keeps_a_sessions_turns_on_one_replica_and_a_killed_replicas_sessions_move(cluster, runtime):
    sessions, turns, n = 50, 10, 8
    seeds = list(range(sessions))
    reads = {r.name: r.metrics() for r in cluster.replicas}
    on_one = 0
    home: dict[str, object] = {}
    with Client(cluster.envoy.target) as c:
        sids = [c.create_session(PROMPT).session_id for _ in seeds]
        for sid, seed in zip(sids, seeds, strict=True):
            before = [generate_calls(r) for r in cluster.replicas]
            for _ in range(turns):
                c.generate_text(session_id=sid, max_new_tokens=n, params=sampling(0.8, 10, None, seed))
            counts = [generate_calls(r) - b for r, b in zip(cluster.replicas, before, strict=True)]
            on_one += max(counts)
            home[sid] = cluster.replicas[counts.index(max(counts))]
        share = on_one / (sessions * turns)
        assert share >= 0.95, f"{share:.1%} of turns on their session's replica"
        # The local tier answered the turns after each session's first on its replica.
        after = {r.name: r.metrics() for r in cluster.replicas}
        hits = sum(
            after[r.name].get('gru_serve_session_cache_reads_total{result="hit"}', 0)
            - reads[r.name].get('gru_serve_session_cache_reads_total{result="hit"}', 0)
            for r in cluster.replicas
        )
        assert hits >= sessions * (turns - 1)

        victim = max(cluster.replicas, key=lambda r: sum(home[s] is r for s in sids))
        moved = [(sid, seed) for sid, seed in zip(sids, seeds, strict=True) if home[sid] is victim]
        victim.kill()
        for sid, seed in moved:
            text, _ = c.generate_text(session_id=sid, max_new_tokens=n, params=sampling(0.8, 10, None, seed))
            ref = reference_generate(runtime, PROMPT, (turns + 1) * n, SamplingParams(0.8, 10, 1.0, seed))
            assert text == ref[turns * n :], f"session {sid} did not continue exactly"
    print(f"affinity: {share:.1%} of {sessions * turns} turns on one replica; {len(moved)} sessions moved")


def test_envoy_drops_a_draining_replica_within_2_s_and_takes_it_back_when_it_returns(cluster):
    victim = cluster.replicas[0]
    others = {r.target for r in cluster.replicas[1:]}
    with Client(victim.target) as c:
        held = c.generate(PROMPT, max_new_tokens=500_000)  # in flight: the replica drains, not exits
        next(held)
        t0 = time.monotonic()
        victim.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: health(victim.target) == NOT_SERVING, 5, "the replica says NOT_SERVING")
        out = wait_for(lambda: cluster.envoy.healthy() == others, 5, "envoy takes it out", every=0.01)
        taken_out = time.monotonic() - t0
        # New sessions through Envoy meanwhile: served, never by the draining replica.
        logged = len(cluster.envoy.upstreams_used())
        with Client(cluster.envoy.target) as lb:
            for _ in range(10):
                sid = lb.create_session(PROMPT).session_id
                assert lb.generate_text(session_id=sid, max_new_tokens=5)[1].generated_tokens == 5
        wait_for(lambda: len(cluster.envoy.upstreams_used()) >= logged + 20, 5, "envoy logs the calls")
        assert victim.target not in cluster.envoy.upstreams_used()[logged:]
        with pytest.raises(grpc.RpcError):
            for _ in held:
                pass
    assert victim.proc.wait(timeout=30) == 0
    assert taken_out <= 2.0, f"envoy routed to a NOT_SERVING replica for {taken_out:.2f} s"
    victim.start()
    back = wait_for(lambda: victim.target in cluster.envoy.healthy(), 5, "envoy takes it back", every=0.01)
    print(
        f"drain: out of rotation {taken_out:.2f} s after SIGTERM ({out:.2f} s after the replica "
        f"said NOT_SERVING); back in {back:.2f} s after its restart"
    )


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


def test_a_raw_grpc_client_through_envoy_sees_internal_when_its_replica_dies_then_continues(cluster, runtime):
    """Not gru_serve.client: grpcio's generated stub, as any client in any language uses it."""
    with Client(cluster.envoy.target) as c:
        sid = c.create_session(PROMPT).session_id
    header = (("x-session-id", sid),)
    with grpc.insecure_channel(cluster.envoy.target) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        stream = stub.Generate(pb.GenerateRequest(session_id=sid, max_new_tokens=500_000), metadata=header)
        assert next(stream).tokens
        with cluster.redis.client() as r:
            holder = r.get(f"gru:lease:{sid}")
        victim = cluster.replica_of_pid(int(holder.decode().split(":")[-2]))
        victim.kill()
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
        # Envoy had sent the response headers, so it can only reset the stream.
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "RST_STREAM" in err.value.details()
        # A retried call is served by another replica; the session is as last committed, and
        # continues exactly once the dead holder's lease has run out.
        assert stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=header).tokens_seen == len(
            PROMPT
        )
        t0 = time.monotonic()
        while True:
            try:
                replies = list(
                    stub.Generate(pb.GenerateRequest(session_id=sid, max_new_tokens=30), metadata=header)
                )
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.ABORTED and time.monotonic() - t0 < LEASE_S + 5, e
            time.sleep(0.05)
    assert time.monotonic() - t0 <= LEASE_S + 1
    text = "".join(t.text for m in replies for t in m.tokens)
    assert text == reference_generate(runtime, PROMPT, 30)


def test_an_http_completion_and_its_event_stream_through_envoy_are_the_model_files_text(tmp_path, runtime):
    """docker/envoy.yaml's HTTP listener in front of a replica's HTTP port: a completion and the
    same one as an event stream (stream: true) come through whole, with the reference's text."""
    http_port = free_port()
    replica = Replica("gru-serve-http", "memory", tmp_path, "--http-port", str(http_port))
    replica.start()
    envoy = Envoy(tmp_path, [replica.target], [f"127.0.0.1:{http_port}"])
    try:
        envoy.start()
        expected = reference_generate(runtime, PROMPT, 40, SamplingParams())
        with httpx.Client(base_url=f"http://127.0.0.1:{envoy.http_port}", timeout=30) as http:
            wait_for(lambda: http.get("/v2/health/ready").status_code == 200, 10, "Envoy routes HTTP")
            model = http.get("/v1/models").json()["data"][0]["id"]
            body = {"model": model, "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
            whole = http.post("/v1/completions", json=body)
            assert whole.status_code == 200, whole.text
            assert whole.json()["choices"][0]["text"] == expected
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                lines = list(r.iter_lines())
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert "".join(c["text"] for e in events for c in e["choices"]) == expected
        assert "data: [DONE]" in lines
        # Through the HTTP listener to the replica's HTTP port (Envoy's access log).
        upstream = f"upstream=127.0.0.1:{http_port}"
        wait_for(lambda: envoy.access_log.read_text().count(upstream) >= 3, 5, "Envoy logs the requests")
    finally:
        envoy.stop()
        replica.stop()
