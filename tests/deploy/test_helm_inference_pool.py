"""helm/loraplex with inferencePool.enabled: the InferencePool (inference.networking.k8s.io/v1), the Endpoint
Picker's objects and the example HTTPRoute, checked field by field (no schema knows the CRDs) and against what
the router really serves."""

from __future__ import annotations

import re
from typing import Any

import helm_python
import kubernetes_validate
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.router.metrics import Metrics
from loraplex.router.settings import RouterSettings
from tests.deploy.support import CHART, KUBE_VERSIONS, objects, render

POOL_ON = {"inferencePool": {"enabled": True, "httpRoute": {"enabled": True}}}
CRD_KINDS = {"InferencePool", "HTTPRoute"}  # kubernetes-validate knows the built-in kinds only
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# The picker's flags that name a metric it scrapes from every pod's /metrics.
METRIC_FLAGS = (
    "total-queued-requests-metric",
    "kv-cache-usage-percentage-metric",
    "lora-info-metric",
    "cache-info-metric",
)


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in of_kind(objs, kind) if o["metadata"]["name"] == name]
    return found


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def picker_args(objs: list[dict[str, Any]]) -> dict[str, str]:
    (container,) = named(objs, "Deployment", "llm-loraplex-epp")["spec"]["template"]["spec"]["containers"]
    return dict(a.removeprefix("--").split("=", 1) for a in container["args"])


def check_inference_pool_v1(pool: dict[str, Any]) -> None:
    """The InferencePool v1 fields and their types (the CRD's schema, written out): nothing else is accepted."""
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1" and pool["kind"] == "InferencePool"
    assert set(pool) == {"apiVersion", "kind", "metadata", "spec"}
    assert DNS_LABEL.match(pool["metadata"]["name"])
    spec = pool["spec"]
    assert (
        {"selector", "targetPorts", "endpointPickerRef"}
        <= set(spec)
        <= {
            "selector",
            "targetPorts",
            "appProtocol",
            "endpointPickerRef",
        }
    )
    assert set(spec["selector"]) == {"matchLabels"}  # what the pool v1 selects by (no expressions)
    labels = spec["selector"]["matchLabels"]
    assert labels and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
    ports = spec["targetPorts"]
    assert isinstance(ports, list) and 1 <= len(ports) <= 8
    numbers = [p["number"] for p in ports]
    assert all(set(p) == {"number"} and type(p["number"]) is int and 1 <= p["number"] <= 65535 for p in ports)
    assert len(set(numbers)) == len(numbers)
    ref = spec["endpointPickerRef"]
    assert set(ref) <= {"group", "kind", "name", "port", "failureMode"} and "name" in ref
    assert isinstance(ref["name"], str) and DNS_LABEL.match(ref["name"])
    assert set(ref["port"]) == {"number"} and type(ref["port"]["number"]) is int and 1 <= ref["port"]["number"] <= 65535
    assert ref["failureMode"] in ("FailOpen", "FailClose")


def test_off_by_default() -> None:
    kinds = {o["kind"] for o in objects()}
    assert not kinds & {"InferencePool", "HTTPRoute", "Role", "RoleBinding"}
    assert not any(o["metadata"]["name"].endswith("-epp") for o in objects())


def test_the_pool_is_valid_v1_selects_the_serving_pods_only_on_the_http_port() -> None:
    objs = objects(POOL_ON)
    (pool,) = of_kind(objs, "InferencePool")
    check_inference_pool_v1(pool)
    selector = pool["spec"]["selector"]["matchLabels"]
    serving = named(objs, "Deployment", "llm-loraplex")
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in of_kind(objs, "Deployment")}
    assert set(pods) == {"llm-loraplex", "llm-loraplex-epp"}
    assert {name for name, labels in pods.items() if matches(selector, labels)} == {"llm-loraplex"}
    assert selector == serving["spec"]["selector"]["matchLabels"]  # the very pods the serving Deployment owns
    router = next(c for c in serving["spec"]["template"]["spec"]["containers"] if c["name"] == "router")
    http = next(p["containerPort"] for p in router["ports"] if p["name"] == "http")
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [http] == [RouterSettings().port]
    assert pool["spec"]["endpointPickerRef"]["failureMode"] == "FailClose"


def test_the_pool_names_the_pickers_service_and_the_picker_its_pool() -> None:
    objs = objects(POOL_ON)
    (pool,) = of_kind(objs, "InferencePool")
    ref = pool["spec"]["endpointPickerRef"]
    service = named(objs, "Service", ref["name"])
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc["port"] == ref["port"]["number"] == 9002 and grpc["appProtocol"] == "http2"
    picker = named(objs, "Deployment", ref["name"])
    pod = picker["spec"]["template"]
    assert matches(service["spec"]["selector"], pod["metadata"]["labels"])
    assert not matches(named(objs, "Service", "llm-loraplex")["spec"]["selector"], pod["metadata"]["labels"])
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == 9002 and container["livenessProbe"]["grpc"]["port"] == ports["grpc-health"]
    assert container["image"] == "registry.k8s.io/gateway-api-inference-extension/epp:v1.0.0"
    args = picker_args(objs)
    assert args["pool-name"] == pool["metadata"]["name"] and args["pool-namespace"] == "serving"
    assert args["grpc-port"] == "9002"
    # Its configuration file comes from the ConfigMap it mounts, and scores adapter residency.
    config = named(objs, "ConfigMap", ref["name"])["data"][args["config-file"].rsplit("/", 1)[1]]
    assert "lora-affinity-scorer" in config and "prefix-cache-scorer" in config
    # It may read the pods and its pool, with its own account, and nothing cluster-wide.
    account = pod["spec"]["serviceAccountName"]
    binding = named(objs, "RoleBinding", account)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "serving"}]
    rules = named(objs, "Role", binding["roleRef"]["name"])["rules"]
    readable = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= readable
    assert all(set(rule["verbs"]) == {"get", "watch", "list"} for rule in rules)
    assert not of_kind(objs, "ClusterRole") and not of_kind(objs, "ClusterRoleBinding")


