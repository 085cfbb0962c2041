"""docker/kubernetes/deployment.yaml's pod, as far as one machine can be it: `gru-serve serve` with
the Deployment's command and environment (the Secret's values made up) in a mount namespace
where the root file system is read-only (readOnlyRootFilesystem) and only the Deployment's
emptyDir mountPaths are writable (tmpfs). It must start its engine process, be SERVING against a
password-protected Redis run with the Redis Deployment's arguments, and generate what the model
file says; without the emptyDir at /tmp the same run must fail, so the read-only root is real."""

from __future__ import annotations

import os
import re
import secrets
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
import redis
import yaml

from gru_serve.bench.topology import D2L, DOCKER, SERVING, health, wait_for
from gru_serve.client import Client
from gru_serve.launch import free_port, ready_target
from gru_serve.sampling import SamplingParams
from tests.support.binaries import installed_binary
from tests.support.serving import reference_generate

KUBE = DOCKER / "kubernetes"
PROMPT = "time traveller"
TOKENS = 24
# Made-up values of the Secret gru-serve-secrets (kustomization.yaml's `kubectl create secret`).
SECRET = {
    "redis-password": secrets.token_hex(16),
    "auth-tokens": "tenant-token-1\ntenant-token-2\n",
    "admin-tokens": "admin-token-1\n",
}
START_TIMEOUT_S = 180.0


def unshare_error() -> str:
    """Why this machine cannot run the test ('' when it can): a private mount namespace in
    which / is remounted read-only (a bind remount: the host's root stays writable)."""
    if shutil.which("unshare") is None:
        return "no unshare binary"
    r = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "mount", "-o", "remount,ro,bind", "/"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return "" if r.returncode == 0 else f"unshare -m / mount not permitted: {r.stderr.strip()}"


pytestmark = pytest.mark.skipif(bool(reason := unshare_error()), reason=reason or "-")


def deployment(path: Path, name: str) -> dict:
    (dep,) = [
        d
        for d in yaml.safe_load_all(path.read_text())
        if d and d["kind"] == "Deployment" and d["metadata"]["name"] == name
    ]
    return dep


