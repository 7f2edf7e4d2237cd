"""helm/loraplex: rendered through Helm's Go SDK, linted, schema-checked, every object valid for Kubernetes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from loraplex.router.tenancy import Tenants
from tests.deploy.support import (
    CHART,
    CI_VALUES,
    KUBE_VERSIONS,
    ROOT,
    container_env,
    load_values,
    objects,
    one,
    pod_containers,
    render,
)


def values_file(stem: str) -> dict[str, Any]:
    return load_values(CHART / "ci" / f"{stem}-values.yaml")


def test_the_four_ci_values_files_are_there() -> None:
    assert [p.name for p in CI_VALUES] == [
        "custom-image-values.yaml",
        "default-values.yaml",
        "tenants-ingress-hpa-values.yaml",
        "two-gpus-values.yaml",
    ]


@pytest.mark.parametrize("path", CI_VALUES, ids=lambda p: p.stem)
def test_lint_strict_finds_nothing(path: Path) -> None:
    """`helm lint --strict`: warnings count as errors; the only message allowed is the icon suggestion (INFO)."""
    report = helm_python.lint(CHART, load_values(path), strict=True, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    assert report["total_charts_linted"] == 1


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("path", CI_VALUES, ids=lambda p: p.stem)
def test_every_object_is_valid_kubernetes(path: Path, version: str) -> None:
    objs = objects(load_values(path))
    assert len(objs) >= 6
    for obj in objs:
        # Strict: an unknown or misplaced field fails, as `kubectl apply --validate=strict` would.
        kubernetes_validate.validate(obj, version, strict=True)
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "llm"


def test_the_kubernetes_validation_can_fail() -> None:
    """The check above is not vacuous: a misplaced field in a rendered Deployment is caught."""
    deployment = one(objects(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["probes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


def test_defaults_one_replica_one_gpu_the_embedded_model() -> None:
    objs = objects(values_file("default"))
    assert {o["kind"] for o in objs} == {
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    }
    deployment = one(objs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 1
    shards, router = pod["initContainers"][0], pod["containers"][0]
    # The shard group is a native sidecar: it passes its startup probe before the router starts, and is
    # stopped after the router has drained.
    assert shards["name"] == "shards" and shards["restartPolicy"] == "Always"
    assert shards["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in router["resources"].get("limits", {})
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    env = container_env(shards, objs)
    assert env["MODEL_ID"] == "" and env["DEVICE"] == "cuda" and env["NUM_SHARD"] == "1"
    claim = one(objs, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert one(objs, "ServiceAccount")["automountServiceAccountToken"] is False


def test_num_shard_is_the_gpus_of_each_replica() -> None:
    objs = objects(values_file("two-gpus"))
    deployment = one(objs, "Deployment")
    containers = pod_containers(objs)
    assert deployment["spec"]["replicas"] == 2
    assert containers["shards"]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container_env(containers["shards"], objs)["NUM_SHARD"] == "2"
    assert container_env(containers["router"], objs)["SHARD_UDS"] == (
        "unix:///run/loraplex/shard-0.sock,unix:///run/loraplex/shard-1.sock"
    )
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {v["name"]: v for v in pod["volumes"]}["model"]["persistentVolumeClaim"]["claimName"] == "llama-weights"
    assert not [o for o in objs if o["kind"] == "PersistentVolumeClaim"]  # an existing claim is not created
    token = next(v for v in containers["shards"]["env"] if v["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}


@pytest.mark.parametrize("num_shard", [1, 3, 8])
def test_gpus_follow_num_shard(num_shard: int) -> None:
    containers = pod_containers(objects({"numShard": num_shard}))
    assert containers["shards"]["resources"]["limits"]["nvidia.com/gpu"] == num_shard
    assert container_env(containers["router"], objects({"numShard": num_shard}))["SHARD_UDS"].count("unix://") == (
        num_shard
    )


def test_tenants_ingress_and_autoscaling(tmp_path: Path) -> None:
    values = values_file("tenants-ingress-hpa")
    objs = objects(values)
    deployment = one(objs, "Deployment")
    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count

    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource", "Pods"]

    ingress = one(objs, "Ingress")
    service = one(objs, "Service")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["llm.example.com"], "secretName": "llm-example-com-tls"}]

    # The tenants file the chart writes is one the router accepts, with every tenant and key.
    secret = one(objs, "Secret")
    tenants_file = tmp_path / "api-keys.yaml"
    tenants_file.write_text(secret["stringData"]["api-keys.yaml"])
    assert yaml.safe_load(tenants_file.read_text()) == {"tenants": values["auth"]["tenants"]}
    Tenants.from_file(tenants_file)
    assert secret["stringData"]["admin-token"] == "change-me"

    containers = pod_containers(objs)
    router_env = container_env(containers["router"], objs)
    assert router_env["API_KEYS_FILE"] == "/etc/loraplex/auth/api-keys.yaml"
    assert router_env["ADMIN_TOKEN"] == "<secret admin-token>"
    mounts = {m["name"]: m for m in containers["router"]["volumeMounts"]}
    assert mounts["auth"]["mountPath"] == "/etc/loraplex/auth" and mounts["auth"]["readOnly"] is True
    pod = deployment["spec"]["template"]["spec"]
    auth_volume = {v["name"]: v for v in pod["volumes"]}["auth"]
    assert auth_volume["secret"]["secretName"] == secret["metadata"]["name"]

    # The adapter list lives in the ConfigMap; adapters load on demand from the read-only volume.
    shard_env = container_env(containers["shards"], objs)
    assert shard_env["LORA_ADAPTERS"] == "shared-summarizer=/adapters/shared-summarizer"
    assert shard_env["ADAPTER_DIRS"] == "/adapters"
    assert (shard_env["MAX_ACTIVE_ADAPTERS"], shard_env["MAX_CPU_ADAPTERS"]) == ("32", "512")
    assert {m["name"]: m for m in containers["shards"]["volumeMounts"]}["adapters"]["readOnly"] is True
    policy = one(objs, "NetworkPolicy")
    assert policy["spec"]["ingress"][0]["from"] == values["networkPolicy"]["from"]


def test_autoscaling_on_the_queue_alone_and_recreate_upgrades() -> None:
    queue = {
        "type": "Pods",
        "pods": {"metric": {"name": "loraplex_queue_size"}, "target": {"type": "AverageValue", "averageValue": "8"}},
    }
    values = {
        "autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None, "metrics": [queue]},
        "strategy": {"type": "Recreate"},
    }
    objs = objects(values)
    assert one(objs, "HorizontalPodAutoscaler")["spec"]["metrics"] == [queue]
    # Recreate takes no rollingUpdate block (the API server refuses one), whatever the defaults hold.
    assert one(objs, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    for obj in objs:
        kubernetes_validate.validate(obj, KUBE_VERSIONS[0], strict=True)
    no_metrics = one(
        objects({"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}}), "HorizontalPodAutoscaler"
    )
    assert "metrics" not in no_metrics["spec"]  # the API's default (CPU 80 %) rather than an empty list


def test_a_changed_adapter_list_rolls_the_pods() -> None:
    def checksum(values: dict[str, Any]) -> str:
        annotations = one(objects(values), "Deployment")["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/adapters"])

    assert checksum({}) != checksum({"adapters": {"preload": ["a=/adapters/a"]}})
    assert checksum({}) == checksum({"replicaCount": 3})


def test_custom_registry_resources_and_host_paths() -> None:
    objs = objects(values_file("custom-image"))
    containers = pod_containers(objs)
    assert containers["shards"]["image"] == "registry.example.com:5000/ml/loraplex/shard:0.1.0-cu130"
    # The router image takes the registry from image.registry and its own tag.
    assert containers["router"]["image"] == "registry.example.com:5000/ml/loraplex/router:0.1.0"
    assert containers["shards"]["imagePullPolicy"] == "Always"
    assert containers["shards"]["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi"},
        "limits": {"cpu": "16", "memory": "96Gi"},  # gpu.enabled false: no GPU asked for
    }
    assert containers["router"]["resources"]["requests"] == {"cpu": "500m", "memory": "512Mi"}
    assert container_env(containers["shards"], objs)["DEVICE"] == "cpu"
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert pod["priorityClassName"] == "inference"
    assert "tolerations" not in pod and "runtimeClassName" not in pod
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["hostPath"] == {"path": "/mnt/nvme/loraplex", "type": "DirectoryOrCreate"}
    assert volumes["adapters"]["hostPath"] == {"path": "/mnt/nvme/adapters", "type": "Directory"}
    assert one(objs, "PodDisruptionBudget")["spec"] == {
        "minAvailable": 1,
        "selector": one(objs, "Deployment")["spec"]["selector"],
    }
    assert not [o for o in objs if o["kind"] == "PersistentVolumeClaim"]


def test_image_tag_defaults_to_the_app_version() -> None:
    containers = pod_containers(objects())
    assert containers["shards"]["image"] == "loraplex/shard:0.1.0"
    assert containers["router"]["image"] == "loraplex/router:0.1.0"


BAD_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "no shard": ({"numShard": 0}, "numShard"),
    "numShard as text": ({"numShard": "2"}, "numShard"),
    "unknown top-level key": ({"replicas": 3}, "replicas"),
    "tenant without keys": ({"auth": {"tenants": [{"name": "team-a", "adapters": ["a/*"]}]}}, "keys"),
    "key the router would refuse": ({"auth": {"tenants": [{"name": "team-a", "keys": ["short"]}]}}, "keys"),
    "unknown storage type": ({"storage": {"model": {"type": "nfs"}}}, "type"),
    "registry with a scheme": ({"image": {"registry": "https://registry.example.com"}}, "registry"),
    "adapter claim not named": ({"storage": {"adapters": {"type": "pvc"}}}, "existingClaim"),
    "router env not a flag twin": ({"router": {"env": {"max-input-tokens": 10}}}, "max-input-tokens"),
    "memory that is no quantity": ({"resources": {"limits": {"memory": "lots"}}}, "memory"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_are_rejected_by_the_schema(case: str) -> None:
    values, named = BAD_VALUES[case]
    with helm_python.Chart.load(CHART) as chart, pytest.raises(helm_python.HelmValuesError) as caught:
        chart.validate_schema(values)
    assert named in str(caught.value)
    # An install would stop there too: rendering validates against the same schema.
    with pytest.raises(helm_python.HelmError):
        render(values)
    report = helm_python.lint(CHART, values, strict=True)
    assert report["messages"] and max(m["severity"] for m in report["messages"]) == 3


def test_autoscaling_bounds_in_the_wrong_order_fail_to_render() -> None:
    with pytest.raises(helm_python.HelmRenderError, match="maxReplicas must be at least"):
        render({"autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 2}})


def test_the_chart_reads_its_own_schema() -> None:
    with helm_python.Chart.load(CHART) as chart:
        schema = chart.schema
        defaults = chart.values
    assert schema is not None and schema["additionalProperties"] is False
    # Every default is described by the schema (additionalProperties false would refuse it otherwise).
    assert set(defaults) <= set(schema["properties"])
    assert {"replicaCount", "numShard", "image", "resources", "nodeSelector", "tolerations", "ingress"} <= set(defaults)
    assert {"registry", "repository", "tag"} <= set(defaults["image"]) and "autoscaling" in defaults


def test_notes_say_how_to_reach_and_scale() -> None:
    notes = render({"numShard": 2})["loraplex/templates/NOTES.txt"]
    assert "kubectl port-forward svc/llm-loraplex 8080:8080 50051:50051" in notes
    assert "2 nvidia.com/gpu per pod" in notes
    assert "replicaCount" in notes


def _image_env(dockerfile: str) -> dict[str, str]:
    """The final stage's ``ENV`` of a Dockerfile in docker/ (``KEY=value`` pairs, continued lines joined)."""
    text = (ROOT / "docker" / dockerfile).read_text().replace("\\\n", " ")
    final = text.rsplit("\nFROM ", 1)[1]
    pairs = [line.split(None, 1)[1] for line in final.splitlines() if line.startswith("ENV ")]
    return dict(item.split("=", 1) for pairs_line in pairs for item in pairs_line.split())


