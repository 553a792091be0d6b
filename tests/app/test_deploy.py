"""The deployment files, checked without Docker or a cluster: compose.yaml against the Compose
Specification's JSON schema, deploy/k8s against Kubernetes' (both vendored in
tests/data/schemas, whose README says from where), then what a schema cannot know: every
`tessera` command they run exists, every TESSERA_ variable is a setting, the probes reach the
port the server binds, services start in order, and retraining never overlaps itself."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = ROOT / "tests" / "data" / "schemas"
TESSERA = [sys.executable, "-m", "app.cli"]
SERVICES = {"postgres", "minio", "createbucket", "migrate", "web", "retrain"}

Doc = dict[str, Any]


def _compose() -> Doc:
    doc: Doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return doc


def _manifests() -> list[tuple[str, Doc]]:
    """(file name, document) for every document of every file in deploy/k8s."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def _of_kind(kind: str) -> list[Doc]:
    return [doc for _, doc in _manifests() if doc["kind"] == kind]


def _errors(validator: jsonschema_rs.Validator, doc: Doc) -> list[str]:
    return [
        f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


@cache
def _compose_validator() -> jsonschema_rs.Validator:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text(encoding="utf-8"))
    return jsonschema_rs.validator_for(schema)


@cache
def _kubernetes_validator(api_version: str, kind: str) -> jsonschema_rs.Validator:
    schema = json.loads((SCHEMAS / "kubernetes-1.37-strict.json").read_text(encoding="utf-8"))
    group, _, version = api_version.rpartition("/")
    wanted = {"group": group, "version": version, "kind": kind}
    names = [
        name
        for name, definition in schema["$defs"].items()
        if wanted in definition.get("x-kubernetes-group-version-kind", [])
    ]
    assert names, f"no schema for {api_version} {kind}: add it to make_kubernetes_schema.py"
    root = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": f"#/$defs/{names[0]}"}
    return jsonschema_rs.validator_for(root)


def _kubernetes_errors(doc: Doc) -> list[str]:
    return _errors(_kubernetes_validator(doc["apiVersion"], doc["kind"]), doc)