def container_env(c: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it: values, secretKeyRef values (from
    SECRET) and $(VAR) references to variables defined above them."""
    env: dict[str, str] = {}
    for e in c.get("env", []):
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "gru-serve-secrets", ref
            env[e["name"]] = SECRET[ref["key"]]
        else:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), str(e["value"]))
    return env


def pod_mounts(dep: dict, c: dict) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The container's emptyDir mountPaths, and each secret volume's mountPath: {file: key}."""
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"].get("volumes", [])}
    empty, secret = [], {}
    for m in c.get("volumeMounts", []):
        v = volumes[m["name"]]
        if "emptyDir" in v:
            empty.append(m["mountPath"])
        elif "secret" in v:
            items = v["secret"].get("items") or [{"key": k, "path": k} for k in SECRET]
            secret[m["mountPath"]] = {i["path"]: i["key"] for i in items}
    return empty, secret


@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory) -> Iterator[int]:
    """redis-server with the Redis Deployment's command and arguments (the password expanded
    from the made-up Secret) on a loopback port."""
    dep = deployment(KUBE / "redis.yaml", "gru-serve-redis")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = container_env(c)
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in [*c.get("command", []), *c["args"]]]
    if argv[0] == "redis-server":
        argv = argv[1:]
    port = free_port()
    tmp = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [installed_binary("redis-server"), *argv, "--port", str(port), "--bind", "127.0.0.1"],
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def answers() -> bool:
        with redis.Redis(port=port, socket_timeout=1) as r:
            try:
                r.ping()
            except redis.AuthenticationError:
                return True
            except redis.ConnectionError:
                return False
            return True

    try:
        wait_for(lambda: proc.poll() is not None or answers(), 10, "redis-server answers")
        assert proc.poll() is None, "redis-server refused the Redis Deployment's arguments"
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def secret_dir() -> Iterator[Path]:
    """The Secret's files, standing in for its volume. In /dev/shm, a mount of its own (as in a
    pod), since a tmpfs over /tmp hides pytest's temporary folders from the server."""
    folder = Path(tempfile.mkdtemp(prefix="gru-serve-secret-", dir="/dev/shm"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def pod_command(dep: dict, redis_port: int, secret_dir: Path, with_empty_dirs: bool) -> tuple[list, dict]:
    """The container's command in a mount namespace shaped like the pod, and its environment.
    Only what a shared test machine forces changes: loopback addresses and free ports, the Redis
    host, and Secret paths pointing at `secret_dir`."""
    (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "gru-serve"]
    assert dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"]
    env = container_env(c)
    empty, secret_mounts = pod_mounts(dep, c)
    for mount_path, files in secret_mounts.items():
        for path, key in files.items():
            (secret_dir / path).write_text(SECRET[key])
        for name, value in env.items():
            if value.startswith(mount_path.rstrip("/") + "/"):
                env[name] = str(secret_dir / value[len(mount_path.rstrip("/")) + 1 :])
    store = urlsplit(env["GRU_SERVE_SESSION_STORE"])
    netloc = store.netloc.replace(f"{store.hostname}:{store.port}", f"127.0.0.1:{redis_port}")
    env["GRU_SERVE_SESSION_STORE"] = store._replace(netloc=netloc).geturl()
    env.update(
        GRU_SERVE_HOST="127.0.0.1",
        GRU_SERVE_PORT=str(free_port()),
        GRU_SERVE_HTTP_PORT=str(free_port()),
        GRU_SERVE_METRICS_PORT=str(free_port()),
    )
    argv = [*c.get("command", []), *c.get("args", [])]
    assert argv[:2] == ["gru-serve", "serve"]
    server = [sys.executable, "-m", "gru_serve.cli", *argv[1:]]
    writable = empty if with_empty_dirs else []
    script = " && ".join([*code_kept_over(writable, secret_dir), "exec " + shlex.join(server)])
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script], {**base, **env}


def code_kept_over(writable: list[str], hold: Path) -> list[str]:
    """Shell steps: / read-only, a tmpfs at each writable path. In a pod the code lives in the
    image; here the checkout and its Python may lie under one of those paths (a clone in /tmp),
    so they are bind-mounted aside first and back, read-only, over the tmpfs."""
    code = {Path(__file__).resolve().parents[2], Path(sys.prefix), Path(sys.base_prefix)}
    under = [shlex.quote(str(c)) for c in sorted(code) if any(c.is_relative_to(w) for w in writable)]
    aside = [shlex.quote(str(hold / f"code{i}")) for i in range(len(under))]
    pairs = list(zip(under, aside, strict=True))
    steps = [f"mkdir -p {a} && mount --bind {c} {a}" for c, a in pairs]
    steps += ["mount -o remount,ro,bind /"]
    steps += [f"mount -t tmpfs -o size=64m tmpfs {shlex.quote(w)}" for w in writable]
    steps += [f"mkdir -p {c} && mount --bind {a} {c} && mount -o remount,ro,bind {c}" for c, a in pairs]
    return steps


def start(cmd: list[str], env: dict, log: Path) -> tuple[subprocess.Popen, str | None]:
    """The process and the target its ready line names (None: it exited, or said nothing)."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, cwd="/")
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            return proc, ready_target(line) if line else None
        if proc.poll() is not None:
            return proc, None
    return proc, None


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_deployment_serves_with_a_read_only_root_and_only_its_empty_dirs_writable(
    redis_with_password, secret_dir, tmp_path
):
    dep = deployment(KUBE / "deployment.yaml", "gru-serve")
    cmd, env = pod_command(dep, redis_with_password, secret_dir, with_empty_dirs=True)
    proc, target = start(cmd, env, tmp_path / "server.log")
    log = lambda: (tmp_path / "server.log").read_text()  # noqa: E731
    try:
        assert target is not None, f"the server did not start on a read-only root:\n{log()}"
        # SERVING: the engine answers and Redis accepted the password from the Secret.
        wait_for(lambda: health(target) == SERVING, 30, "the server is SERVING")
        expected = reference_generate(D2L, PROMPT, TOKENS, SamplingParams())
        with Client(target, token="tenant-token-2") as c:
            text, _ = c.generate_text(PROMPT, max_new_tokens=TOKENS)
        assert text == expected
        # The tokens came from the Secret's file: a call without one is refused.
        with Client(target) as c, pytest.raises(grpc.RpcError) as err:
            c.generate_text(PROMPT, max_new_tokens=1)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stop(proc)
    assert SECRET["redis-password"] not in log(), "the Redis password reached the log"


def test_the_same_run_without_an_empty_dir_at_tmp_fails(redis_with_password, secret_dir, tmp_path):
    """The control: the read-only root is real, and /tmp is what the server needs."""
    dep = deployment(KUBE / "deployment.yaml", "gru-serve")
    cmd, env = pod_command(dep, redis_with_password, secret_dir, with_empty_dirs=False)
    proc, target = start(cmd, env, tmp_path / "server.log")
    stop(proc)
    assert target is None and proc.returncode != 0
    # Whichever write comes first fails: a temporary file while loading, or the engine's folder.
    log = (tmp_path / "server.log").read_text()
    assert re.search(r"Read-only file system|No usable temporary directory", log), log
