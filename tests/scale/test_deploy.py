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
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from grpc_health.v1 import health_pb2

from gru_serve.cli import add_setting_flags, build_parser
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2
from gru_serve.grpc.generated.inference import grpc_service_pb2
from gru_serve.server import LIVENESS
from gru_serve.settings import ENV_PREFIX, Settings

from .conftest import DOCKER, ROOT, free_port, installed_binary, render_envoy_config

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
# Calls that change nothing on the server, so a retry on another replica is safe.
READS = {
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    f"/{SERVICE_NAME}/GetSession",
    f"/{SERVICE_NAME}/ModelInfo",
    *(
        f"/inference.GRPCInferenceService/{m}"
        for m in (
            "ServerLive",
            "ServerReady",
            "ServerMetadata",
            "ModelReady",
            "ModelMetadata",
            "ModelConfig",
            "ModelStatistics",
        )
    ),
}
# Retry conditions under which the replica never saw the request.
UNSENT = {"connect-failure", "refused-stream"}


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


def envoy_conf() -> tuple[dict, dict, dict]:
    """docker/envoy.yaml: its gRPC listener, the HTTP connection manager and cluster gru_serve."""
    conf = yaml.safe_load((DOCKER / "envoy.yaml").read_text())
    (listener,) = conf["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    (cluster,) = conf["static_resources"]["clusters"]
    assert cluster["name"] == "gru_serve"
    return listener, hcm["typed_config"], cluster


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
        text = render_envoy_config(conf.read_text(), ["127.0.0.1:1", "127.0.0.1:2"], free_port(), free_port())
        conf = tmp_path / "envoy.yaml"
        conf.write_text(text)
    cmd = [installed_binary("envoy"), "--mode", "validate", "-c", str(conf), "--log-level", "warn"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_envoy_retries_only_calls_that_are_safe_to_repeat():
    _, hcm, _ = envoy_conf()
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    for path in GRPC_METHODS:
        route = route_of(vhost["routes"], path)
        assert route["timeout"] == "0s", f"{path}: long streams must not be cut off"
        retry_on = set(route.get("retry_policy", {}).get("retry_on", "").split(",")) - {""}
        if path in READS:
            assert "unavailable" in retry_on, f"{path} is a read: retry it on another replica"
        else:
            # Generation and commits are not idempotent: never replayed once a replica had them.
            assert retry_on <= UNSENT, f"{path} may be replayed: {retry_on - UNSENT}"


def test_compose_replicas_envoy_and_prometheus_match_the_server():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services: dict[str, Any] = compose["services"]
    replicas: dict[str, Settings] = {}
    for name, svc in services.items():
        if svc.get("command") and (args := serve_command(svc["command"], f"compose {name}")):
            dockerfile = DOCKER.parent / svc["build"]["dockerfile"]
            assert dockerfile.exists() and svc["build"]["context"] == ".."
            env = gru_env(svc.get("environment", {}), f"compose {name}")
            replicas[name] = effective(args, gru_env(dockerfile_env(dockerfile), dockerfile.name), env)
    assert len(replicas) == 2, "two replicas"
    for name, s in replicas.items():
        store = urlsplit(s.session_store)
        assert store.scheme == "redis" and store.hostname in services, f"{name}: redis is a service"
        assert "redis" in services[store.hostname]["image"]
        assert (store.port or 6379) == 6379
        assert str(s.port) in [str(p) for p in services[name].get("expose", [])]

    listener, hcm, cluster = envoy_conf()
    endpoints = {
        "{address}:{port_value}".format(**e["endpoint"]["address"]["socket_address"])
        for group in cluster["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    }
    assert endpoints == {f"{name}:{s.port}" for name, s in replicas.items()}
    assert cluster["type"] == "STRICT_DNS" and cluster["lb_policy"] == "ROUND_ROBIN"
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


def manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted((DOCKER / "kubernetes").glob("*.yaml")):
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_kubernetes_deployments_probes_and_env_match_the_server():
    docs = manifests()
    deployments = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "Service"}
    servers = {}
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]
        assert selects(dep["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
        for c in pod["spec"]["containers"]:
            argv = [*c.get("command", []), *c.get("args", [])]
            args = serve_command(argv, f"{name}/{c['name']}")
            if args is None:
                continue
            env = gru_env({e["name"]: str(e["value"]) for e in c.get("env", [])}, f"{name}/{c['name']}")
            s = effective(args, dockerfile_env(image_dockerfile(c["image"])), env)
            servers[name] = (dep, c, s)
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
            assert store.scheme == "redis" and any(
                p["port"] == store.port for p in redis_svc["spec"]["ports"]
            )
            assert any(
                selects(redis_svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
                and "redis" in d["spec"]["template"]["spec"]["containers"][0]["image"]
                for d in deployments.values()
            ), "the session store Service selects the Redis pods"
    assert set(servers) == {"gru-serve", "gru-serve-gpu"}

    dep, c, s = servers["gru-serve-gpu"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert image_dockerfile(c["image"]) == RUNTIME_IMAGES["cuda"] and s.device == "cuda"
    assert servers["gru-serve"][2].device == "cpu"

    for name, svc in services.items():
        pods = [
            d
            for d in deployments.values()
            if selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert pods, f"Service {name} selects no Deployment"
        for port in svc["spec"]["ports"]:
            for d in pods:
                named = {
                    p["name"]: p["containerPort"]
                    for cc in d["spec"]["template"]["spec"]["containers"]
                    for p in cc["ports"]
                }
                target = port["targetPort"]
                assert target in named or target in named.values(), f"Service {name}: {target}"
    grpc_svc = services["gru-serve"]["spec"]
    assert selects(grpc_svc["selector"], servers["gru-serve"][0]["spec"]["template"]["metadata"]["labels"])
    assert any(p["port"] == s.port and p["name"] == "grpc" for p in grpc_svc["ports"])

    hpas = [d for _, d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpas and all(h["spec"]["scaleTargetRef"]["name"] in deployments for h in hpas)
    kustomization = yaml.safe_load((DOCKER / "kubernetes" / "kustomization.yaml").read_text())
    assert all((DOCKER / "kubernetes" / r).exists() for r in kustomization["resources"])