def _pod_specs() -> list[Doc]:
    specs = [doc["spec"]["template"]["spec"] for doc in _of_kind("Deployment")]
    specs += [doc["spec"]["template"]["spec"] for doc in _of_kind("Job")]
    specs += [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"] for doc in _of_kind("CronJob")]
    return specs


def _containers() -> list[Doc]:
    return [c for spec in _pod_specs() for c in spec["containers"]]


def _tessera_commands() -> list[list[str]]:
    """Every `tessera ...` that compose.yaml and deploy/k8s run, or that their comments tell a
    person to run (`docker compose run --rm web tessera ...`), without the `tessera`."""
    commands = [
        list(service["command"])
        for service in _compose()["services"].values()
        if service.get("command", [""])[0] == "tessera"
    ]
    commands += [c["command"] for c in _containers()]
    for line in COMPOSE.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and "docker compose run" in line:
            words = shlex.split(line.lstrip("# "))
            commands.append(words[words.index("tessera") :])
    assert all(command[0] == "tessera" for command in commands), commands
    return [command[1:] for command in commands]


def test_compose_file_follows_the_compose_specification() -> None:
    assert _errors(_compose_validator(), _compose()) == []


def test_a_misspelt_compose_key_or_condition_fails_the_schema() -> None:
    misspelt = _compose()
    misspelt["services"]["web"]["healthchek"] = misspelt["services"]["web"].pop("healthcheck")
    assert any("healthchek" in e for e in _errors(_compose_validator(), misspelt))

    wrong_condition = _compose()
    wrong_condition["services"]["web"]["depends_on"]["migrate"]["condition"] = "service_done"
    assert _errors(_compose_validator(), wrong_condition)


def test_compose_services_wait_for_what_they_need() -> None:
    services = _compose()["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        for needed, how in service.get("depends_on", {}).items():
            condition = how["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[needed], f"{name} waits on {needed}'s health"
            else:
                assert condition == "service_completed_successfully", (name, needed)
                assert services[needed]["restart"] == "no", f"{needed} is a one-shot"
    assert services["postgres"]["healthcheck"]["test"][1] == "pg_isready"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("web", "retrain"):
        assert set(services[name]["depends_on"]) == {"migrate", "createbucket"}
    assert "/healthz" in " ".join(services["web"]["healthcheck"]["test"])


def test_compose_runs_migrations_several_workers_and_the_scheduler() -> None:
    services = _compose()["services"]
    assert services["migrate"]["command"] == ["tessera", "db", "upgrade"]
    assert services["retrain"]["command"] == ["tessera", "schedule"]
    web = services["web"]["command"]
    assert web[:2] == ["tessera", "serve"] and int(web[web.index("--workers") + 1]) > 1
    port = web[web.index("--port") + 1]
    assert services["web"]["ports"] == [f"127.0.0.1:{port}:{port}"]
    env = services["web"]["environment"]
    assert env["TESSERA_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["TESSERA_STORAGE_URL"] == "s3://tessera/data"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "tessera" in services["createbucket"]["command"][-1]  # the bucket of the URL
    assert services["retrain"]["environment"] == env == services["migrate"]["environment"]


@pytest.mark.parametrize(
    ("name", "doc"), _manifests(), ids=[f"{n}:{d['kind']}" for n, d in _manifests()]
)
def test_manifest_follows_the_kubernetes_schema(name: str, doc: Doc) -> None:
    assert _kubernetes_errors(doc) == [], name


def test_a_misspelt_manifest_key_fails_the_schema() -> None:
    (deployment,) = copy.deepcopy(_of_kind("Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    assert any("livenesProbe" in e for e in _kubernetes_errors(deployment))


def test_every_container_runs_tessera_from_one_image_with_the_shared_settings() -> None:
    (config_map,) = _of_kind("ConfigMap")
    containers = _containers()
    assert len(containers) == 3  # web, migrate, retrain
    assert len({c["image"] for c in containers}) == 1
    for container in containers:
        assert container["command"][0] == "tessera", container["name"]
        sources = container["envFrom"]
        assert {"configMapRef": {"name": config_map["metadata"]["name"]}} in sources
        assert {"secretRef": {"name": "tessera"}} in sources
        assert "limits" in container["resources"], container["name"]


def test_the_probes_and_the_service_reach_the_port_the_server_binds() -> None:
    (deployment,) = _of_kind("Deployment")
    (service,) = _of_kind("Service")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["tessera", "serve"] and int(command[command.index("--workers") + 1]) > 1
    port = int(command[command.index("--port") + 1])
    names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in names.values()

    def resolve(target: int | str) -> int:
        return names[target] if isinstance(target, str) else target

    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
        assert resolve(container[probe]["httpGet"]["port"]) == port
    assert [resolve(p["targetPort"]) for p in service["spec"]["ports"]] == [port]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["replicas"] > 1


def test_the_jobs_migrate_once_and_retrain_one_round_at_a_time() -> None:
    (migrate,) = _of_kind("Job")
    (container,) = migrate["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["tessera", "db", "upgrade"]
    (cron,) = _of_kind("CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert (
        container["command"][:2] == ["tessera", "retrain"] and "--project" in container["command"]
    )


def test_every_tessera_variable_named_is_a_setting() -> None:
    known = {f"TESSERA_{name.upper()}" for name in Settings.model_fields}
    texts = [COMPOSE.read_text(encoding="utf-8")]
    texts += [path.read_text(encoding="utf-8") for path in sorted(K8S.glob("*.yaml"))]
    named = {m for text in texts for m in re.findall(r"\bTESSERA_[A-Z0-9_]+\b", text)}
    assert named, "the pattern finds the variables"
    assert named - known == set()
    assert {"TESSERA_DATABASE_URL", "TESSERA_SECRET_KEY", "TESSERA_STORAGE_URL"} <= named


def test_every_tessera_command_exists() -> None:
    """`--help` after the arguments: the command and each option's name must exist (click
    parses them all before --help answers); a misspelt option fails with exit code 2."""
    commands = _tessera_commands()
    assert ["retrain", "--project", "demo"] in commands and ["schedule"] in commands
    misspelt = ("serve", "--wrkers", "2")
    results = _help_of({tuple(c) for c in commands} | {misspelt})
    assert results.pop(misspelt)[0] == 2
    assert {shlex.join(c): err for c, (code, err) in results.items() if code != 0} == {}


def _help_of(commands: set[tuple[str, ...]]) -> dict[tuple[str, ...], tuple[int, str]]:
    """Each command's exit code and end of stderr with --help, the processes side by side."""
    processes = {
        command: subprocess.Popen(
            [*TESSERA, *command, "--help"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for command in commands
    }
    results = {}
    for command, process in processes.items():
        _, stderr = process.communicate(timeout=60)
        results[command] = (process.returncode, stderr[-400:])
    return results
