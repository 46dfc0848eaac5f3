"""Checks for the deployment and monitoring files (Docker, Compose, Prometheus, Grafana).

These guard the parts of the contract that live outside the Python package: the
dashboard and alerts must only use metric names the daemon promises to export
(CONTRACT.md), and the compose stack must keep running migrations before the
daemon. Checks that need an external tool are skipped, with the reason, only
when that tool is not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the compose and rule files")

REPO = Path(__file__).resolve().parents[1]
CONTRACT = REPO.parent / "shared" / "CONTRACT.md"
COMPOSE = REPO / "docker-compose.yml"
PROM_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "fleetticketsd.json"
COMPOSE_CONFIG = REPO / "deploy" / "config.compose.toml"
DOCKERFILE = REPO / "Dockerfile"

# Panels operators were promised; a missing one is as much a regression as a bad query.
REQUIRED_PANELS = {
    "Source lag per dataset",
    "Pending files",
    "Files applied rate",
    "Rows upserted rate",
    "Rows rejected by reason",
    "Poll failures by stage",
    "Dataset blocked",
    "Last success age",
    "Poll duration p95",
    "Apply delay p50 / p95",
    "Geocode queue depth",
    "Geocode budget remaining",
    "Geocode requests by outcome",
    "Config reload status",
}


def _run(cmd: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, (
        f"{' '.join(proc.args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian packages: prometheus, docker-compose)")
    return path


# --------------------------------------------------------------------------- metric names


def contract_metrics() -> set[str]:
    """Metric names from the table under '## Metrics' in CONTRACT.md."""
    if not CONTRACT.is_file():
        pytest.skip(f"contract not found at {CONTRACT} (shared/ must sit beside the repo)")
    names: set[str] = set()
    in_section = False
    for line in CONTRACT.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            in_section = line.startswith("## Metrics")
            continue
        m = re.match(r"^\|\s*`([A-Za-z_:][A-Za-z0-9_:]*)", line)
        if in_section and m:
            names.add(m.group(1))
    assert names, "no metric table found under '## Metrics' in CONTRACT.md"
    return names


def freshness_metrics() -> set[str]:
    """Metric names CONTRACT.md's '## Freshness' section adds (outside the table)."""
    text = CONTRACT.read_text(encoding="utf-8")
    section = text.split("\n## Freshness", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(fleettickets_[a-z0-9_]+)(?:\{[^}]*\})?`", section))


def allowed_metrics() -> set[str]:
    # Histograms expose _bucket/_count/_sum series; `up` is Prometheus' own.
    base = contract_metrics() | freshness_metrics()
    return base | {f"{n}{s}" for n in base for s in ("_bucket", "_count", "_sum")} | {"up"}


_PROMQL_WORDS = frozenset(
    "by without on ignoring group_left group_right and or unless bool offset inf nan".split()
)


def metric_names(expr: str) -> set[str]:
    """Metric names used in a PromQL expression (Grafana variables allowed).

    A lexical approximation that is exact for the expression styles used in
    this repo: it drops strings, label matchers, range selectors, grouping
    label lists and $variables, then every remaining identifier not followed
    by '(' (a function or aggregation) and not a keyword is a metric name.
    """
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)
    found: set[str] = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end() :].lstrip().startswith("(") or m.group().lower() in _PROMQL_WORDS:
            continue
        found.add(m.group())
    return found


def test_metric_name_extraction() -> None:
    # Guards the dashboard check below against passing vacuously.
    expr = (
        "histogram_quantile(0.95, sum by (dataset, le) "
        '(rate(fleettickets_poll_duration_seconds_bucket{dataset=~"$dataset"}[$__rate_interval])))'
        " + on() group_left time() - foo_total offset 5m"
    )
    assert metric_names(expr) == {"fleettickets_poll_duration_seconds_bucket", "foo_total"}


# --------------------------------------------------------------------------- compose


def _compose_cmd() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and _run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    pytest.skip("neither docker-compose nor the docker compose plugin is installed")


def test_compose_config_valid() -> None:
    _assert_ok(_run([*_compose_cmd(), "-f", str(COMPOSE), "config", "-q"]))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    return cmd.split() if isinstance(cmd, str) else list(cmd or [])


def test_compose_daemon_runs_and_migrate_migrates(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert _command(services["fleetticketsd"]) == ["run"]
    assert _command(services["migrate"]) == ["migrate"]


def test_compose_daemon_runs_as_a_runtime_member_and_only_migrate_as_the_owner(
    compose: dict[str, Any],
) -> None:
    from urllib.parse import urlsplit

    services = compose["services"]
    owner = services["postgres"]["environment"]["POSTGRES_USER"]
    users = {
        name: urlsplit(services[name]["environment"]["DATABASE_URL"]).username
        for name in services
        if "DATABASE_URL" in (services[name].get("environment") or {})
    }
    assert users == {"migrate": owner, "fleetticketsd": "fleetticketsd_daemon"}
    init = REPO / "deploy" / "postgres" / "10-fleetticketsd-roles.sh"
    assert any(
        str(v).startswith("./deploy/postgres/10-fleetticketsd-roles.sh:")
        for v in services["postgres"]["volumes"]
    )
    assert (
        "CREATE ROLE fleetticketsd_daemon LOGIN PASSWORD :'daemon_password' IN ROLE fleetticketsd_runtime;"
        in (init.read_text())
    )


def test_compose_daemon_waits_for_migrations(compose: dict[str, Any]) -> None:
    # The daemon's readiness requires current migrations; starting it first only flaps.
    deps = compose["services"]["fleetticketsd"]["depends_on"]
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert "seed" in deps
    migrate_deps = compose["services"]["migrate"]["depends_on"]
    assert migrate_deps["postgres"]["condition"] == "service_healthy"


def test_compose_ports_loopback_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"


def test_compose_config_file_has_no_secrets_and_inc_history_hook() -> None:
    cfg = tomllib.loads(COMPOSE_CONFIG.read_text(encoding="utf-8"))
    # The contract's sections plus [daemon]/[logging], which the code also accepts.
    sections = "database s3 server schedule datasets geocoder daemon logging"
    assert set(cfg) <= set(sections.split())
    assert set(cfg["datasets"]) == {"inc", "crq"}
    # INC's history hook (migrations/0004_read_side.sql); CRQ has no history yet.
    assert cfg["datasets"]["inc"]["post_apply"] == ["capture_history"]
    assert "post_apply" not in cfg["datasets"]["crq"]
    # Password only via DATABASE_URL: userinfo must not contain ':'.
    userinfo = cfg["database"]["url"].split("://", 1)[1].split("@", 1)[0]
    assert ":" not in userinfo, "database.url must not carry a password"
    assert cfg["geocoder"]["enabled"] is False


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_runs_daemon_as_non_root() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert 'ENTRYPOINT ["fleetticketsd"]' in text
    assert 'CMD ["run"]' in text
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and not users[-1].startswith(("root", "0")), "final stage must not run as root"
    assert "/healthz" in text and "HEALTHCHECK" in text


# --------------------------------------------------------------------------- Prometheus


def test_promtool_check_rules() -> None:
    _assert_ok(_run([_need("promtool"), "check", "rules", str(PROM_DIR / "alerts.yml")]))


def test_promtool_test_rules() -> None:
    # rule_files in the test file are relative to it, so run from its directory.
    _assert_ok(_run([_need("promtool"), "test", "rules", "alerts_test.yml"], cwd=PROM_DIR))


def test_promtool_check_config() -> None:
    _assert_ok(_run([_need("promtool"), "check", "config", "prometheus.yml"], cwd=PROM_DIR))


def test_alerts_use_contract_metrics() -> None:
    allowed = allowed_metrics()
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text(encoding="utf-8"))
    for group in rules["groups"]:
        for rule in group["rules"]:
            unknown = metric_names(rule["expr"]) - allowed
            assert not unknown, f"{rule['alert']} uses metrics not in CONTRACT.md: {unknown}"
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])
            assert rule["annotations"]["runbook_url"].startswith("docs/operations.md#")


# --------------------------------------------------------------------------- Grafana


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside collapsed rows
    return [p for p in out if p.get("type") != "row"]


def test_dashboard_has_required_panels(dashboard: dict[str, Any]) -> None:
    titles = {p["title"] for p in _panels(dashboard)}
    assert REQUIRED_PANELS <= titles, f"missing panels: {REQUIRED_PANELS - titles}"
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def _dashboard_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    exprs = [
        (panel["title"], target["expr"])
        for panel in _panels(dash)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        m = re.match(r"\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*$", query)
        if m:
            exprs.append((f"variable {var['name']}", m.group(1)))
    return exprs


def test_dashboard_uses_contract_metrics(dashboard: dict[str, Any]) -> None:
    allowed = allowed_metrics()
    exprs = _dashboard_exprs(dashboard)
    assert exprs
    for where, expr in exprs:
        used = metric_names(expr)
        assert used, f"{where}: no metric found in {expr!r}"
        assert used <= allowed, f"{where}: metrics not in CONTRACT.md: {used - allowed}"


def test_dashboard_exprs_are_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    promtool = _need("promtool")
    # promtool parses recording rules, so wrap each query in one; Grafana's
    # variables are replaced by what Grafana would interpolate.
    rules = [
        {
            "record": f"dashboard:expr_{i}",
            "expr": expr.replace("$__rate_interval", "1m").replace("$dataset", ".*"),
        }
        for i, (_, expr) in enumerate(_dashboard_exprs(dashboard))
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _assert_ok(_run([promtool, "check", "rules", str(path)]))
