"""deploy/kubernetes: the manifests are valid Kubernetes objects, meet Pod Security "restricted", and agree with the
code (ports, probe paths served by a real gateway, flags the CLI accepts, drain RPC, gossip key, image version).

The kustomizations (base, overlays/vllm) are rendered with `kubectl kustomize` when kubectl is installed and always
with the small renderer below (enough kustomize for these files; it refuses anything else), and the two renderings
must agree, so the suite also runs where kubectl is absent.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from llmgw import config
from llmgw.config import DEFAULT_PORTS, GOSSIP_PORT_OFFSET

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE, VLLM = KUBERNETES / "base", KUBERNETES / "overlays" / "vllm"
GATEWAY, REPLICA = DEFAULT_PORTS["gateway"], DEFAULT_PORTS["replica"]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# The drain deadline a replica gets (the reference's rolling-update drain deadline).
DRAIN_DEADLINE_S = 30
# Oldest Kubernetes the manifests target (grpc probes, matchLabelKeys in topology spread) and the newest schema the
# kubernetes-validate package carries.
KUBERNETES_VERSIONS = ("1.30.0", "latest")
# Where the pods get the gossip key (a Secret the operator creates, see deploy/README.md).
GOSSIP_KEY_SECRET, GOSSIP_KEY_FILE = "llmgw-gossip-key", "/etc/llmgw-gossip/key"
IMAGE_REPOSITORY = "registry.example.com/llmgw/llmgw"


# ---- a small kustomize ---------------------------------------------------------------------------------------------


class UnsupportedKustomization(Exception):
    """The kustomization uses something this renderer does not implement (use kubectl kustomize)."""


def _load_yaml_docs(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def _same_object(a: dict, b: dict) -> bool:
    return a["kind"] == b["kind"] and a["metadata"]["name"] == b["metadata"]["name"] and \
        a["apiVersion"].split("/")[0] == b["apiVersion"].split("/")[0]


def _strategic_merge(target, patch):
    """Strategic merge as kustomize does it for these files: maps merge key by key, lists of named maps (containers,
    env, ports, volumes, volumeMounts) merge by name, any other list is replaced whole."""
    if isinstance(target, dict) and isinstance(patch, dict):
        if "$patch" in patch:
            raise UnsupportedKustomization(f"$patch: {patch['$patch']} below the top level")
        merged = dict(target)
        for key, value in patch.items():
            merged[key] = _strategic_merge(target[key], value) if key in target else copy.deepcopy(value)
        return merged
    if isinstance(target, list) and isinstance(patch, list) and patch and \
            all(isinstance(item, dict) and "name" in item for item in target + patch):
        merged = [copy.deepcopy(item) for item in target]
        for item in patch:
            index = next((i for i, old in enumerate(merged) if old["name"] == item["name"]), None)
            if index is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[index] = _strategic_merge(merged[index], item)
        return merged
    return copy.deepcopy(patch)


def _pod_containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def render_python(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "resources", "patches", "labels", "images"}
    if set(kustomization) - known:
        raise UnsupportedKustomization(f"{directory}: {sorted(set(kustomization) - known)}")
    docs: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        docs += render_python(path) if path.is_dir() else _load_yaml_docs(path.read_text())
    for entry in kustomization.get("patches", []):
        if set(entry) - {"path", "patch"} or len(entry) != 1:
            raise UnsupportedKustomization(f"{directory}: patch {entry}")
        text = (directory / entry["path"]).read_text() if "path" in entry else entry["patch"]
        for patch in _load_yaml_docs(text):
            targets = [i for i, doc in enumerate(docs) if _same_object(doc, patch)]
            if len(targets) != 1:
                raise UnsupportedKustomization(f"{directory}: {len(targets)} objects match the patch {patch}")
            (index,) = targets
            if patch.get("$patch") == "delete":
                del docs[index]
            else:
                docs[index] = _strategic_merge(docs[index], patch)
    for entry in kustomization.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates") or set(entry) - {"pairs", "includeSelectors"}:
            raise UnsupportedKustomization(f"{directory}: labels {entry}")
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(entry["pairs"])
    if "namespace" in kustomization:  # every object here is namespaced
        for doc in docs:
            doc["metadata"]["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        for doc in docs:
            for container in _pod_containers(doc):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}".rstrip(":")
    return docs


def render_kubectl(directory: Path) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return _load_yaml_docs(result.stdout)


KUBECTL = shutil.which("kubectl")
RENDERINGS = {path.name: render_python(path) for path in (BASE, VLLM)}
# The documents every other test reads: kustomize's own rendering where kubectl exists, else ours.
RENDERED = {path.name: render_kubectl(path) for path in (BASE, VLLM)} if KUBECTL else RENDERINGS
DOCS = RENDERED["base"]
ALL = [(name, doc) for name, docs in RENDERED.items() for doc in docs]


def by_key(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


def find(kind: str, name: str, docs: list[dict] = DOCS) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


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


def pods_of(service: dict, docs: list[dict] = DOCS) -> list[dict]:
    return [d for d in workloads(docs)
            if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]


def llmgw_workloads() -> list[tuple[str, dict]]:
    return [(name, d) for name, docs in RENDERED.items() for d in workloads(docs)
            if only_container(d).get("command") == ["llmgw"]]


# ---- rendering and schemas -----------------------------------------------------------------------------------------


def test_python_renderer_applies_the_overlay_as_kubectl_kustomize_does():
    """What the overlay must change, checked on our renderer; where kubectl is installed, our rendering must also
    equal kustomize's (so the rest of the suite means the same on machines without kubectl)."""
    base, vllm = by_key(RENDERINGS["base"]), by_key(RENDERINGS["vllm"])
    assert ("StatefulSet", "llmgw-replica") in base and ("StatefulSet", "llmgw-replica") not in vllm
    assert ("Service", "llmgw-gossip") not in vllm and ("NetworkPolicy", "llmgw-replica") not in vllm
    assert {("Deployment", "llmgw-vllm"), ("Service", "llmgw-vllm"), ("NetworkPolicy", "llmgw-vllm")} <= set(vllm)
    gateway_args = only_container(vllm[("Deployment", "llmgw-gateway")])["args"]
    assert "--upstream" in gateway_args and "--seeds" not in gateway_args
    # Everything else of the gateway container is the base's (named lists merged, not replaced).
    base_gateway = only_container(base[("Deployment", "llmgw-gateway")])
    assert {k: v for k, v in only_container(vllm[("Deployment", "llmgw-gateway")]).items() if k != "args"} == \
        {k: v for k, v in base_gateway.items() if k != "args"}
    for _, doc in vllm.items():
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "llmgw"
    if KUBECTL:
        assert {name: by_key(docs) for name, docs in RENDERINGS.items()} == \
            {name: by_key(docs) for name, docs in RENDERED.items()}


