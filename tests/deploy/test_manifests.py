"""The Kubernetes manifests, alerting rules, dashboard and Dockerfiles, checked with the real tools (kubectl
kustomize, kubernetes-validate, jsonschema with the vendored CRD schemas, promtool, hadolint) and against the
server's own settings and metrics, so a manifest cannot drift from the code it deploys."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import tool
from deploy.tool import (
    DASHBOARD,
    DOCKERFILES,
    PROXY_DOCKERFILE,
    REPOSITORY_ROOT,
    alerting_rules,
    alerts,
    dashboard_named_queries,
    find_object,
    iter_panels,
    load_custom_resource_schemas,
    load_dashboard,
    panel_queries,
    promtool_check_rules,
    query_rule_file,
    scaler_queries,
    validate_object,
    variable_queries,
    write_rule_file,
)
from service.grpc_api.server import LIVENESS_SERVICE
from service.metrics import ServerMetrics
from service.processes.supervisor import Supervisor
from service.settings import ENV_PREFIX, Settings
from tests.deploy.binaries import require_binary
from tests.deploy.dockerfiles import parse_dockerfile

pytestmark = pytest.mark.slow  # trains models or starts servers

OVERLAY_NAMES = ("cpu", "gpu")
DOCS = REPOSITORY_ROOT / "docs" / "deploy.md"


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = find_object(objects, "Deployment", "attnserve")
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "attnserve"]
    return container


def _settings_of(objects: list[dict[str, Any]]) -> Settings:
    configmap = next(
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("attnserve-settings")
    )
    return Settings.from_sources([], configmap["data"])


# ----- rendering and validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*tool.OVERLAYS, "monitoring"])
def test_every_kustomization_renders_and_every_object_validates(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    objects = rendered[name]
    assert objects, f"kubectl kustomize rendered nothing for {name}"
    problems = tool.validate_objects(name, objects)
    assert problems == [], "\n".join(map(str, problems))


def test_overlays_render_the_same_kinds(rendered: dict[str, list[dict[str, Any]]]) -> None:
    expected = {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "ScaledObject",
        "ServiceMonitor",
        "PrometheusRule",
    }
    for name in OVERLAY_NAMES:
        assert {o["kind"] for o in rendered[name]} == expected
        assert {o["metadata"].get("namespace") for o in rendered[name] if o["kind"] != "Namespace"} == {"attnserve"}


def test_plain_manifests_validate(rendered: dict[str, list[dict[str, Any]]]) -> None:
    (loader,) = [d for d in yaml.safe_load_all((tool.K8S / "model-loader.yaml").read_text()) if d]
    assert tool.validate_objects("model-loader.yaml", [loader]) == []
    claim = find_object(rendered["cpu"], "PersistentVolumeClaim")
    assert loader["metadata"]["namespace"] == claim["metadata"]["namespace"]
    (volume,) = loader["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]  # the loader writes while servers read
    server_pod = find_object(rendered["cpu"], "Deployment")["spec"]["template"]["spec"]
    assert loader["spec"]["securityContext"]["runAsUser"] == server_pod["securityContext"]["runAsUser"]


def test_baked_overlay_reads_the_models_from_the_image(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["cpu-baked"]
    assert "PersistentVolumeClaim" not in {o["kind"] for o in objects}
    container = _container(objects)
    assert all(mount["mountPath"] != "/models" for mount in container["volumeMounts"])
    pod = find_object(objects, "Deployment")["spec"]["template"]["spec"]
    assert all("persistentVolumeClaim" not in volume for volume in pod["volumes"])
    assert container["image"].endswith("-cpu-models")
    assert _settings_of(objects).model_repository == Path("/models")  # where the Dockerfile copies them
    assert container["securityContext"] == _container(rendered["cpu"])["securityContext"]


def _mutations() -> list[tuple[str, str, Any]]:
    """(kind, description, mutate(obj)) that each validator must reject."""

    def unknown_container_field(obj: dict[str, Any]) -> None:
        obj["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}

    def string_replicas(obj: dict[str, Any]) -> None:
        obj["spec"]["replicas"] = "two"

    def bad_interval(obj: dict[str, Any]) -> None:
        obj["spec"]["endpoints"][0]["interval"] = "15 seconds"

    def unknown_endpoint_field(obj: dict[str, Any]) -> None:
        obj["spec"]["endpoints"][0]["metricsPort"] = "metrics"

    def rule_without_expr(obj: dict[str, Any]) -> None:
        del obj["spec"]["groups"][0]["rules"][0]["expr"]

    def numeric_threshold(obj: dict[str, Any]) -> None:
        obj["spec"]["triggers"][0]["metadata"]["threshold"] = 48

    def bad_name(obj: dict[str, Any]) -> None:
        obj["metadata"]["name"] = "Attnserve_Monitor"

    return [
        ("Deployment", "misspelt field", unknown_container_field),
        ("Deployment", "wrong type", string_replicas),
        ("ServiceMonitor", "pattern", bad_interval),
        ("ServiceMonitor", "unknown field", unknown_endpoint_field),
        ("PrometheusRule", "required field", rule_without_expr),
        ("ScaledObject", "metadata values are strings", numeric_threshold),
        ("ScaledObject", "object name", bad_name),
    ]


@pytest.mark.parametrize(("kind", "description", "mutate"), _mutations(), ids=[f"{k}-{d}" for k, d, _ in _mutations()])
def test_validators_reject_broken_objects(
    rendered: dict[str, list[dict[str, Any]]], kind: str, description: str, mutate: Any
) -> None:
    schemas = load_custom_resource_schemas()
    original = find_object(rendered["cpu"], kind)
    assert validate_object(original, schemas) == []
    broken = copy.deepcopy(original)
    mutate(broken)
    assert validate_object(broken, schemas) != [], f"{kind} with a broken {description} was accepted"


def test_every_custom_resource_has_a_vendored_schema(rendered: dict[str, list[dict[str, Any]]]) -> None:
    schemas = load_custom_resource_schemas()
    assert set(schemas) == {
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
        ("keda.sh/v1alpha1", "ScaledObject"),
    }
    groups = {(o["apiVersion"], o["kind"]): o["apiVersion"].split("/")[0] for objs in rendered.values() for o in objs}
    # Kubernetes' own groups (apps, networking.k8s.io, ...) are kubernetes-validate's; the others are custom.
    custom = {key for key, group in groups.items() if "." in group and not group.endswith(".k8s.io")}
    assert custom == set(schemas)
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert validate_object(unknown, schemas) != []  # never silently skipped


# ----- the Deployment ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAY_NAMES)
def test_settings_configmap_is_read_by_the_server(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    objects = rendered[name]
    configmap = next(o for o in objects if o["kind"] == "ConfigMap")
    fields = {f"{ENV_PREFIX}{field.upper()}" for field in Settings.model_fields}
    assert set(configmap["data"]) <= fields, f"unknown settings: {set(configmap['data']) - fields}"
    settings = _settings_of(objects)
    container = _container(objects)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": settings.port, "metrics": settings.metrics_port, "http": settings.http_port}
    assert settings.model_repository == Path("/models")
    assert settings.max_connection_age_seconds > 0  # clients re-resolve the headless Service
    assert settings.provider == {"cpu": "cpu", "gpu": "cuda"}[name]
    assert any(ref["configMapRef"]["name"] == configmap["metadata"]["name"] for ref in container["envFrom"])
    cpus_env = {e["name"]: e for e in container["env"]}[f"{ENV_PREFIX}CPUS"]
    assert cpus_env["valueFrom"]["resourceFieldRef"]["resource"] == "requests.cpu"


@pytest.mark.parametrize(("name", "frontends"), [("cpu", 0), ("gpu", 3)])
def test_cpu_derived_choices_follow_the_cpu_request(
    rendered: dict[str, list[dict[str, Any]]], name: str, frontends: int
) -> None:
    # With no CPU limit the server would count every core of the node: the request is passed as ATTNSERVE_CPUS,
    # and nothing CPU-derived (front-end processes, onnxruntime threads) is set apart from it.
    container = _container(rendered[name])
    assert "cpu" not in container["resources"].get("limits", {}), "with a CPU limit, cpus would count it: revisit"
    env = {e["name"] for e in container["env"]}
    assert not env & {f"{ENV_PREFIX}FRONTENDS", f"{ENV_PREFIX}INTRA_OP_THREADS"}
    request = str(container["resources"]["requests"]["cpu"])
    cores = math.ceil(int(request[:-1]) / 1000 if request.endswith("m") else float(request))
    # The kubelet gives requests.cpu with divisor 1 as whole cores, rounded up.
    settings = Settings.from_sources([], {f"{ENV_PREFIX}CPUS": str(cores)})
    assert settings.frontend_processes == frontends, f"{cores} cores requested"


@pytest.mark.parametrize("name", [*OVERLAY_NAMES, "cpu-guarded"])
def test_probes_draining_and_security(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    objects = rendered[name]
    settings = _settings_of(objects)
    pod = find_object(objects, "Deployment")["spec"]["template"]["spec"]
    container = _container(objects)
    for probe_name, service in (("readinessProbe", ""), ("livenessProbe", LIVENESS_SERVICE)):
        probe = container[probe_name]
        assert probe["grpc"]["port"] == settings.port, probe_name  # native grpc.health.v1 probe
        assert probe["grpc"].get("service", "") == service, probe_name
    startup = container["startupProbe"]
    # The HTTP port's KServe v2 liveness: the container port named in it is the server's http_port.
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert settings.http_port and ports[startup["httpGet"]["port"]] == settings.http_port
    assert startup["httpGet"]["path"] == "/v2/health/live"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model loading
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > settings.drain_grace_seconds
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + settings.drain_grace_seconds + 5
    assert find_object(objects, "Deployment")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # The "restricted" Pod Security Standard, which the Namespace enforces.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert not any("hostPath" in volume for volume in pod["volumes"])
    namespace = find_object(objects, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and "/tmp" in mounts
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    claim = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]
    assert find_object(objects, "PersistentVolumeClaim", claim["claimName"])
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]


def test_gpu_overlay_requests_a_gpu_on_gpu_nodes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    gpu_pod = find_object(rendered["gpu"], "Deployment")["spec"]["template"]["spec"]
    resources = _container(rendered["gpu"])["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod["tolerations"]
    assert _container(rendered["gpu"])["image"].endswith("-gpu")
    cpu_pod = find_object(rendered["cpu"], "Deployment")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in _container(rendered["cpu"])["resources"].get("limits", {})
    assert "nodeSelector" not in cpu_pod and "tolerations" not in cpu_pod


# ----- the reset guard (components/reset-guard, in overlays/cpu-guarded) ------------------------------------------


def _args(container: dict[str, Any]) -> dict[str, str]:
    """nghttpx's --option=value arguments of a container, by option."""
    return dict(argument.removeprefix("--").split("=", 1) for argument in container["args"])