def test_the_pickers_flags_name_metrics_the_server_exports() -> None:
    """Each metric the picker is told to read is in the router's registry, with the type and labels it reads."""
    metrics = Metrics()
    metrics.cache_configured(16, 1024, True)
    metrics.lora_state(8, ["a", "b"], ["c"])
    exported = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    args = picker_args(objects(POOL_ON))
    flags = {flag: args[flag] for flag in METRIC_FLAGS}
    for name in flags.values():
        assert exported[name].type == "gauge", name
    (lora,) = exported[flags["lora-info-metric"]].samples
    assert set(lora.labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
    (cache,) = exported[flags["cache-info-metric"]].samples
    assert {"block_size", "num_gpu_blocks"} <= set(cache.labels)
    # vLLM's names are exported too: a picker left at its defaults reads the same values.
    assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:lora_requests_info"} <= set(exported)


def test_empty_metric_names_pass_no_flag() -> None:
    """For picker releases that refuse the metric flags: they then read vLLM's names, which are exported too."""
    none = dict.fromkeys(("totalQueuedRequests", "kvCacheUsagePercentage", "loraInfo", "cacheInfo"), "")
    args = picker_args(objects({"inferencePool": {"enabled": True, "endpointPicker": {"metrics": none}}}))
    assert not set(METRIC_FLAGS) & set(args) and "pool-name" in args


def test_the_example_route_sends_a_gateways_traffic_to_the_pool() -> None:
    objs = objects({"inferencePool": {"enabled": True, "httpRoute": {"enabled": True, "gatewayNamespace": "gw"}}})
    (route,) = of_kind(objs, "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "inference-gateway", "namespace": "gw"}
    ]
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "llm-loraplex"}
    ]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert not of_kind(objects({"inferencePool": {"enabled": True}}), "HTTPRoute")  # off unless asked for


def test_an_external_picker_renders_none_of_its_own() -> None:
    objs = objects({"inferencePool": {"enabled": True, "endpointPicker": {"external": "shared-epp", "port": 9102}}})
    (pool,) = of_kind(objs, "InferencePool")
    assert pool["spec"]["endpointPickerRef"] == {
        "name": "shared-epp",
        "port": {"number": 9102},
        "failureMode": "FailClose",
    }
    assert [d["metadata"]["name"] for d in of_kind(objs, "Deployment")] == ["llm-loraplex"]
    assert not of_kind(objs, "Role") and not any(o["metadata"]["name"].endswith("-epp") for o in objs)


def test_a_network_policy_admits_the_picker_to_the_pods_it_scrapes() -> None:
    values = {**POOL_ON, "networkPolicy": {"from": [{"namespaceSelector": {"matchLabels": {"gateway": "yes"}}}]}}
    objs = objects(values)
    (policy,) = of_kind(objs, "NetworkPolicy")
    picker_pod = named(objs, "Deployment", "llm-loraplex-epp")["spec"]["template"]["metadata"]["labels"]
    peers = policy["spec"]["ingress"][0]["from"]
    assert any("podSelector" in p and matches(p["podSelector"]["matchLabels"], picker_pod) for p in peers)
    assert {"port": "http", "protocol": "TCP"} in policy["spec"]["ingress"][0]["ports"]


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_the_built_in_objects_are_valid_kubernetes(version: str) -> None:
    objs = objects(POOL_ON)
    assert {o["kind"] for o in objs} >= CRD_KINDS | {"Role", "RoleBinding", "ServiceAccount", "ConfigMap"}
    for obj in objs:
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "llm"
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_lint_strict_finds_nothing_with_the_pool() -> None:
    report = helm_python.lint(CHART, POOL_ON, strict=True, kube_version="v1.30.0")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize(
    ("values", "named_in_error"),
    [
        ({"inferencePool": {"failureMode": "Retry"}}, "failureMode"),
        ({"inferencePool": {"endpointPicker": {"metrics": {"loraInfo": "lora info"}}}}, "loraInfo"),
        ({"inferencePool": {"endpointPicker": {"port": 70000}}}, "port"),
        ({"inferencePool": {"httpRoute": {"timeout": "five minutes"}}}, "timeout"),
    ],
)
def test_bad_pool_values_are_refused(values: dict[str, Any], named_in_error: str) -> None:
    with pytest.raises(helm_python.HelmError) as caught:
        render(values)
    assert named_in_error in str(caught.value)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda spec: spec["targetPorts"][0].update(number="8080"),
        lambda spec: spec.update(targetPorts=[]),
        lambda spec: spec["selector"].update(matchExpressions=[]),
        lambda spec: spec["endpointPickerRef"].update(failureMode="Sometimes"),
        lambda spec: spec.update(targetPortNumber=8080),  # the v1alpha2 field
    ],
)
def test_the_pool_check_can_fail(break_it: Any) -> None:
    (pool,) = of_kind(objects(POOL_ON), "InferencePool")
    break_it(pool["spec"])
    with pytest.raises(AssertionError):
        check_inference_pool_v1(pool)