def test_the_docs_overlay_for_your_registry_renames_the_image(tmp_path):
    """The overlay deploy/README.md tells operators to write points every llmgw container at their registry."""
    readme = (ROOT / "deploy" / "README.md").read_text()
    block = readme.split("# my-llmgw/kustomization.yaml", 1)[1].split("```", 1)[0]
    overlay = tmp_path / "my-llmgw"
    overlay.mkdir()
    (tmp_path / "deploy").symlink_to(ROOT / "deploy")
    (overlay / "kustomization.yaml").write_text(block.split("\n", 1)[1].replace("<owner>", "acme"))
    renderings = [render_python(overlay)] + ([render_kubectl(overlay)] if KUBECTL else [])
    for docs in renderings:
        images = {c["image"] for d in workloads(docs) for c in _pod_containers(d)}
        assert images == {f"ghcr.io/acme/llmgw:{PROJECT['version']}"}
        assert {d["metadata"]["namespace"] for d in docs} == {"llm"} and len(docs) == len(DOCS)


def test_kustomizations_name_existing_files_and_the_base_lists_every_manifest():
    for directory in (BASE, VLLM):
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        for entry in kustomization["resources"] + [p["path"] for p in kustomization.get("patches", []) if "path" in p]:
            assert (directory / entry).exists(), f"{directory.name}: {entry}"
    listed = set(yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_is_valid_against_the_kubernetes_schema(version):
    import kubernetes_validate

    desired = kubernetes_validate.latest_version() if version == "latest" else version
    for overlay, doc in ALL:
        try:
            kubernetes_validate.validate(doc, desired, strict=True)  # strict: unknown fields are errors (typos)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {desired}: {exc}")


def test_schema_validation_catches_a_misspelt_field():
    import kubernetes_validate

    broken = copy.deepcopy(find("Deployment", "llmgw-gateway"))
    only_container(broken)["securityContext"]["allowPrivilegeEscalaton"] = False
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def test_every_document_is_a_named_llmgw_object():
    for overlay, doc in ALL:
        assert doc["metadata"]["name"].startswith("llmgw-"), (overlay, doc["kind"])
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "llmgw"


# ---- Pod Security Standard "restricted" ----------------------------------------------------------------------------

# Volume types "restricted" allows (https://kubernetes.io/docs/concepts/security/pod-security-standards/).
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """Each "restricted" (and "baseline") control the pod spec fails, field by field."""
    bad = []
    pod_sc = pod.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            bad.append(f"pod {field}")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            bad.append(f"volume {volume['name']}: {sorted(kinds)}")
    if pod_sc.get("sysctls"):
        bad.append("pod sysctls")
    if pod_sc.get("runAsUser") == 0:
        bad.append("pod runAsUser 0")
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        name, sc = container["name"], container.get("securityContext", {})
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            bad.append(f"{name}: runAsNonRoot not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            bad.append(f"{name}: runAsUser 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation not false")
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        capabilities = sc.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            bad.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: capabilities add {capabilities['add']}")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile {seccomp.get('type')}")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{name}: procMount")
        if any("hostPort" in port for port in container.get("ports", [])):
            bad.append(f"{name}: hostPort")
    return bad


def test_every_pod_meets_pod_security_restricted():
    pods = [(overlay, w) for overlay, docs in RENDERED.items() for w in workloads(docs)]
    assert len(pods) == 4  # base: gateway + replica; vllm: gateway + vLLM
    for overlay, workload in pods:
        assert restricted_violations(workload["spec"]["template"]["spec"]) == [], (overlay, workload["metadata"])


def test_the_restricted_check_finds_each_violation():
    pod = find("Deployment", "llmgw-gateway")["spec"]["template"]["spec"]
    breakages = {
        "runAsNonRoot not true": lambda p: (p["securityContext"].pop("runAsNonRoot"),
                                            p["containers"][0]["securityContext"].pop("runAsNonRoot")),
        "runAsUser 0": lambda p: p["containers"][0]["securityContext"].update(runAsUser=0),
        "allowPrivilegeEscalation not false": lambda p: p["containers"][0]["securityContext"].pop(
            "allowPrivilegeEscalation"),
        "capabilities do not drop ALL": lambda p: p["containers"][0]["securityContext"]["capabilities"].update(
            drop=["NET_RAW"]),
        "seccompProfile Unconfined": lambda p: (p["securityContext"].pop("seccompProfile"),
                                                p["containers"][0]["securityContext"].update(
                                                    seccompProfile={"type": "Unconfined"})),
        "hostPath": lambda p: p["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
        "pod hostNetwork": lambda p: p.update(hostNetwork=True),
    }
    for expected, breaking in breakages.items():
        broken = copy.deepcopy(pod)
        breaking(broken)
        found = restricted_violations(broken)
        assert any(expected in v for v in found), (expected, found)


# ---- shape ---------------------------------------------------------------------------------------------------------


def test_workload_selectors_match_their_templates_and_budgets_cover_one_workload_each():
    for overlay, docs in RENDERED.items():
        for doc in workloads(docs):
            assert selects(doc["spec"]["selector"]["matchLabels"], doc["spec"]["template"]["metadata"]["labels"])
        budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
        assert len(budgets) == len(workloads(docs)), overlay
        for budget in budgets:
            assert budget["spec"]["maxUnavailable"] == 1
            assert len([w for w in workloads(docs) if selects(
                budget["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])]) == 1


def test_every_workload_spreads_over_nodes():
    for overlay, docs in RENDERED.items():
        for workload in workloads(docs):
            template = workload["spec"]["template"]
            constraints = template["spec"]["topologySpreadConstraints"]
            by_host = [c for c in constraints if c["topologyKey"] == "kubernetes.io/hostname"]
            assert len(by_host) == 1 and by_host[0]["maxSkew"] == 1, (overlay, workload["metadata"]["name"])
            for constraint in constraints:
                assert selects(constraint["labelSelector"]["matchLabels"], template["metadata"]["labels"])
                # It must count only this workload's pods, not every llmgw pod.
                assert "app.kubernetes.io/component" in constraint["labelSelector"]["matchLabels"]
            if workload["kind"] == "Deployment":  # a rolling update's old pods must not skew the new ones
                assert all("pod-template-hash" in c.get("matchLabelKeys", []) for c in constraints)


def test_services_target_named_ports_with_matching_protocol_and_number():
    for docs in RENDERED.values():
        for service in (d for d in docs if d["kind"] == "Service"):
            (workload,) = pods_of(service, docs)
            ports = container_ports(only_container(workload))
            for port in service["spec"]["ports"]:
                number, protocol = ports[port["targetPort"]]
                assert protocol == port.get("protocol", "TCP")
                assert port["port"] == number, "service port and container port are kept equal, to avoid confusion"


def test_service_links_and_service_account_tokens_are_off():
    # Service llmgw-gateway would inject LLMGW_GATEWAY_PORT=tcp://..., colliding with llmgw's own env config.
    for docs in RENDERED.values():
        for doc in workloads(docs):
            spec = doc["spec"]["template"]["spec"]
            assert spec["enableServiceLinks"] is False, doc["metadata"]["name"]
            assert spec["automountServiceAccountToken"] is False, doc["metadata"]["name"]


def test_every_container_requests_cpu_and_memory_and_limits_memory():
    for docs in RENDERED.values():
        for doc in workloads(docs):
            resources = only_container(doc)["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"])
            assert "memory" in resources["limits"]


def test_llmgw_containers_run_the_packaged_image_of_this_version_from_a_named_registry():
    import llmgw

    assert PROJECT["version"] == llmgw.__version__
    assert PROJECT["scripts"]["llmgw"] == "llmgw.__main__:main"  # the `command: [llmgw]` of the containers
    assert len(llmgw_workloads()) == 3
    for overlay, workload in llmgw_workloads():
        image = only_container(workload)["image"]
        assert image == f"{IMAGE_REPOSITORY}:{PROJECT['version']}", (overlay, image)
        registry = image.split("/")[0]
        assert "." in registry, "an image without a registry host is pulled from Docker Hub"


# ---- network policies ----------------------------------------------------------------------------------------------


def _admitted(policy: dict, port: int, protocol: str) -> list[list[dict] | None]:
    """The `from` of each ingress rule of `policy` that opens `port` (None: from anywhere)."""
    return [rule.get("from") for rule in policy["spec"].get("ingress", [])
            if any(p["port"] == port and p.get("protocol", "TCP") == protocol for p in rule.get("ports", []))]


def _policies_for(workload: dict, docs: list[dict]) -> list[dict]:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return [d for d in docs
            if d["kind"] == "NetworkPolicy" and selects(d["spec"]["podSelector"]["matchLabels"], labels)]


def _only_pods_labelled(peers: list[dict] | None, labels: dict) -> bool:
    return bool(peers) and all(set(peer) == {"podSelector"} and peer["podSelector"] == {"matchLabels": labels}
                               for peer in peers)


def test_gossip_and_replica_grpc_admit_only_llmgw_pods_and_fronts_admit_clients():
    llmgw_pods = {"app.kubernetes.io/name": "llmgw"}
    for overlay, docs in RENDERED.items():
        for workload in workloads(docs):
            (policy,) = _policies_for(workload, docs)
            assert policy["spec"]["policyTypes"] == ["Ingress"]
            opened = {(p["port"], p.get("protocol", "TCP"))
                      for rule in policy["spec"]["ingress"] for p in rule["ports"]}
            container = only_container(workload)
            assert opened == {(number, protocol) for number, protocol in container_ports(container).values()}, \
                "exactly the container's ports are opened"
            component = workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
            for name, (number, protocol) in container_ports(container).items():
                (peers,) = _admitted(policy, number, protocol)
                if component == "gateway" and name in ("grpc", "http"):
                    assert peers is None, "the client fronts admit every source until narrowed"
                elif component == "model-server":
                    assert _only_pods_labelled(peers, {**llmgw_pods, "app.kubernetes.io/component": "gateway"})
                else:
                    assert _only_pods_labelled(peers, llmgw_pods), (overlay, component, name)
    base_gateway = _policies_for(find("Deployment", "llmgw-gateway"), DOCS)[0]
    assert _admitted(base_gateway, GATEWAY["gossip"], "UDP") and _admitted(base_gateway, GATEWAY["http"], "TCP")
    replica = _policies_for(find("StatefulSet", "llmgw-replica"), DOCS)[0]
    assert _admitted(replica, REPLICA["gossip"], "UDP") and _admitted(replica, REPLICA["grpc"], "TCP")


# ---- tied to the code: ports, flags, probes, gossip key, shutdown -------------------------------------------------


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


def _parse(args: list[str]):
    """Parse container args with llmgw's own CLI parser (`llmgw <command> ...`); SystemExit from argparse means a
    flag or value the CLI does not accept."""
    from llmgw.__main__ import build_parser

    return build_parser().parse_args(args)


def test_every_llmgw_container_flag_is_accepted_by_the_cli():
    for _, workload in llmgw_workloads():
        args = only_container(workload)["args"]
        namespace = _parse(args)
        assert namespace._command == args[0] == workload["spec"]["template"]["metadata"]["labels"][
            "app.kubernetes.io/component"]
        flags = flag_values(args)
        assert (namespace.host, namespace.port, namespace.gossip_port) == \
            ("0.0.0.0", int(flags["--port"]), int(flags["--gossip-port"]))
        assert namespace.gossip_key_file == GOSSIP_KEY_FILE


def test_vllm_overlay_gateways_find_every_ready_vllm_pod_through_the_headless_service():
    """The overlay's gateway streams from the vLLM pods: its --upstream is the headless Service's DNS name and
    port (re-resolved, so each ready pod is one upstream), kind vllm, as the real gateway CLI parses it."""
    from llmgw.upstream.backends import DnsUpstream, parse_upstream_args
    from llmgw.upstream.capabilities import BackendKind

    docs = RENDERED["vllm"]
    gateway_args = only_container(find("Deployment", "llmgw-gateway", docs))["args"]
    assert gateway_args.count("--upstream") == 1
    (upstream,) = parse_upstream_args(_parse(gateway_args).upstream)
    assert isinstance(upstream, DnsUpstream) and upstream.template.kind is BackendKind.VLLM
    assert not upstream.template.models_configured  # models come from each pod's /v1/models

    service = find("Service", upstream.name, docs)
    assert service["spec"]["clusterIP"] == "None"  # headless: the name resolves to the pods themselves
    assert not service["spec"].get("publishNotReadyAddresses", False)  # a loading model server is not listed
    (workload,) = pods_of(service, docs)
    vllm = only_container(workload)
    (port,) = service["spec"]["ports"]
    assert port["port"] == upstream.port == resolve_port(vllm, port["targetPort"])
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "DEPENDS ON" not in (VLLM / "kustomization.yaml").read_text()


def test_gossip_key_comes_from_the_secret_the_docs_create(tmp_path):
    from llmgw.gossip.auth import read_gossip_key

    for _, workload in llmgw_workloads():
        spec = workload["spec"]["template"]["spec"]
        container = only_container(workload)
        mount = next(m for m in container["volumeMounts"] if GOSSIP_KEY_FILE.startswith(m["mountPath"] + "/"))
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == GOSSIP_KEY_SECRET and "optional" not in volume["secret"]
        assert f"{mount['mountPath']}/key" == GOSSIP_KEY_FILE
        # Mode 0440 with fsGroup = the container's group: readable by llmgw (uid 10001), by no one else.
        assert volume["secret"]["defaultMode"] == 0o440
        assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]
    # The command the docs give makes a key llmgw accepts (64 hex characters; `openssl rand -hex 32`).
    create = f'kubectl create secret generic {GOSSIP_KEY_SECRET} --from-literal=key="$(openssl rand -hex 32)"'
    assert create in (ROOT / "deploy" / "README.md").read_text()
    key_file = tmp_path / "key"
    key_file.write_text(os.urandom(32).hex() + "\n")
    assert len(read_gossip_key(str(key_file))) == 64


def test_gateway_grace_covers_prestop_and_the_gateways_own_shutdown_grace():
    from llmgw.__main__ import build_parser

    deployment = find("Deployment", "llmgw-gateway")
    container = only_container(deployment)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    try:
        build_parser().parse_args(["gateway", "--shutdown-grace-s", "1"])
        has_shutdown_grace = True
    except SystemExit:
        has_shutdown_grace = False
    if has_shutdown_grace:
        # Streams get --shutdown-grace-s after SIGTERM, which comes after the preStop sleep; all within the grace.
        assert "--shutdown-grace-s" in container["args"], "set the gateway's shutdown grace explicitly"
        shutdown_grace = float(_parse(container["args"]).shutdown_grace_s)
        assert int(command[1]) + shutdown_grace < grace
    else:  # graceful shutdown not built yet: the manifest must not pass the flag
        assert "--shutdown-grace-s" not in container["args"]
        assert grace > int(command[1])
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


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

    assert {k for k, v in data.items() if isinstance(v, dict)} <= set(COMMANDS)
    # Every env var set for llmgw is one the config layer understands (LLMGW_<SECTION>_<KEY> for this command).
    section = workload[1].removeprefix("llmgw-")
    for name in env:
        if name.startswith("LLMGW_") and name != config.CONFIG_ENV_VAR:
            assert name.startswith(config.env_var_name(section, "")), name


def test_probe_and_metrics_paths_are_served_by_a_real_gateway(tmp_path):
    """Start `llmgw cluster` (a gateway and one replica, ephemeral loopback ports) and fetch the paths the gateway's
    probes and scrape annotations name: liveness and metrics answer 200, readiness 200 once the replica routes."""
    deployment = find("Deployment", "llmgw-gateway")
    container = only_container(deployment)
    assert resolve_port(container, container["readinessProbe"]["httpGet"]["port"]) == GATEWAY["http"]
    assert resolve_port(container, container["livenessProbe"]["httpGet"]["port"]) == GATEWAY["http"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == GATEWAY["http"]
    paths = {"readiness": container["readinessProbe"]["httpGet"]["path"],
             "liveness": container["livenessProbe"]["httpGet"]["path"], "metrics": annotations["prometheus.io/path"]}
    assert paths == {"readiness": config.READY_PATH, "liveness": config.HEALTH_PATH, "metrics": config.METRICS_PATH}

    proc = subprocess.Popen([sys.executable, "-m", "llmgw", "cluster", "--base-port", "0", "--replicas", "1",
                             "--host", "127.0.0.1"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = _wait_for_cluster_http(proc, timeout_s=60.0)
        assert _get(url + paths["liveness"]) == 200
        assert _get(url + paths["metrics"]) == 200
        assert _get(url + "/no-such-path") == 404  # a wrong path would fail, not pass
        deadline = time.monotonic() + 20.0
        while _get(url + paths["readiness"]) != 200:
            assert time.monotonic() < deadline, "readiness never reached 200 with a replica up"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_for_cluster_http(proc: subprocess.Popen, timeout_s: float) -> str:
    """The gateway's HTTP URL from the cluster's "ready" line; fails with the output if it does not come. A thread
    reads the lines (select() on a buffered pipe misses lines already read into the buffer)."""
    import queue
    import threading

    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)  # the process closed its output: it will not become ready

    threading.Thread(target=read, daemon=True).start()
    output: list[str] = []
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        output.append(line)
        if line.startswith("llmgw cluster ready:"):
            return next(part for part in line.split() if part.startswith("http=")).removeprefix("http=")
    pytest.fail("llmgw cluster did not become ready:\n" + "".join(output))


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code

