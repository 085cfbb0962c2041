"""Security of the gates (issue 21): one caller per request (a second `authorization` is
refused), admin tokens for the model repository, errors that hide the server's paths, a
non-ASCII token, deeply nested JSON, and a local server that web pages cannot drive (CSRF, DNS
rebinding). Real servers, real clients (httpx, grpcio, tritonclient.http)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from gru_serve.client import Client
from gru_serve.grpc.generated.inference import grpc_service_pb2 as pb
from gru_serve.grpc.generated.inference import grpc_service_pb2_grpc as pb_grpc
from gru_serve.ops.settings import Settings
from gru_serve.server import ThreadedServer
from gru_serve.shipped import default_model_path
from tests.support.reliability import TALLY, record

MODEL = default_model_path()
NAME = "timemachine-d2l"
DUPLICATE = (("authorization", "Basic eDp5"), ("authorization", "Bearer alice"))


def start(**settings) -> ThreadedServer:
    return ThreadedServer(Settings(port=0, models=(str(MODEL),), **settings), http=True)


def grpc_code(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("secret-place")
    (root / "extra" / "1").mkdir(parents=True)
    shutil.copy(MODEL, root / "extra" / "1" / "model.onnx")
    (root / "broken").mkdir()
    (root / "broken" / "model.onnx").write_bytes(b"not an onnx model")
    return root


@pytest.fixture(scope="module")
def auth_server() -> Iterator[ThreadedServer]:
    srv = start(auth_tokens=("alice", "bob"), max_streams_per_token=1, max_new_tokens=100_000)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def admin_server(repo) -> Iterator[ThreadedServer]:
    srv = start(auth_tokens=("alice", "bob"), admin_tokens=("root",), model_repository=str(repo))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def repo_server(repo) -> Iterator[ThreadedServer]:
    srv = start(model_repository=str(repo))  # auth off: anyone who reaches it loads and unloads
    yield srv
    srv.stop()


# -- finding 1: two authorization headers --


def test_two_authorization_headers_are_refused_over_http_and_grpc(auth_server):
    with httpx.Client(base_url=auth_server.http_target) as h:
        for path, body in (("/v1/sessions", {"text": "the"}), ("/v1/completions", {"prompt": "a"})):
            r = h.post(path, json=body, headers=list(DUPLICATE))
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "UNAUTHENTICATED"
            assert "2 authorization headers" in r.json()["error"]["message"]
            TALLY["duplicate authorization refused"] += 1
        # Either one alone is what it always was: Basic is refused, alice's token accepted.
        assert h.post("/v1/sessions", json={}, headers=[DUPLICATE[0]]).status_code == 401
        assert h.post("/v1/sessions", json={}, headers=[DUPLICATE[1]]).status_code == 201
    with Client(auth_server.target, metadata=DUPLICATE) as twice:
        code, details = grpc_code(lambda: twice.create_session("the"))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "2 authorization headers" in details
    record("duplicate authorization", http_status=400, grpc_code=code.name)


def test_a_second_header_does_not_get_past_the_per_token_stream_limit(auth_server):
    body = {"prompt": "x", "max_tokens": 2, "stream": True}
    with (
        Client(auth_server.target, token="alice") as alice,
        httpx.Client(base_url=auth_server.http_target) as h,
    ):
        held = alice.generate("the time", max_new_tokens=100_000)
        next(held)  # alice's one stream is running (and stays: its reader stops here)
        try:
            over = h.post("/v1/completions", json=body, headers=[DUPLICATE[1]])
            assert over.status_code == 429, over.text  # the limit, for reference
            twice = [h.post("/v1/completions", json=body, headers=list(DUPLICATE)) for _ in range(5)]
        finally:
            held.cancel()
    assert [r.status_code for r in twice] == [400] * 5
    record("per-token stream limit with a second header", limit=1, extra_streams_admitted=0)


# -- finding 5: the model repository needs an admin token --


def test_only_an_admin_token_loads_and_unloads_on_both_transports(admin_server):
    target = admin_server.http_target.removeprefix("http://")
    user = triton_http.InferenceServerClient(target)
    admin = triton_http.InferenceServerClient(target)
    as_alice, as_root = {"authorization": "Bearer alice"}, {"authorization": "Bearer root"}
    try:
        for action in (user.load_model, user.unload_model):
            with pytest.raises(InferenceServerException) as err:
                action(NAME if action == user.unload_model else "extra", headers=as_alice)
            assert err.value.status() == "403" and "--admin-token" in err.value.message()
        assert user.is_model_ready(NAME, headers=as_alice)  # alice cut nobody off
        with grpc.insecure_channel(admin_server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            unload = pb.RepositoryModelUnloadRequest(model_name=NAME)
            alice_md = (("authorization", "Bearer alice"),)
            code, details = grpc_code(lambda: stub.RepositoryModelUnload(unload, metadata=alice_md))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "--admin-token" in details
            load = pb.RepositoryModelLoadRequest(model_name="extra")
            stub.RepositoryModelLoad(load, metadata=(("authorization", "Bearer root"),))
        assert user.is_model_ready("extra", headers=as_alice)
        admin.unload_model("extra", headers=as_root)
        assert not user.is_model_ready("extra", headers=as_alice)
    finally:
        user.close()
        admin.close()
    # An admin token is an ordinary token too.
    with Client(admin_server.target, token="root") as root:
        assert root.create_session("the").tokens_seen == 3
    record("model repository", non_admin="PERMISSION_DENIED", admin="loads and unloads")


def test_with_auth_on_and_no_admin_token_load_and_unload_are_refused(repo):
    srv = start(auth_tokens=("alice",), model_repository=str(repo))
    try:
        with httpx.Client(base_url=srv.http_target, headers={"authorization": "Bearer alice"}) as h:
            for action, model in (("load", "extra"), ("unload", NAME)):
                r = h.post(f"/v2/repository/models/{model}/{action}")
                assert r.status_code == 403, r.text
                assert "this server has none" in r.json()["error"] and "--admin-token" in r.json()["error"]
            assert h.get(f"/v2/models/{NAME}/ready").status_code == 200
    finally:
        srv.stop()


def test_repository_errors_name_the_model_and_relative_path_never_the_folder(repo_server, repo):
    with httpx.Client(base_url=repo_server.http_target) as h:
        missing = h.post("/v2/repository/models/no-such-model/load")
        broken = h.post("/v2/repository/models/broken/load")
        index = h.post("/v2/repository/index").text
    assert missing.status_code == 404 and "'no-such-model'" in missing.json()["error"]
    assert broken.status_code == 400 and "'broken'" in broken.json()["error"]
    assert "broken/model.onnx" in broken.json()["error"] and "broken/model.onnx" in index
    for text in (missing.text, broken.text, index):
        assert str(repo) not in text and repo.name not in text
    record("repository errors", absolute_paths_shown=0)


def test_admin_tokens_are_masked_like_auth_tokens():
    s = Settings(auth_tokens=("alice",), admin_tokens=("root-secret",))
    assert "root-secret" not in s.describe() and "admin_tokens=('***',)" in s.describe()
    assert "root-secret" not in repr(s)
    env = Settings.load({"GRU_SERVE_ADMIN_TOKENS": "a,b"})
    assert env.admin_tokens == ("a", "b")


# -- finding 10: a non-ASCII token --


def test_a_non_ascii_bearer_token_is_401_without_a_traceback(auth_server, caplog):
    caplog.set_level(logging.INFO)
    with httpx.Client(base_url=auth_server.http_target) as h:
        for token in ("Bearer caf\xe9".encode("latin-1"), "Bearer café".encode(), b"Bearer \xff\xfe"):
            r = h.get("/v1/models", headers={"authorization": token})
            assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHENTICATED", r.text
            TALLY["non-ASCII tokens refused"] += 1
    # (grpcio will not send a non-ASCII metadata value: "Illegal header value", client side.)
    no_tracebacks(caplog)
    record("non-ASCII bearer token", http_status=401, tracebacks=0)


# -- finding 11: deeply nested JSON --


@pytest.fixture(scope="module")
def local() -> Iterator[ThreadedServer]:
    srv = start()  # auth off, the local default
    yield srv
    srv.stop()


@pytest.mark.parametrize("depth", [65, 10_000, 200_000])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/sessions"])
def test_deeply_nested_json_is_400_naming_the_limit(local, caplog, path, depth):
    caplog.set_level(logging.INFO)
    body = '{"prompt": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"
    r = httpx.post(local.http_target + path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    assert "deeper than 64 levels" in r.json()["error"]["message"]
    no_tracebacks(caplog)
    TALLY["deeply nested bodies refused"] += 1


def test_json_nested_within_the_limit_is_read_as_before(local):
    body = '{"prompt": "a", "logit_bias": ' + '{"x": ' * 62 + "1" + "}" * 62 + "}"
    r = httpx.post(local.http_target + "/v1/completions", content=body)
    assert r.status_code == 400 and "logit_bias.x" in r.json()["error"]["message"]  # the field, not depth
    record("nested JSON", limit=64, status_past_it=400)


# -- finding 16: web pages cannot drive a local server --


@pytest.mark.parametrize(
    "kind",
    ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data"],
)
def test_a_post_a_web_form_could_send_is_refused_with_auth_off(local, kind):
    body = b'{"prompt": "the time", "max_tokens": 3}'
    with httpx.Client(base_url=local.http_target) as h:
        r = h.post("/v1/completions", content=body, headers={"content-type": kind})
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], r.text
        r = h.post(f"/v2/repository/models/{NAME}/unload", content=b"{}", headers={"content-type": kind})
        assert r.status_code == 415
        assert h.get(f"/v2/models/{NAME}/ready").status_code == 200  # still served
        for ok in ({"content-type": "application/json"}, {}):
            assert h.post("/v1/completions", content=body, headers=ok).status_code == 200
    TALLY["browser-sendable posts refused"] += 2


def test_a_post_from_another_sites_page_is_refused_by_its_origin(local):
    own = local.http_target
    with httpx.Client(base_url=own) as h:
        # A page can post a Blob (no content type at all) to any origin; the browser says whose.
        body = b'{"prompt": "the time", "max_tokens": 3}'
        for origin in ("http://evil.example", "null", "http://localhost:1"):
            r = h.post("/v1/completions", content=body, headers={"origin": origin})
            assert r.status_code == 403 and "origin" in r.json()["error"]["message"], r.text
            r = h.post(f"/v2/repository/models/{NAME}/unload", content=b"{}", headers={"origin": origin})
            assert r.status_code == 403 and "origin" in r.json()["error"], r.text
        same = h.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers={"origin": own})
        assert same.status_code == 200  # the playground's own posts
    record("CSRF with auth off", foreign_origin=403, form_content_types=415)


def test_only_the_allowed_host_names_are_answered(local):
    port = local.server.http_port
    with httpx.Client(base_url=local.http_target) as h:
        for host in (f"rebound.evil.example:{port}", "evil.example", f"192.168.1.2:{port}"):
            assert h.get("/v1/models", headers={"host": host}).status_code == 400, host
            r = h.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers={"host": host})
            assert r.status_code == 400, host
            TALLY["foreign Host headers refused"] += 2
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
            assert h.get("/v1/models", headers={"host": host}).status_code == 200, host
        # Probes come with the prober's Host.
        assert h.get("/v2/health/ready", headers={"host": "10.0.0.7:8000"}).status_code == 200
    record("DNS rebinding", foreign_host=400, loopback_names="localhost, 127.0.0.1, [::1]")


def test_allowed_hosts_is_a_setting():
    srv = start(allowed_hosts=("gru.example",))
    try:
        with httpx.Client(base_url=srv.http_target) as h:
            assert h.get("/v1/models", headers={"host": "gru.example:8000"}).status_code == 200
            assert h.get("/v1/models", headers={"host": "localhost"}).status_code == 400
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="--allowed-host"):
        Settings.load({}, allowed_hosts="gru.*.example")
