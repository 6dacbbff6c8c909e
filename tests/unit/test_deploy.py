"""deploy/ and grafana/: every file parses, the systemd unit verifies, the Kubernetes
manifests pass a schema check (kubernetes-validate, offline) and agree with each other.

Docker builds cannot run here (no engine), so the Dockerfile and compose file are checked
for structure only.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tachymail.config import from_dict

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse the deploy files")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "tachymail.service"


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += load_yaml(path)
    return docs


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def test_every_yaml_and_json_file_parses() -> None:
    paths = [*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml"), *(ROOT / "grafana").rglob("*.yml")]
    assert len(paths) >= 9
    for path in paths:
        assert load_yaml(path), f"{path} is empty"
    dashboards = list((ROOT / "grafana" / "dashboards").glob("*.json"))
    assert dashboards
    for path in dashboards:
        assert json.loads(path.read_text())["panels"]


def rendered_pod_config(pod_name: str, pod_ip: str) -> str:
    """The ConfigMap's template as the StatefulSet's init container renders it for a pod."""
    template = one("ConfigMap", "tachymail")["data"]["tachymail.toml.template"]
    return template.replace("@POD_NAME@", pod_name).replace("@POD_IP@", pod_ip)


def test_container_configuration_is_valid_for_tachymail() -> None:
    for text in (
        (DEPLOY / "tachymail.toml").read_text(),
        (DEPLOY / "cluster" / "node-a.toml").read_text(),
        (DEPLOY / "cluster" / "node-b.toml").read_text(),
        rendered_pod_config("tachymail-0", "10.1.2.3"),
    ):
        config = from_dict(tomllib.loads(text))
        assert {lst.role for lst in config.listeners} == {"mx", "submission", "smtps"}
        assert config.metrics.address == "0.0.0.0:9525"
        assert config.data_path == Path("/var/lib/tachymail")


def test_kustomization_lists_every_manifest() -> None:
    listed = set(load_yaml(K8S / "kustomization.yaml")[0]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_kubernetes_manifests_pass_the_schema_check() -> None:
    validator = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate for the schema check"
    )
    version = validator.latest_version()
    checked = 0
    for doc in manifests():
        if doc["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # a CRD: no schema ships with the validator (checked below by hand)
        validator.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 8


def test_statefulset_keeps_a_queue_per_pod_and_drains() -> None:
    sts = one("StatefulSet")
    claims = sts["spec"]["volumeClaimTemplates"]
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claims[0]["metadata"]["name"]] == "/var/lib/tachymail"
    config = from_dict(tomllib.loads(rendered_pod_config("tachymail-0", "10.1.2.3")))
    assert pod["terminationGracePeriodSeconds"] > config.server.drain_timeout
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_services_and_monitor_point_at_the_pods() -> None:
    sts = one("StatefulSet")
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    port_names = {
        p["name"]: p["containerPort"]
        for p in sts["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert {25, 465, 587, 9525} <= set(port_names.values())
    smtp_ports = set()
    services = [d for d in manifests() if d["kind"] == "Service"]
    for svc in (s for s in services if s["metadata"]["name"] != "tachymail-redis"):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{svc['metadata']['name']}: {port}"
            smtp_ports.add(port["port"])
    assert {25, 465, 587, 9525} <= smtp_ports
    monitor = one("ServiceMonitor")
    metrics = one("Service", "tachymail-metrics")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in metrics["spec"]["ports"]}
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def unit_settings() -> dict[str, str]:
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def test_systemd_unit_is_sandboxed_and_drains() -> None:
    unit = unit_settings()
    assert unit["ProtectSystem"] == "strict"
    assert "/var/lib/tachymail" in unit["ReadWritePaths"]
    assert unit["NoNewPrivileges"] == "yes"
    assert unit["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert int(unit["LimitNOFILE"]) >= 65536
    assert unit["Restart"] == "on-failure"
    assert int(unit["TimeoutStopSec"]) > 30  # the default drain_timeout
    assert "--data-dir /var/lib/tachymail" in unit["ExecStart"]


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # verify wants ExecStart's program to exist: run this interpreter's tachymail instead.
    text = UNIT.read_text().replace(
        "/opt/tachymail/bin/tachymail", f"{sys.executable} -m tachymail"
    )
    unit = tmp_path / "tachymail.service"
    unit.write_text(text)
    out = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "tachymail.service" not in out.stderr, out.stderr


def test_dockerfile_builds_a_wheel_and_runs_unprivileged() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?", text, re.MULTILINE)
    assert len(stages) == 2 and stages[0][1] == "build"
    runtime = text[text.rindex("\nFROM ") :]
    assert "pip wheel" in text[: text.rindex("\nFROM ")]
    assert "COPY --from=build /wheels" in runtime
    assert "gcc" not in runtime
    user = re.findall(r"^USER (\S+)", runtime, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert "STOPSIGNAL SIGTERM" in runtime


def test_compose_runs_tachymail_redis_prometheus_and_grafana() -> None:
    compose = load_yaml(DEPLOY / "docker-compose.yml")[0]
    services = compose["services"]
    assert set(services) == {"tachymail-a", "tachymail-b", "redis", "prometheus", "grafana"}
    grafana_mounts = " ".join(services["grafana"]["volumes"])
    assert "../grafana/provisioning:/etc/grafana/provisioning" in grafana_mounts
    assert "../grafana/dashboards:" in grafana_mounts
    prom = load_yaml(DEPLOY / "prometheus.yml")[0]
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["tachymail-a:9525", "tachymail-b:9525"]
    # The dashboard provider reads where compose mounts the dashboards.
    provider = load_yaml(ROOT / "grafana" / "provisioning" / "dashboards" / "tachymail.yml")[0]
    path = provider["providers"][0]["options"]["path"]
    assert any(m.endswith(":" + path + ":ro") for m in services["grafana"]["volumes"])
    datasource = load_yaml(ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml")[0]
    uid = datasource["datasources"][0]["uid"]
    dashboard = json.loads((ROOT / "grafana" / "dashboards" / "tachymail.json").read_text())
    used = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert used == {uid}


def test_each_pod_renders_its_own_node_name_and_egress_source() -> None:
    pod = one("StatefulSet")["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    script = " ".join(init["command"])
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in init["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_IP": "status.podIP"}
    assert "@POD_NAME@/${POD_NAME}" in script and "@POD_IP@/${POD_IP}" in script
    assert "tachymail config check /etc/tachymail/tachymail.toml" in script
    # The init container writes where the server reads; the template comes from the ConfigMap.
    volumes = {v["name"]: v for v in pod["volumes"]}
    init_mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    main_mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert init_mounts["/etc/tachymail"] == main_mounts["/etc/tachymail"]
    assert "emptyDir" in volumes[main_mounts["/etc/tachymail"]]
    template_volume = volumes[init_mounts["/etc/tachymail-template"]]
    assert template_volume["configMap"]["name"] == "tachymail"
    assert "/etc/tachymail-template/tachymail.toml.template" in script
    assert pod["containers"][0]["args"] == ["serve", "-c", "/etc/tachymail/tachymail.toml"]
    # Two pods: two node names, two sources, one Redis.
    configs = [
        from_dict(tomllib.loads(rendered_pod_config(f"tachymail-{i}", f"10.1.2.{i + 3}")))
        for i in range(2)
    ]
    assert [c.cluster.node for c in configs] == ["tachymail-0", "tachymail-1"]
    assert [c.egress_sources[0].address for c in configs] == ["10.1.2.3", "10.1.2.4"]
    assert configs[1].egress_sources[0].ehlo_name == "tachymail-1.mail.example.com"
    assert [p.name for p in configs[0].egress_pools] == ["default"]
    assert len({c.cluster.redis for c in configs}) == 1
    assert configs[0].cluster.nodes == one("StatefulSet")["spec"]["replicas"]


def test_redis_deployment_and_service_are_what_the_pods_name() -> None:
    deployment = one("Deployment", "tachymail-redis")
    service = one("Service", "tachymail-redis")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in ports
    assert container["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]
    # The tachymail pods' Services do not select Redis, nor the Redis Service tachymail.
    tachymail_labels = one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= tachymail_labels.items()
    url = from_dict(tomllib.loads(rendered_pod_config("tachymail-0", "10.1.2.3"))).cluster.redis
    assert url == f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"


def test_compose_runs_two_nodes_sharing_one_redis() -> None:
    services = load_yaml(DEPLOY / "docker-compose.yml")[0]["services"]
    nodes = {name: svc for name, svc in services.items() if name.startswith("tachymail-")}
    assert set(nodes) == {"tachymail-a", "tachymail-b"}
    names, data_volumes, host_ports = set(), set(), []
    for svc in nodes.values():
        volumes = dict(v.split(":")[:2] for v in svc["volumes"])
        config_file = next(k for k, v in volumes.items() if v == "/etc/tachymail/tachymail.toml")
        config = from_dict(tomllib.loads((DEPLOY / config_file).read_text()))
        assert config.cluster.redis == "redis://redis:6379/0"
        assert config.cluster.nodes == len(nodes)
        names.add(config.cluster.node)
        data_volumes.add(next(k for k, v in volumes.items() if v == "/var/lib/tachymail"))
        host_ports += [p.rsplit(":", 1)[0] for p in svc["ports"]]
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "/healthz" in " ".join(svc["healthcheck"]["test"])
        assert (DEPLOY / svc["build"]["context"] / "pyproject.toml").exists()
    assert len(names) == len(data_volumes) == 2  # a name and a queue of its own each
    assert len(host_ports) == len(set(host_ports))
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
