"""deploy/kubernetes: the manifests agree with the code's defaults (ports, probe paths, drain RPC, replica flags)."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest
import yaml

from llmgw import config
from llmgw.config import DEFAULT_PORTS, GOSSIP_PORT_OFFSET

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
GATEWAY, REPLICA = DEFAULT_PORTS["gateway"], DEFAULT_PORTS["replica"]
# The drain deadline a replica gets (the reference's rolling-update drain deadline).
DRAIN_DEADLINE_S = 30


def load_all() -> list[dict]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


DOCS = load_all()


def find(kind: str, name: str) -> dict:
    matches = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def only_container(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def container_ports(container: dict) -> dict[str, tuple[int, str]]:
    return {p["name"]: (p["containerPort"], p.get("protocol", "TCP")) for p in container["ports"]}


def resolve_port(container: dict, port) -> int:
    return port if isinstance(port, int) else container_ports(container)[port][0]


def flag_values(args: list[str]) -> dict[str, str]:
    """`--flag value` pairs of a container's args (every llmgw flag used in the manifests takes a value)."""
    out = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            out[arg] = args[i + 1]
    return out


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pods_of(service: dict) -> list[dict]:
    return [d for d in DOCS if d["kind"] in ("Deployment", "StatefulSet")
            and selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]


# ---- structure ------------------------------------------------------------------------------------------------


def test_every_document_is_a_named_kubernetes_object():
    assert DOCS
    for doc in DOCS:
        assert doc.get("apiVersion") and doc.get("kind"), doc["__file__"]
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"].startswith("llmgw-"), doc["__file__"]


def test_kustomization_lists_every_manifest():
    kustomization = next(d for d in DOCS if d["kind"] == "Kustomization")
    others = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == others


