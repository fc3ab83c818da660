"""k8s/: every kustomization renders; the objects pass Kubernetes' and KubeRay's schemas in
strict mode; and the manifests agree with the CLI and config they run.

Offline and fast: `kubectl kustomize` renders, `kubernetes-validate` checks the core kinds
(and the pod templates inside the RayCluster), `jsonschema` checks RayClusters against
KubeRay's CRD, read from $KUBERAY_CRD_SCHEMA (default ../shared/k8s-schemas/ from the
repository root). Each part skips, saying why, where its tool or schema is missing.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

from cluster.cli import _cluster_config, build_parser
from cluster.cluster_config import ClusterConfig

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
TARGETS = ["base", "overlays/cpu-demo", "overlays/gpu"]
# The Kubernetes version to validate against (kubectl's here); kubernetes-validate >= 1.32
# ships its schemas.
K8S_VERSION = "1.32.0"
CRD_SCHEMA = Path(os.environ.get(
    "KUBERAY_CRD_SCHEMA", REPO.parent / "shared" / "k8s-schemas" / "ray.io_rayclusters.yaml"))
ROLES = ("prefill", "decode")
METRICS_PORT = 8080
# What KubeRay does that the manifests rely on (ray-operator/controllers/ray/common/pod.go).
KUBERAY_GCS_PORT = 6379
KUBERAY_AGENT_PORT = 52365
RAY_TMP = "/tmp/ray"


def pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomli on 3.10")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl is not installed: it renders k8s/ with its built-in kustomize")


# --- rendering ------------------------------------------------------------------------


@functools.cache
def _render(target: str) -> tuple[dict, ...]:
    done = subprocess.run(["kubectl", "kustomize", str(K8S / target)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {target} failed:\n{done.stderr}"
    return tuple(obj for obj in yaml.safe_load_all(done.stdout) if obj)


def render(target: str) -> list[dict]:
    return copy.deepcopy(list(_render(target)))


def only(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def the(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in only(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_templates(cluster: dict) -> list[tuple[str, dict, dict]]:
    """(group name, group spec, pod template) for the head group and each worker group."""
    spec = cluster["spec"]
    groups = [("headgroup", spec["headGroupSpec"], spec["headGroupSpec"]["template"])]
    groups += [(g["groupName"], g, g["template"]) for g in spec["workerGroupSpecs"]]
    return groups


def pod_labels(cluster: dict, group: str, template: dict) -> dict[str, str]:
    """The labels KubeRay gives a pod of this group (labelPod in KubeRay's pod.go)."""
    node_type = "head" if group == "headgroup" else "worker"
    return {**template.get("metadata", {}).get("labels", {}), "ray.io/is-ray-node": "yes",
            "ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": node_type,
            "ray.io/group": group}


def selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is checked here: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("target", TARGETS)
@needs_kubectl
def test_kustomize_renders(target):
    objs = render(target)
    kinds = sorted(o["kind"] for o in objs)
    expected = ["ConfigMap", "NetworkPolicy", "NetworkPolicy", "PodDisruptionBudget",
                "PodDisruptionBudget", "PodDisruptionBudget", "RayCluster", "Service"]
    if target.endswith("gpu"):
        expected = sorted([*expected, "PersistentVolumeClaim"])
    assert kinds == expected
    keys = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(keys) == len(set(keys))
    cluster = the(objs, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    # KubeRay's own checks (utils/validation.go): a DNS-1035 name of at most 53 characters.
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", cluster["metadata"]["name"])
    assert len(cluster["metadata"]["name"]) <= 53


# --- schemas --------------------------------------------------------------------------


def kubernetes_validate():
    return pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (pip install kubernetes-validate, or "
               "the test extra): it holds the Kubernetes schemas for offline validation")


def as_pod_template(group: str, template: dict) -> dict:
    """A RayCluster's pod template as a core PodTemplate, for Kubernetes' own schema."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group},
            "template": template}


@pytest.mark.parametrize("target", TARGETS)
@needs_kubectl
def test_core_objects_validate_strictly(target):
    kv = kubernetes_validate()
    objs = render(target)
    for obj in objs:
        if obj["kind"] == "RayCluster":
            # kubernetes-validate has no schema for custom resources (it only warns);
            # they are checked against KubeRay's CRD below.
            with pytest.raises(kv.SchemaNotFoundError):
                kv.validate(obj, K8S_VERSION, strict=True)
            for group, _, template in pod_templates(obj):
                kv.validate(as_pod_template(group, template), K8S_VERSION, strict=True)
        else:
            kv.validate(obj, K8S_VERSION, strict=True)


def strict_schema(schema):
    """Forbid unknown fields wherever the schema lists the known ones, as the API server's
    strict field validation does, except where the CRD preserves unknown fields."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) if k != "properties" else
           {name: strict_schema(sub) for name, sub in v.items()} for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def _raycluster_validator():
    jsonschema = pytest.importorskip(
        "jsonschema", reason="jsonschema is not installed (the test extra has it)")
    if not CRD_SCHEMA.is_file():
        pytest.skip(f"KubeRay's RayCluster CRD is not at {CRD_SCHEMA}: set KUBERAY_CRD_SCHEMA "
                    "to ray.io_rayclusters.yaml from ray-project/kuberay "
                    "(ray-operator/config/crd/bases/)")
    crd = yaml.safe_load(CRD_SCHEMA.read_text())
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["group"] == "ray.io"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict_schema(version["schema"]["openAPIV3Schema"])
    # OpenAPI v3.0 schemas are JSON Schema draft 4 with extensions (x-kubernetes-*).
    return jsonschema.Draft4Validator(schema)


def raycluster_validator():
    try:
        return _raycluster_validator()
    except pytest.skip.Exception:
        _raycluster_validator.cache_clear()
        raise


def crd_errors(obj: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in raycluster_validator().iter_errors(obj)]


@pytest.mark.parametrize("target", TARGETS)
@needs_kubectl
def test_raycluster_validates_against_the_kuberay_crd(target):
    cluster = the(render(target), "RayCluster")
    assert crd_errors(cluster) == []


def _misspell(obj: dict, path: list, wrong: str) -> dict:
    obj = copy.deepcopy(obj)
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[wrong] = node.pop(path[-1])
    return obj


HEAD_TEMPLATE = ["spec", "headGroupSpec", "template"]
ROUTER = [*HEAD_TEMPLATE, "spec", "containers", 1]


@pytest.mark.parametrize("path,wrong", [
    (["spec", "headGroupSpec", "rayStartParams"], "rayStartParam"),
    (["spec", "workerGroupSpecs", 0, "maxReplicas"], "maxReplica"),
    ([*ROUTER, "readinessProbe"], "readynessProbe"),
    ([*ROUTER, "resources", "limits"], "limit"),
    ([*HEAD_TEMPLATE, "spec", "shareProcessNamespace"], "shareProcessNamespaces"),
])
@needs_kubectl
def test_a_misspelled_field_fails_both_validators(path, wrong):
    """The checks above are worth something only if unknown fields fail them."""
    kv = kubernetes_validate()
    cluster = the(render("overlays/cpu-demo"), "RayCluster")
    assert crd_errors(cluster) == []
    bad = _misspell(cluster, path, wrong)
    errors = crd_errors(bad)
    assert errors and any(wrong in e for e in errors), errors
    if path[:3] == HEAD_TEMPLATE:  # a pod template: Kubernetes' own schema refuses it too
        template = bad["spec"]["headGroupSpec"]["template"]
        with pytest.raises(kv.ValidationError, match=wrong):
            kv.validate(as_pod_template("headgroup", template), K8S_VERSION, strict=True)


@pytest.mark.parametrize("kind,path,wrong", [
    ("Service", ["spec", "ports", 0, "targetPort"], "tragetPort"),
    ("PodDisruptionBudget", ["spec", "maxUnavailable"], "maxUnavailible"),
    ("NetworkPolicy", ["spec", "policyTypes"], "policyType"),
])
@needs_kubectl
def test_a_misspelled_core_field_fails_kubernetes_validate(kind, path, wrong):
    kv = kubernetes_validate()
    objs = render("overlays/cpu-demo")
    obj = next(o for o in only(objs, kind) if _has(o, path))
    kv.validate(obj, K8S_VERSION, strict=True)
    with pytest.raises(kv.ValidationError, match=wrong):
        kv.validate(_misspell(obj, path, wrong), K8S_VERSION, strict=True)
    # Without strict mode the same (optional) field passes unnoticed: strict catches it.
    kv.validate(_misspell(obj, path, wrong), K8S_VERSION, strict=False)


def _has(obj, path) -> bool:
    for key in path:
        try:
            obj = obj[key]
        except (KeyError, IndexError, TypeError):
            return False
    return True


# --- the manifests against the CLI ----------------------------------------------------


def olmo_serve_argv(container: dict) -> list[str] | None:
    """The argv `olmo-serve` gets from this container, or None if it runs something else."""
    command, args = container.get("command", []), container.get("args", [])
    if command[:1] == ["olmo-serve"]:
        return command[1:] + args
    if (len(command) >= 4 and command[0] in ("/bin/bash", "/bin/sh", "bash", "sh")
            and command[1] == "-c" and re.search(r'exec olmo-serve "\$@"\s*$', command[2])):
        return command[4:] + args  # bash -c SCRIPT NAME ARG...: "$@" is ARG...
    assert "olmo-serve" not in " ".join(command + args), \
        f"container {container['name']} runs olmo-serve in a form this test cannot read"
    return None


def olmo_serve_containers(cluster: dict):
    for group, spec, template in pod_templates(cluster):
        for container in template["spec"]["containers"]:
            argv = olmo_serve_argv(container)
            if argv is not None:
                yield group, spec, template, container, argv


def mounted_file(objs, template, container, path: str) -> str:
    """The content a ConfigMap volume puts at `path` in this container."""
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        rel = PurePosixPath(path).relative_to(mount["mountPath"]) \
            if PurePosixPath(path).is_relative_to(mount["mountPath"]) else None
        if rel is None:
            continue
        source = volumes[mount["name"]]["configMap"]
        items = {i["path"]: i["key"] for i in source.get("items", [])}
        key = items.get(str(rel), str(rel))
        return the(objs, "ConfigMap", source["name"])["data"][key]
    raise AssertionError(f"{path} is not on a volume of container {container['name']}")


def cli_config(objs, template, container, argv, tmp_path):
    """Parse argv as `olmo-serve` would and build the cluster config it would load."""
    args = build_parser().parse_args(argv)
    assert args.command == "serve" and args.config
    text = mounted_file(objs, template, container, args.config)
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(text)
    args.config = str(config_file)
    return args, _cluster_config(args)


def port_of(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return number


def mount_covering(template, container, path: str) -> dict:
    for mount in container.get("volumeMounts", []):
        if PurePosixPath(path).is_relative_to(mount["mountPath"]):
            volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
            return volumes[mount["name"]]
    raise AssertionError(f"{path} is not on a volume of container {container['name']}")


def resources_param(value: str) -> dict:
    """rayStartParams' `resources` the way it reaches Ray: KubeRay writes `--resources=VALUE`
    into a bash command line, and Ray parses the word bash makes of it as JSON."""
    (word,) = shlex.split(f"--resources={value}")
    return json.loads(word.removeprefix("--resources="))


@pytest.mark.parametrize("target", TARGETS)
@needs_kubectl
def test_router_command_is_accepted_by_the_cli(target, tmp_path):
    objs = render(target)
    cluster = the(objs, "RayCluster")
    found = list(olmo_serve_containers(cluster))
    assert [g for g, *_ in found] == ["headgroup"], "one olmo-serve, the router in the head"
    _, head_spec, template, router, argv = found[0]
    args, config = cli_config(objs, template, router, argv, tmp_path)

    # The router: a Ray driver beside the head, serving on every interface.
    assert args.ray_address == f"127.0.0.1:{KUBERAY_GCS_PORT}"
    assert "port" not in head_spec.get("rayStartParams", {}), "the GCS port stays KubeRay's"
    ray_head = template["spec"]["containers"][0]
    assert port_of(ray_head, "gcs-server") == KUBERAY_GCS_PORT
    assert config.router.host == "0.0.0.0" and config.router.port == config.router.port
    assert port_of(router, "api") == config.router.port
    assert port_of(router, "http") == config.router.http_port > 0
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert port_of(router, router[probe]["grpc"]["port"]) == config.router.port, probe
    # A driver attaches to the raylet it can see and to its sockets under Ray's temp dir.
    assert template["spec"].get("shareProcessNamespace") is True
    shared = mount_covering(template, router, RAY_TMP)["name"]
    assert {(m["name"], m["mountPath"]) for m in ray_head["volumeMounts"]} >= {(shared, RAY_TMP)}

    # The public Service reaches the router's two ports on the head pod only.
    service = the(objs, "Service", "olmo-api")
    assert [port_of(router, p["targetPort"]) for p in service["spec"]["ports"]] == [
        config.router.port, config.router.http_port]
    labels = {g: pod_labels(cluster, g, t) for g, _, t in pod_templates(cluster)}
    assert [g for g in labels if selects({"matchLabels": service["spec"]["selector"]},
                                         labels[g])] == ["headgroup"]

    # Workers: one actor per pod, on the role's fixed port, where the probes look.
    assert config.worker.host == "0.0.0.0"
    assert config.mode == "disaggregated"
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert sorted(groups) == sorted(ROLES)
    for role in ROLES:
        spec, want = groups[role], getattr(config, role)
        (worker,) = spec["template"]["spec"]["containers"]
        assert want.port > 0
        assert port_of(worker, "grpc") == want.port
        assert port_of(worker, worker["readinessProbe"]["grpc"]["port"]) == want.port
        liveness = worker.get("livenessProbe")
        assert liveness is None or "grpc" not in liveness, "a pod without an actor must live"
        offered = resources_param(spec["rayStartParams"]["resources"])
        assert want.resources and set(want.resources) == set(offered), role
        for name, amount in want.resources.items():
            assert amount <= offered[name] < 2 * amount, f"one {role} instance per pod"
        assert float(spec["rayStartParams"]["num-cpus"]) >= want.cpus
        gpus = float(spec["rayStartParams"].get("num-gpus", 0))
        assert gpus >= want.gpus
        assert quantity(worker["resources"]["limits"].get("nvidia.com/gpu", 0)) >= gpus
        assert spec["minReplicas"] <= spec["replicas"] <= spec["maxReplicas"]
        workers = want.instances * getattr(want, "stages", 1)  # one worker per stage
        assert workers <= spec["replicas"], f"each {role} worker (stage) needs a pod"
        if config.planner.enabled:  # it scales within bounds the pods can hold
            assert cluster["spec"]["enableInTreeAutoscaling"] is True, "who adds the pods?"
            assert want.bounds().high * want.stages <= spec["maxReplicas"], role

    # A model folder must be on a volume for the router (tokenizer) and every worker.
    if config.model is not None:
        assert config.model.startswith("/")
        volume = mount_covering(template, router, config.model)
        claim = volume["persistentVolumeClaim"]["claimName"]
        the(objs, "PersistentVolumeClaim", claim)
        for spec in groups.values():
            (worker,) = spec["template"]["spec"]["containers"]
            other = mount_covering(spec["template"], worker, config.model)
            assert other["persistentVolumeClaim"]["claimName"] == claim
    if config.target.startswith("cuda"):
        assert all(getattr(config, r).gpus >= 1 for r in ROLES)


def kuberay_ray_start_argv(cluster: dict, group: str, spec: dict, container: dict) -> list[str]:
    """The `ray start` arguments KubeRay builds from rayStartParams (generateRayStartCommand,
    setMissingRayStartParams and convertParamMap in ray-operator's pod.go), as bash splits
    them."""
    params = dict(spec.get("rayStartParams", {}))
    head = group == "headgroup"
    if head:
        params.setdefault("dashboard-host", "0.0.0.0")
    else:
        params.setdefault("address", f"{cluster['metadata']['name']}-head-svc:6379")
    params.setdefault("metrics-export-port", str(METRICS_PORT))
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", str(KUBERAY_AGENT_PORT))
    limits = container.get("resources", {}).get("limits", {})
    if "num-cpus" not in params and "cpu" in limits:
        params["num-cpus"] = str(int(-(-quantity(limits["cpu"]) // 1)))
    if "num-gpus" not in params and quantity(limits.get("nvidia.com/gpu", 0)):
        params["num-gpus"] = str(int(quantity(limits["nvidia.com/gpu"])))
    words = []
    for key in sorted(params):
        value = params[key]
        if value.lower() in ("true", "false") and key not in (
                "log-color", "include-dashboard", "include-log-monitor"):
            if value.lower() == "true":
                words.append(f"--{key}")
        else:
            words.append(f"--{key}={value}")
    return shlex.split(("--head " if head else "") + " ".join(words))


@pytest.mark.parametrize("target", TARGETS)
@needs_kubectl
def test_ray_start_params_are_flags_ray_start_accepts(target):
    scripts = pytest.importorskip(
        "ray.scripts.scripts", reason="ray's CLI (`ray start`) cannot be imported")
    cluster = the(render(target), "RayCluster")
    for group, spec, template in pod_templates(cluster):
        ray_container = template["spec"]["containers"][0]  # KubeRay's Ray container
        # KubeRay writes its command; given command/args would run before `ray start`.
        assert "command" not in ray_container and "args" not in ray_container, group
        argv = kuberay_ray_start_argv(cluster, group, spec, ray_container)
        ctx = scripts.start.make_context("ray start", argv)  # refuses unknown flags
        params = ctx.params
        assert params["metrics_export_port"] == METRICS_PORT
        assert port_of(ray_container, "metrics") == METRICS_PORT
        assert params["dashboard_agent_listen_port"] == KUBERAY_AGENT_PORT
        for probe in ("readinessProbe", "livenessProbe"):
            http = ray_container.get(probe, {}).get("httpGet")
            if http:
                assert http["port"] == KUBERAY_AGENT_PORT and http["path"] == "/api/healthz"
        if group == "headgroup":
            assert params["head"] and params["num_cpus"] == 0, "no actors on the head"
        else:
            assert json.loads(params["resources"]) == {group: 1}
        assert "resources" not in spec, "KubeRay refuses group resources with rayStartParams"


# --- resources, selectors, policies ---------------------------------------------------


def quantity(value) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", value).groups()
    return float(number) * units.get(unit, 1.0) if unit else float(number)


@pytest.mark.parametrize("target", TARGETS)
@needs_kubectl
def test_every_container_has_requests_limits_and_a_safe_context(target):
    cluster = the(render(target), "RayCluster")
    for group, _, template in pod_templates(cluster):
        spec = template["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{group}/{container['name']}"
            requests = container["resources"]["requests"]
            limits = container["resources"]["limits"]
            for resource in ("cpu", "memory"):
                assert quantity(requests[resource]) <= quantity(limits[resource]), where
            for resource in set(requests) | set(limits):
                if "/" in resource:  # extended resources: requests must equal limits
                    assert quantity(requests[resource]) == quantity(limits[resource]), where
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("RAY_AUTH_MODE") == "disabled", f"{where}: Ray 2.60 needs it set"
        assert spec["securityContext"]["runAsNonRoot"] is True, group
        assert spec["securityContext"]["runAsUser"] != 0, group
    if cluster["spec"].get("enableInTreeAutoscaling"):  # KubeRay adds this container
        autoscaler = cluster["spec"]["autoscalerOptions"]
        for resource in ("cpu", "memory"):
            assert quantity(autoscaler["resources"]["requests"][resource]) <= quantity(
                autoscaler["resources"]["limits"][resource])
        assert autoscaler["securityContext"]["allowPrivilegeEscalation"] is False
        env = {e["name"]: e.get("value") for e in autoscaler.get("env", [])}
        assert env.get("RAY_AUTH_MODE") == "disabled", "the autoscaler talks to Ray 2.60 too"


@pytest.mark.parametrize("target", TARGETS)
@needs_kubectl
def test_gpu_requests_only_in_the_gpu_overlay(target):
    cluster = the(render(target), "RayCluster")
    for group, spec, template in pod_templates(cluster):
        limits = template["spec"]["containers"][0]["resources"]["limits"]
        gpu = group != "headgroup" and target.endswith("gpu")
        assert ("nvidia.com/gpu" in limits) == gpu, group
        assert ("num-gpus" in spec["rayStartParams"]) == gpu, group
        if gpu:
            assert template["spec"]["tolerations"] and template["spec"]["nodeSelector"]


@pytest.mark.parametrize("target", TARGETS)
@needs_kubectl
def test_disruption_budgets_cover_head_and_each_pool(target):
    objs = render(target)
    cluster = the(objs, "RayCluster")
    labels = {g: pod_labels(cluster, g, t) for g, _, t in pod_templates(cluster)}
    covered = []
    for pdb in only(objs, "PodDisruptionBudget"):
        groups = [g for g in labels if selects(pdb["spec"]["selector"], labels[g])]
        assert len(groups) == 1, f"{pdb['metadata']['name']} selects {groups}"
        covered += groups
    assert sorted(covered) == sorted(labels)


@pytest.mark.parametrize("target", TARGETS)
@needs_kubectl
def test_network_policy_opens_only_the_api_and_metrics(target, tmp_path):
    objs = render(target)
    cluster = the(objs, "RayCluster")
    name = cluster["metadata"]["name"]
    labels = {g: pod_labels(cluster, g, t) for g, _, t in pod_templates(cluster)}
    (_, _, template, router, argv), = olmo_serve_containers(cluster)
    args, config = cli_config(objs, template, router, argv, tmp_path)
    policies = only(objs, "NetworkPolicy")
    for group in labels:
        assert any(selects(p["spec"]["podSelector"], labels[group])
                   and "Ingress" in p["spec"]["policyTypes"] for p in policies), \
            f"no policy restricts ingress to {group} pods"

    def ports(rule):
        return sorted(p["port"] for p in rule.get("ports", [])) or None  # None: every port

    internal_ports = set()
    for policy in policies:
        targets = [g for g in labels if selects(policy["spec"]["podSelector"], labels[g])]
        for rule in policy["spec"].get("ingress", []):
            sources = rule.get("from")
            if not sources:  # anyone, inside or outside the cluster
                assert ports(rule) == sorted([config.router.port, config.router.http_port]), policy
                assert targets == ["headgroup"], policy
                continue
            for source in sources:
                if "namespaceSelector" in source:  # the monitoring namespace
                    assert ports(rule) == [METRICS_PORT], policy
                else:
                    assert set(source) == {"podSelector"}, policy
                    assert source["podSelector"]["matchLabels"].get("ray.io/cluster") == name
                    assert all(selects(source["podSelector"], labels[g]) for g in labels)
                    if set(targets) >= set(ROLES):
                        internal_ports.add("all" if ports(rule) is None else tuple(ports(rule)))
    # The router (head pod) reaches the workers' gRPC ports, and Ray its own random ones.
    assert internal_ports == {"all"}
    assert {getattr(config, r).port for r in ROLES} == {50061, 50071}


@pytest.mark.parametrize("target", TARGETS)
@needs_kubectl
def test_generated_names_and_images_resolve(target):
    objs = render(target)
    cluster = the(objs, "RayCluster")
    version = pyproject()["project"]["version"]
    images = set()
    for _, _, template in pod_templates(cluster):
        for volume in template["spec"].get("volumes", []):
            if "configMap" in volume:
                the(objs, "ConfigMap", volume["configMap"]["name"])  # hash suffix and all
            if "persistentVolumeClaim" in volume:
                the(objs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        images |= {c["image"] for c in template["spec"]["containers"]}
    tag = f"{version}-gpu" if target.endswith("gpu") else version
    assert images == {f"olmo-disagg:{tag}"}


# --- the image ------------------------------------------------------------------------


def test_dockerfile_builds_what_the_manifests_run():
    dockerfile = (REPO / "Dockerfile").read_text()
    lines = [ln.strip() for ln in dockerfile.splitlines() if not ln.lstrip().startswith("#")]
    assert "ARG BASE_IMAGE=python:3.11-slim" in lines
    assert re.search(r'pip install "\.\$\{EXTRAS:\+\[\$\{EXTRAS\}\]\}"', dockerfile)
    project = pyproject()["project"]
    ray_pin = next(d for d in project["dependencies"] if d.startswith("ray"))
    ray_version = re.search(r"ARG RAY_VERSION=(\S+)", dockerfile).group(1)
    assert re.fullmatch(ray_pin.removeprefix("ray==").replace(".", r"\.").replace("*", ".*"),
                        ray_version)
    (user,) = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user.split(":")[0] not in ("0", "root")
    exposed = {int(p) for ln in lines if ln.startswith("EXPOSE") for p in ln.split()[1:]}
    assert {50051, 8000, 50061, 50071, KUBERAY_GCS_PORT, METRICS_PORT,
            KUBERAY_AGENT_PORT} <= exposed
    # .dockerignore lets through every package pyproject installs.
    ignore = (REPO / ".dockerignore").read_text().split()
    find = pyproject()["tool"]["setuptools"]["packages"]["find"]
    for pattern in find["include"]:
        assert f"!{pattern.rstrip('*')}" in ignore, pattern
    assert "!pyproject.toml" in ignore and "!README.md" in ignore


# --- monitoring -----------------------------------------------------------------------


def exported_metric_names() -> set[str]:
    """Every series name the router's /metrics can carry."""
    from router.client_budget import ClientBudget, ClientLimits
    from router.metrics import RouterMetrics
    from router.scheduler import Scheduler

    scheduler = Scheduler(None, kv_weight=0.0)
    try:
        names = set()
        metrics = RouterMetrics(scheduler, lambda: 0, ClientBudget(ClientLimits()))
        for family in metrics.registry.collect():
            names.add(family.name)
            names |= {sample.name for sample in family.samples}
            if family.type == "histogram":
                names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count")}
            if family.type == "counter":  # labelled ones have no sample until used
                names.add(f"{family.name}_total")
        return names
    finally:
        scheduler.close()


@needs_kubectl
def test_monitoring_scrapes_the_router_and_charts_only_what_it_exports():
    objs = render("monitoring")
    monitor = the(objs, "ServiceMonitor", "olmo-router")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = the(render("base"), "Service", "olmo-api")
    assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}

    config_map = the(objs, "ConfigMap", "olmo-grafana-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["grafana-dashboard.json"])
    exported = exported_metric_names()
    charted = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            charted |= set(re.findall(r"\bolmo_[a-z_]+\b", target["expr"]))
    assert charted and charted <= exported, sorted(charted - exported)
    for needed in ("olmo_time_to_first_token_seconds_bucket",
                   "olmo_inter_token_latency_seconds_bucket", "olmo_kv_pages_used",
                   "olmo_num_requests_waiting", "olmo_kv_transfer_bytes_sum"):
        assert needed in charted, needed


# --- tracing --------------------------------------------------------------------------


@needs_kubectl
def test_the_trace_collector_validates_and_is_where_the_configs_send_spans():
    kv = kubernetes_validate()
    objs = render("tracing")
    for obj in objs:
        kv.validate(obj, K8S_VERSION, strict=True)
    deployment, service = the(objs, "Deployment", "olmo-traces"), the(objs, "Service",
                                                                      "olmo-traces")
    template = deployment["spec"]["template"]
    assert selects({"matchLabels": service["spec"]["selector"]},
                   template["metadata"]["labels"])
    (container,) = template["spec"]["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    for target in TARGETS:
        (text,) = the(render(target), "ConfigMap")["data"].values()
        tracing = ClusterConfig.from_mapping(yaml.safe_load(text)).tracing
        assert tracing.endpoint == f"http://olmo-traces:{ports['otlp-grpc']}", target