def test_the_reset_guard_takes_the_grpc_port_and_passes_calls_to_the_server(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects, plain = rendered["cpu-guarded"], rendered["cpu"]
    settings, plain_settings = _settings_of(objects), _settings_of(plain)
    pod = find_object(objects, "Deployment")["spec"]["template"]["spec"]
    guard, server = (next(c for c in pod["containers"] if c["name"] == name) for name in ("reset-guard", "attnserve"))
    service = find_object(objects, "Service")
    # Clients change nothing: the Service's gRPC port is where the guard listens, the server's former port.
    (grpc_port,) = [port for port in service["spec"]["ports"] if port["name"] == "grpc"]
    assert grpc_port == next(port for port in find_object(plain, "Service")["spec"]["ports"] if port["name"] == "grpc")
    guard_ports = {port["name"]: port["containerPort"] for port in guard["ports"]}
    assert guard_ports == {"grpc": plain_settings.port}
    assert _args(guard) == {
        "frontend": f"0.0.0.0,{plain_settings.port};no-tls",
        "backend": f"127.0.0.1,{settings.port};;proto=h2",
    }
    # The server listens on another port, named apart, and its probes ask it there.
    assert settings.port != plain_settings.port
    server_ports = {port["name"]: port["containerPort"] for port in server["ports"]}
    assert server_ports == {"grpc-server": settings.port, "metrics": settings.metrics_port, "http": settings.http_port}
    for probe in ("readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == settings.port, probe
    # The rest of the server's settings and of its container are the plain overlay's.
    assert settings.model_copy(update={"port": plain_settings.port}) == plain_settings
    unchanged = ("image", "env", "resources", "securityContext", "lifecycle", "volumeMounts", "startupProbe")
    assert {key: server[key] for key in unchanged} == {key: _container(plain)[key] for key in unchanged}
    assert guard["image"].startswith("attnserve-proxy:")


def test_the_reset_guard_runs_restricted_and_drains_with_the_server(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["cpu-guarded"]
    deployment = find_object(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (guard,) = [c for c in pod["containers"] if c["name"] == "reset-guard"]
    server = _container(objects)
    assert guard["securityContext"] == server["securityContext"]
    assert guard["resources"]["requests"]["cpu"] and guard["resources"]["limits"]["memory"]
    # It accepts as long as the server does; its stop signal (the image's) is nghttpx's graceful one.
    assert guard["lifecycle"]["preStop"] == server["lifecycle"]["preStop"]
    instructions = dict(parse_dockerfile(PROXY_DOCKERFILE)[-1]["instructions"])
    assert instructions["STOPSIGNAL"] == "SIGQUIT"
    assert instructions["USER"] == "10001:10001"
    # In --single-process mode nghttpx ignores SIGQUIT; its main process passes it on to the worker.
    assert "--single-process" not in instructions["ENTRYPOINT"]
    # Ready only when a health check through it reaches the server; alive while it accepts, whatever the server does.
    guard_port = {port["name"]: port["containerPort"] for port in guard["ports"]}["grpc"]
    assert guard["readinessProbe"]["grpc"] == {"port": guard_port}
    assert guard["livenessProbe"]["tcpSocket"]["port"] == "grpc"
    assert [c["name"] for c in pod["containers"]] == ["attnserve", "reset-guard"]  # overlays patch the server first
    assert deployment["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == (
        "attnserve"
    )


def test_the_guards_configuration_leaves_its_addresses_to_the_command_line() -> None:
    """nghttpx adds the frontends and backends of its command line to those of its configuration file: one left in
    the file would listen beside the sidecar's, or send calls to a second backend."""
    conf = tool.DEPLOY / "proxy" / "nghttpx.conf"
    options = dict(
        line.split("=", 1) for line in conf.read_text().splitlines() if line.strip() and not line.startswith("#")
    )
    assert not {"frontend", "backend"} & set(options)
    # The forwarded client address the server keys its turns on (service/grpc_api/peers.py), never the client's.
    assert options["add-x-forwarded-for"] == options["strip-incoming-x-forwarded-for"] == "yes"
    instructions = parse_dockerfile(PROXY_DOCKERFILE)[-1]["instructions"]
    (copied,) = [arguments.split() for instruction, arguments in instructions if instruction == "COPY"]
    assert copied == ["deploy/proxy/nghttpx.conf", "/etc/nghttpx/nghttpx.conf"]
    entrypoint = json.loads(dict(instructions)["ENTRYPOINT"])
    assert f"--conf={copied[1]}" in entrypoint


def test_the_network_policy_keeps_clients_off_the_servers_own_grpc_port(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["cpu-guarded"]
    policy = find_object(objects, "NetworkPolicy")
    pod_labels = find_object(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert "from" not in rule  # from anywhere, to these ports only
    open_ports = {port["port"] for port in rule["ports"]}
    assert open_ports == {"grpc", "metrics", "http"}
    # Each named port is a container port of the pod, and the server's own gRPC port is not among them.
    pod = find_object(objects, "Deployment")["spec"]["template"]["spec"]
    named = {port["name"]: port["containerPort"] for c in pod["containers"] for port in c["ports"]}
    assert open_ports <= set(named)
    assert _settings_of(objects).port not in {named[name] for name in open_ports}
    # The Service's ports are the ones the policy opens.
    assert {port["targetPort"] for port in find_object(objects, "Service")["spec"]["ports"]} == open_ports


# ----- balancing, autoscaling, disruption, monitoring objects -------------------------------------------------------


@pytest.mark.parametrize("name", [*OVERLAY_NAMES, "cpu-guarded"])
def test_objects_select_the_server_pods(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    objects = rendered[name]
    deployment = find_object(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= pod_labels.items()

    service = find_object(objects, "Service")
    assert service["spec"]["clusterIP"] == "None"  # headless: DNS returns every ready pod for round_robin
    assert service["spec"]["selector"].items() <= pod_labels.items()
    pod = deployment["spec"]["template"]["spec"]
    container_ports = {port["name"] for container in pod["containers"] for port in container["ports"]}
    # Every Service port names a container port of the pod (the reset guard's, for gRPC, where it stands in front).
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= container_ports
    assert "replicas" not in deployment["spec"]  # owned by the autoscaler

    budget = find_object(objects, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    monitor = find_object(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} == {"metrics"}

    scaled = find_object(objects, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] >= 2 and budget["spec"]["maxUnavailable"] == 1
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert float(trigger["metadata"]["threshold"]) > 0
    assert "attnserve_requests_waiting" in trigger["metadata"]["query"]


# ----- alerting rules -----------------------------------------------------------------------------------------------


def test_alerts_cover_the_issue_and_each_has_a_runbook() -> None:
    rules = alerts()
    by_name = {rule["alert"]: rule for rule in rules}
    assert {
        "AttnserveHighErrorRatio",
        "AttnserveLatencyP99AboveSLO",
        "AttnserveQueueSaturated",
        "AttnserveNoReadyReplicas",
    } <= set(by_name)
    docs = DOCS.read_text()
    for name, rule in by_name.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        anchor = name.lower()
        assert f"docs/deploy.md#{anchor}" in annotations["runbook"], name
        assert re.search(rf"^#+ {name}\s*$", docs, re.MULTILINE), f"docs/deploy.md has no section {name}"


def test_promtool_accepts_the_rules_and_rejects_a_broken_one(tmp_path: Path) -> None:
    require_binary("promtool")
    good = promtool_check_rules(write_rule_file(tmp_path / "good.yml"))
    assert good.returncode == 0, good.stdout + good.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in good.stdout
    broken = copy.deepcopy(alerting_rules())
    broken["groups"][0]["rules"][0]["expr"] = "sum(rate(attnserve_requests_total[5m])"
    result = promtool_check_rules(write_rule_file(tmp_path / "broken.yml", broken))
    assert result.returncode != 0


def test_the_restart_alert_sees_the_first_restart_too(tmp_path: Path) -> None:
    """promtool's rule unit test: the supervisor's counter appears at a role's first restart already at 1 (p1),
    or counts up from 0 (p2); both fire for 10 minutes; a counter that stays at 0 (p3) never does."""
    promtool = require_binary("promtool")
    (rule,) = [copy.deepcopy(rule) for rule in alerts() if rule["alert"] == "AttnserveProcessRestarts"]
    del rule["annotations"]  # promtool would compare them too
    write_rule_file(tmp_path / "rules.yml", {"groups": [{"name": "restarts", "rules": [rule]}]})
    series = 'attnserve_process_restarts_total{{job="attnserve", instance="{}", role="engine"}}'
    fired = [
        {"exp_labels": {"severity": "warning", "job": "attnserve", "instance": pod, "role": "engine"}}
        for pod in ("p1", "p2")
    ]
    test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": series.format("p1"), "values": "_x20 1x40"},
                    {"series": series.format("p2"), "values": "0x19 1x40"},
                    {"series": series.format("p3"), "values": "0x60"},
                ],
                "alert_rule_test": [
                    {"eval_time": "19m", "alertname": rule["alert"], "exp_alerts": []},
                    {"eval_time": "25m", "alertname": rule["alert"], "exp_alerts": fired},
                    {"eval_time": "35m", "alertname": rule["alert"], "exp_alerts": []},
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    result = tool.run_tool([promtool, "test", "rules", str(tmp_path / "test.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


# ----- dashboard ------------------------------------------------------------------------------------------------------


def _exposed_sample_names() -> set[str]:
    """Every sample name a ServerMetrics registry, or the supervisor of `--frontends N` (its restarts counter),
    can expose, derived from their families' types."""
    names: set[str] = set()
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "summary": ("_sum", "_count", "_created"),
    }
    supervisor = Supervisor(Settings(), [], frontends=1)  # its children are not started
    shutil.rmtree(supervisor.runtime_dir)
    for collectors in (ServerMetrics().collectors, supervisor.collectors):
        for family in collectors.collect():
            names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


def test_every_metric_the_deployment_queries_is_one_the_server_exports(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    exposed = _exposed_sample_names()
    texts = [query.expr for query in panel_queries(load_dashboard())]
    texts += [variable.selector for variable in variable_queries(load_dashboard())]
    texts += [rule["expr"] for rule in alerts()]
    texts += scaler_queries(rendered["cpu"]) + scaler_queries(rendered["gpu"])
    used = {name for text in texts for name in re.findall(r"\battnserve_[a-z_]+\b", text)}
    assert used, "no attnserve metric found in the queries"
    assert used <= exposed, f"queried but never exported: {sorted(used - exposed)}"
    # The dashboard shows what the issue asks for.
    for wanted in (
        "attnserve_requests_total",
        "attnserve_request_duration_seconds_bucket",
        "attnserve_time_to_first_token_seconds_bucket",
        "attnserve_queue_wait_seconds_bucket",
        "attnserve_requests_waiting",
        "attnserve_requests_running",
        "attnserve_decoder_batch_hypotheses_bucket",
        "attnserve_generated_tokens_total",
    ):
        assert wanted in used, wanted


def test_dashboard_layout_datasource_and_variables() -> None:
    dashboard = load_dashboard()
    panels = list(iter_panels(dashboard))
    assert len({panel["id"] for panel in panels}) == len(panels)
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel.get("description"), panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
    names = [variable["name"] for variable in dashboard["templating"]["list"]]
    assert names == ["datasource", "job", "namespace", "model"]
    model = dashboard["templating"]["list"][3]
    assert model["includeAll"] and model["multi"] and model["allValue"] == ".*"
    for query in panel_queries(dashboard):
        if "attnserve_" in query.expr:
            assert "$model" in query.expr, f"{query.panel}: not filtered by the model variable"
        assert "$job" in query.expr, f"{query.panel}: not filtered by the job variable"


def test_dashboard_queries_parse(tmp_path: Path, rendered: dict[str, list[dict[str, Any]]]) -> None:
    require_binary("promtool")
    named = dashboard_named_queries(load_dashboard())
    named += [
        (f"scaler_{i}", q) for i, q in enumerate(scaler_queries(rendered["cpu"]) + scaler_queries(rendered["gpu"]))
    ]
    result = promtool_check_rules(write_rule_file(tmp_path / "queries.yml", query_rule_file(named)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_configmap_carries_the_json(rendered: dict[str, list[dict[str, Any]]]) -> None:
    (configmap,) = rendered["monitoring"]
    assert configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["attnserve-dashboard.json"]) == json.loads(DASHBOARD.read_text())


# ----- Dockerfiles ----------------------------------------------------------------------------------------------------


def test_hadolint_accepts_the_dockerfiles() -> None:
    hadolint = require_binary("hadolint")
    result = tool.run_tool([hadolint, *map(str, DOCKERFILES), str(PROXY_DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


# The project's extra that brings onnxruntime into each image: the CPU package, or onnxruntime-gpu.
RUNTIME_EXTRAS = {"Dockerfile": "cpu", "Dockerfile.gpu": "gpu"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_dockerfile_is_multi_stage_non_root_and_torch_free(path: Path) -> None:
    stages = parse_dockerfile(path)
    assert [stage["name"] for stage in stages] == ["build", "serving"]
    build, serving = stages
    assert build["base"] == serving["base"]  # the venv is copied across: same interpreter in both
    runs = [arguments for instruction, arguments in build["instructions"] if instruction == "RUN"]
    assert f"sh deploy/docker/install-serving.sh /opt/attnserve /src {RUNTIME_EXTRAS[path.name]}" in runs
    copies = [arguments for instruction, arguments in serving["instructions"] if instruction == "COPY"]
    assert "--from=build /opt/attnserve /opt/attnserve" in copies
    assert "${MODEL_REPOSITORY}/ /models/" in copies
    (user,) = [arguments for instruction, arguments in serving["instructions"] if instruction == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    assert ("ENTRYPOINT", '["attnserve"]') in serving["instructions"] and ("CMD", '["serve"]') in serving[
        "instructions"
    ]
    exposed = {
        int(p)
        for instruction, arguments in serving["instructions"]
        if instruction == "EXPOSE"
        for p in arguments.split()
    }
    defaults = Settings()
    # The gRPC and metrics ports; the HTTP port too once deploy/docker exposes it (EXPOSE only documents).
    assert (
        {defaults.port, defaults.metrics_port} <= exposed <= {defaults.port, defaults.metrics_port, defaults.http_port}
    )
    instructions = [arguments for stage in stages for _, arguments in stage["instructions"]]
    assert not any("torch" in arguments or "[train" in arguments for arguments in instructions)


def test_both_images_install_the_same_way() -> None:
    cpu, gpu = (parse_dockerfile(path) for path in DOCKERFILES)

    def install_steps(stages: list[dict[str, Any]], extra: str) -> list[tuple[str, str]]:
        # The same steps, but for the runtime extra install-serving.sh is given.
        return [
            (i, a.removesuffix(f" {extra}"))
            for i, a in stages[0]["instructions"]
            if i in ("COPY", "WORKDIR") or "install-serving.sh" in a
        ]

    assert install_steps(cpu, "cpu") == install_steps(gpu, "gpu")
    assert "nvidia/cuda:13." in DOCKERFILES[1].read_text() and "cudnn" in DOCKERFILES[1].read_text()


def test_dockerignore_keeps_what_the_images_copy() -> None:
    ignored = [
        line.strip()
        for line in (REPOSITORY_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in ("pyproject.toml", "README.md", "service", "deploy/docker", "deploy/proxy", "models"):
        assert needed not in ignored
    for heavy in (".git", ".venv", "runs", "tests"):
        assert heavy in ignored
    assert (REPOSITORY_ROOT / "deploy/docker/no-models/README.md").is_file()  # the default MODEL_REPOSITORY