def test_workload_selectors_match_their_templates():
    for doc in DOCS:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            assert selects(doc["spec"]["selector"]["matchLabels"], doc["spec"]["template"]["metadata"]["labels"])
        if doc["kind"] == "PodDisruptionBudget":
            assert len([w for w in DOCS if w["kind"] in ("Deployment", "StatefulSet") and selects(
                doc["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])]) == 1


def test_services_target_named_ports_with_matching_protocol_and_number():
    for service in (d for d in DOCS if d["kind"] == "Service"):
        workloads = pods_of(service)
        assert len(workloads) == 1, service["metadata"]["name"]
        ports = container_ports(only_container(workloads[0]))
        for port in service["spec"]["ports"]:
            number, protocol = ports[port["targetPort"]]
            assert protocol == port.get("protocol", "TCP")
            assert port["port"] == number, "service port and container port are kept equal, to avoid confusion"


def test_service_link_variables_are_disabled():
    # Service llmgw-gateway would inject LLMGW_GATEWAY_PORT=tcp://..., colliding with llmgw's own env config.
    for doc in DOCS:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            assert doc["spec"]["template"]["spec"]["enableServiceLinks"] is False, doc["metadata"]["name"]


def test_every_container_requests_cpu_and_memory_and_limits_memory():
    for doc in DOCS:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            resources = only_container(doc)["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"])
            assert "memory" in resources["limits"]


# ---- gateway -----------------------------------------------------------------------------------------------------


def test_gateway_ports_match_code_defaults():
    container = only_container(find("Deployment", "llmgw-gateway"))
    assert container_ports(container) == {"grpc": (GATEWAY["grpc"], "TCP"), "http": (GATEWAY["http"], "TCP"),
                                          "gossip": (GATEWAY["gossip"], "UDP")}
    flags = flag_values(container["args"])
    assert int(flags["--port"]) == GATEWAY["grpc"]
    assert int(flags["--gossip-port"]) == GATEWAY["gossip"] == GATEWAY["grpc"] + GOSSIP_PORT_OFFSET
    assert int(flags["--http-port"]) == GATEWAY["http"]
    assert flags["--id"].startswith("gateway")  # members classify ids starting with "gateway" as gateways
    service = find("Service", "llmgw-gateway")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": GATEWAY["grpc"],
                                                                        "http": GATEWAY["http"]}


def test_gateway_probes_hit_ready_and_health_paths_on_the_http_port():
    deployment = find("Deployment", "llmgw-gateway")
    container = only_container(deployment)
    readiness, liveness = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert readiness["path"] == config.READY_PATH == "/readyz"
    assert liveness["path"] == config.HEALTH_PATH == "/healthz"
    assert resolve_port(container, readiness["port"]) == GATEWAY["http"]
    assert resolve_port(container, liveness["port"]) == GATEWAY["http"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == GATEWAY["http"]
    assert annotations["prometheus.io/path"] == config.METRICS_PATH


def test_gateway_prestop_outlasts_endpoint_removal_within_grace_period():
    deployment = find("Deployment", "llmgw-gateway")
    command = only_container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > int(command[1])
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


# ---- replica and gossip seeds -------------------------------------------------------------------------------------


def test_replica_ports_and_native_grpc_readiness_probe():
    container = only_container(find("StatefulSet", "llmgw-replica"))
    assert container_ports(container) == {"grpc": (REPLICA["grpc"], "TCP"), "gossip": (REPLICA["gossip"], "UDP")}
    flags = flag_values(container["args"])
    assert int(flags["--port"]) == REPLICA["grpc"]
    assert int(flags["--gossip-port"]) == REPLICA["gossip"] == REPLICA["grpc"] + GOSSIP_PORT_OFFSET
    # Kubernetes' grpc probe takes a port number (named ports are not supported there).
    assert container["readinessProbe"]["grpc"]["port"] == REPLICA["grpc"]
    assert container["readinessProbe"]["grpc"].get("service", "") == ""
    assert resolve_port(container, container["livenessProbe"]["tcpSocket"]["port"]) == REPLICA["grpc"]


def test_replica_prestop_drains_through_the_real_rpc_on_its_own_port():
    statefulset = find("StatefulSet", "llmgw-replica")
    command = only_container(statefulset)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    script = command[2]
    assert f'"127.0.0.1:{REPLICA["grpc"]}"' in script
    compile(script, "preStop", "exec")  # valid Python
    # The names the script uses exist in the generated stubs.
    from llmgw._proto import llmgateway_pb2, llmgateway_pb2_grpc

    assert hasattr(llmgateway_pb2_grpc, "LLMReplicaStub") and hasattr(llmgateway_pb2, "DrainRequest")
    assert "LLMReplicaStub(channel).Drain(pb.DrainRequest()" in script
    timeout = int(script.split("timeout=")[1].split(")")[0])
    grace = statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert DRAIN_DEADLINE_S <= timeout < grace


def test_headless_gossip_service_and_seeds_name_real_replica_pods():
    statefulset = find("StatefulSet", "llmgw-replica")
    headless = find("Service", "llmgw-gossip")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True  # seeds resolve before pods are ready
    assert statefulset["spec"]["serviceName"] == "llmgw-gossip"
    assert pods_of(headless) == [statefulset]
    gossip = next(p for p in headless["spec"]["ports"] if p["name"] == "gossip")
    assert (gossip["port"], gossip["protocol"]) == (REPLICA["gossip"], "UDP")

    pod_names = {f"llmgw-replica-{i}.llmgw-gossip" for i in range(statefulset["spec"]["replicas"])}
    for workload in (statefulset, find("Deployment", "llmgw-gateway")):
        seeds = flag_values(only_container(workload)["args"])["--seeds"].split(",")
        assert len(seeds) >= 2, "one seed is a single point of failure at start-up"
        for seed in seeds:
            host, port = seed.rsplit(":", 1)
            assert host in pod_names and int(port) == REPLICA["gossip"], seed


def test_replica_args_parse_with_the_replica_command():
    from llmgw.cli import replica

    parser = argparse.ArgumentParser()
    replica.add_arguments(parser)
    args = only_container(find("StatefulSet", "llmgw-replica"))["args"]
    assert args[:4] == ["python", "-m", "llmgw", "replica"]
    ns = parser.parse_args(args[4:])
    assert (ns.port, ns.gossip_port, ns.host) == (REPLICA["grpc"], REPLICA["gossip"], "0.0.0.0")


@pytest.mark.parametrize("workload", [("StatefulSet", "llmgw-replica"), ("Deployment", "llmgw-gateway")])
def test_pods_read_the_shared_config_file(workload):
    spec = find(*workload)["spec"]["template"]["spec"]
    container = only_container({"spec": {"template": {"spec": spec}}})
    env = {e["name"]: e for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in spec["volumes"] if v["name"] == "config")
    configmap = find("ConfigMap", volume["configMap"]["name"])
    (file_name,) = configmap["data"]
    assert env[config.CONFIG_ENV_VAR]["value"] == f"{mount['mountPath']}/{file_name}"
    data = tomllib.loads(configmap["data"][file_name])
    from llmgw.__main__ import COMMANDS

    assert set(k for k, v in data.items() if isinstance(v, dict)) <= set(COMMANDS)
    # Every env var set for llmgw is one the config layer understands (LLMGW_<SECTION>_<KEY> for this command).
    section = workload[1].removeprefix("llmgw-")
    for name in env:
        if name.startswith("LLMGW_") and name != config.CONFIG_ENV_VAR:
            assert name.startswith(config.env_var_name(section, "")), name