def _writable(path: str, container: dict[str, Any]) -> bool:
    mounts = [m for m in container["volumeMounts"] if not m.get("readOnly")]
    return any(path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts)


@pytest.mark.parametrize("path", CI_VALUES, ids=lambda p: p.stem)
def test_read_only_roots_and_every_written_path_on_a_volume(path: Path) -> None:
    """No container may write its image (readOnlyRootFilesystem), escalate or keep a capability; so every path
    the processes write (caches the images name, the sockets, the ranks' rendezvous file under /tmp) must be
    a writable mount."""
    objs = objects(load_values(path))
    containers = pod_containers(objs)
    volumes = {v["name"]: v for v in one(objs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    for name, container in containers.items():
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False, name
        assert ctx["runAsNonRoot"] is True and ctx["capabilities"] == {"drop": ["ALL"]}, name
        assert _writable("/tmp", container), name
        sockets = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "sockets")
        assert _writable(sockets, container), name  # the ranks create them, the router connects (a write)
        tmp = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
        assert "emptyDir" in volumes[tmp], name
    shards = containers["shards"]
    written = _image_env("shard.Dockerfile")
    for var in ("CUPY_CACHE_DIR", "HF_HOME", "LORAPLEX_CACHE"):
        assert _writable(container_env(shards, objs).get(var, written[var]), shards), var
    assert _writable("/dev/shm", shards)
    # Each container has its own /tmp: the router cannot reach the ranks' rendezvous directory.
    tmp_of = {n: next(m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/tmp") for n, c in containers.items()}
    assert tmp_of["router"] != tmp_of["shards"]
