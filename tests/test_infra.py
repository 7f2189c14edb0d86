"""infra/ describes what runs for real elsewhere: the Kubernetes deployment declares the
same flow as the process-pool one that the deployment tests run, and the container and
Kubernetes descriptions of the team stack declare what `visionops stack up` runs."""

from __future__ import annotations

import configparser
import importlib.machinery
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from projects import REPO
from sqlalchemy.engine import make_url

from visionops.ops.stack import (
    ADMIN,
    BUCKETS,
    CLIENT_HTTP_RETRIES,
    DATABASES,
    DEFAULT_PORTS,
    SERVICES,
    USERS,
    WORK_POOL,
    Stack,
)


def test_kubernetes_deployment_matches_the_process_pool_one():
    process = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]
    k8s = yaml.safe_load((REPO / "infra" / "kubernetes" / "prefect.yaml").read_text())
    (deployment,) = k8s["deployments"]
    for key in ("entrypoint", "parameters", "schedules", "concurrency_limit"):
        assert deployment[key] == process[key], key
    assert deployment["work_pool"]["job_variables"]["image"] == "{{ $VISIONOPS_IMAGE }}"
    (step,) = k8s["pull"]
    workdir = step["prefect.deployments.steps.set_working_directory"]["directory"]
    dockerfile = (REPO / "infra" / "Dockerfile").read_text()
    assert f"WORKDIR {workdir}" in dockerfile
    for package in ("visionops", "tasks", "flows"):
        assert f"COPY {package} {package}" in dockerfile


# -- the team stack in containers (infra/compose.yaml) and on Kubernetes ---------------
# These files are not run here (no Docker engine, no cluster): they are checked against
# what `visionops stack up` (visionops/ops/stack.py) runs for real, read from its code.

INFRA = REPO / "infra"
# the compose service for each part of the local stack, and the port key it publishes
COMPOSE_SERVICE = {"s3": "s3", "mlflow": "mlflow", "prefect-server": "prefect-server",
                   "prefect-worker": "prefect-worker"}
PORT_KEY = {"s3": "s3", "mlflow": "mlflow", "prefect-server": "prefect"}
# one-shot jobs doing what `stack up` does between starts: buckets, then MLflow users
ONE_SHOT = {"buckets", "mlflow-users"}
# On Kubernetes the MLflow server's database URLs carry no password; libpq reads this.
KUBERNETES_MLFLOW_EXTRA_ENV = {"PGPASSWORD"}
DUMMY_SECRETS = {"mlflow_admin": "admin-pw", "mlflow_writer": "writer-pw",
                 "mlflow_reviewer": "reviewer-pw", "s3_access_key": "access",
                 "s3_secret_key": "secret", "flask_secret_key": "flask"}
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


def _stack(state_dir: Path) -> Stack:
    return Stack(project=Path("."), state_dir=state_dir, ports=dict(DEFAULT_PORTS),
                 secrets=dict(DUMMY_SECRETS))


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> dict[str, dict]:
    """What `visionops stack up` starts, without starting anything: each server's command
    line and the environment stack.py sets for it (the caller's own left out)."""
    stack = _stack(tmp_path_factory.mktemp("stack"))
    started = {name: {"argv": stack.launch(name).command, "env": stack.launch(name).env}
               for name in SERVICES if name != "s3"}
    started["mlflow"]["auth_config"] = stack.auth_config_text()
    started["client_env"] = stack.client_env()
    return started


def _env_example() -> dict[str, str]:
    lines = (INFRA / ".env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def _interpolate(value, variables: dict[str, str]):
    """Compose's interpolation of ${VAR}, ${VAR:-default}, ${VAR:?error} and $$."""
    if isinstance(value, dict):
        return {key: _interpolate(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item, variables) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, operator, default = match.groups()
        if variables.get(name):
            return variables[name]
        if operator in (":-", "-"):
            return default
        raise KeyError(f"{name} is not set")

    return "$".join(VARIABLE.sub(substitute, part) for part in value.split("$$"))


@pytest.fixture(scope="module")
def compose_text() -> str:
    return (INFRA / "compose.yaml").read_text()


@pytest.fixture(scope="module")
def compose(compose_text) -> dict:
    """infra/compose.yaml as Compose sees it with infra/.env.example's values."""
    return _interpolate(yaml.safe_load(compose_text), _env_example())


def _env(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def _published(service: dict) -> dict[int, int]:
    """{published port: container port} of a service's short-syntax `ports`."""
    pairs = (str(port).split(":")[-2:] for port in service.get("ports", []))
    return {int(published): int(target) for published, target in pairs}


def _words(argv: list[str]) -> list[str]:
    """A command line's leading words, before its first option."""
    words = []
    for part in argv:
        if part.startswith("-"):
            break
        words.append(Path(part).name if not words else part)
    return words


def _options(argv: list[str]) -> dict[str, str]:
    """--option value and --option=value pairs; a lone flag maps to ''."""
    options = {}
    for index, part in enumerate(argv):
        if not part.startswith("--"):
            continue
        name, equals, value = part.partition("=")
        following = argv[index + 1] if index + 1 < len(argv) else "--"
        options[name] = value if equals else ("" if following.startswith("-") else following)
    return options


def _database(url: str) -> tuple[str, str]:
    parsed = make_url(url)
    return parsed.drivername, parsed.database


def _netloc(url: str) -> str:
    return urlsplit(url).netloc


def test_compose_has_a_service_for_each_part_of_the_local_stack(compose):
    expected = {COMPOSE_SERVICE[name] for name in SERVICES} | {"postgres"} | ONE_SHOT
    assert set(compose["services"]) == expected
    for name in ONE_SHOT:
        assert compose["services"][name]["restart"] == "no", name


def test_compose_publishes_the_local_stack_ports(compose):
    published = {name: _published(service) for name, service in compose["services"].items()
                 if service.get("ports")}
    expected = {name: DEFAULT_PORTS[key] for name, key in PORT_KEY.items()} | {"postgres": 5432}
    assert published == {name: {port: port} for name, port in expected.items()}


def test_each_service_with_a_port_has_a_healthcheck_and_dependents_wait_for_it(compose):
    services = compose["services"]
    for name, service in services.items():
        if service.get("ports"):
            assert service["healthcheck"]["test"], name
        for dependency, condition in service.get("depends_on", {}).items():
            wanted = condition["condition"]
            if dependency in ONE_SHOT:
                assert wanted == "service_completed_successfully", (name, dependency)
            else:
                assert wanted == "service_healthy", (name, dependency)
                assert "healthcheck" in services[dependency], dependency
    for name in ("mlflow", "prefect-server", "s3"):
        port = DEFAULT_PORTS[PORT_KEY[name]]
        assert f"127.0.0.1:{port}/" in " ".join(services[name]["healthcheck"]["test"]), name
    assert "/health'" in " ".join(services["mlflow"]["healthcheck"]["test"])
    assert "/api/health'" in " ".join(services["prefect-server"]["healthcheck"]["test"])


def test_compose_mlflow_runs_the_local_stacks_command(compose, local):
    service = compose["services"]["mlflow"]
    command, stack_argv = service["command"], local["mlflow"]["argv"]
    assert _words(command) == _words(stack_argv) == ["mlflow", "server"]
    options, stacks = _options(command), _options(stack_argv)
    assert set(stacks) <= set(options)
    assert options["--app-name"] == stacks["--app-name"] == "basic-auth"
    artifacts = options["--artifacts-destination"]
    assert artifacts == stacks["--artifacts-destination"]
    assert artifacts.startswith(f"s3://{BUCKETS['mlflow']}/")
    backend = options["--backend-store-uri"]
    assert backend.startswith("postgresql://")
    assert _database(backend) == _database(stacks["--backend-store-uri"])
    assert int(options["--port"]) == DEFAULT_PORTS["mlflow"]


def test_compose_mlflow_env_names_are_the_local_servers(compose, local):
    env = _env(compose["services"]["mlflow"])
    assert set(env) == set(local["mlflow"]["env"])
    worker = _env(compose["services"]["prefect-worker"])
    assert env["MLFLOW_S3_ENDPOINT_URL"] == worker["AWS_ENDPOINT_URL"]


def test_compose_mlflow_moves_the_repos_auth_config_to_postgres(compose, local, tmp_path):
    """The entrypoint's shell snippet, run here on the repository's basic_auth.ini, gives
    what stack.py writes: the same settings, the users database on PostgreSQL."""
    service = compose["services"]["mlflow"]
    source, target = next(volume.split(":")[:2] for volume in service["volumes"]
                          if volume.endswith("basic_auth.ini:ro"))
    assert (INFRA / source).resolve() == REPO / "mlflow" / "basic_auth.ini"
    shell, flag, script, name, auth_url = service["entrypoint"]
    assert (shell, flag) == ("/bin/sh", "-c")
    assert _database(auth_url) == ("postgresql", "visionops_mlflow_auth")
    written = tmp_path / "basic_auth.ini"
    subprocess.run([shell, flag, script.replace(target, str(INFRA / source)), name, auth_url,
                    "true"], check=True,
                   env={"PATH": os.environ["PATH"], "MLFLOW_AUTH_CONFIG_PATH": str(written)})
    assert _env(service)["MLFLOW_AUTH_CONFIG_PATH"] != target   # the mount is read-only
    configs = {}
    texts = {"compose": written.read_text(), "local": local["mlflow"]["auth_config"]}
    for label, text in texts.items():
        parser = configparser.ConfigParser()
        parser.read_string(text)
        configs[label] = dict(parser["mlflow"])
    assert configs["compose"]["database_uri"] == auth_url
    assert _database(configs["local"]["database_uri"]) == _database(auth_url)
    for config in configs.values():
        config.pop("database_uri")
    assert configs["compose"] == configs["local"]


def test_compose_mlflow_accepts_the_host_its_clients_use(compose):
    allowed = _options(compose["services"]["mlflow"]["command"])["--allowed-hosts"].split(",")
    for client in ("prefect-worker", "mlflow-users"):
        uri = _env(compose["services"][client])["MLFLOW_TRACKING_URI"]
        assert _netloc(uri) in allowed, client


def test_compose_prefect_server_matches_the_local_one(compose, local):
    service = compose["services"]["prefect-server"]
    stack_argv = local["prefect-server"]["argv"]
    assert _words(service["command"]) == _words(stack_argv) == ["prefect", "server", "start"]
    assert int(_options(service["command"])["--port"]) == DEFAULT_PORTS["prefect"]
    env = _env(service)
    assert set(local["prefect-server"]["env"]) <= set(env)
    assert set(env) - set(local["prefect-server"]["env"]) <= {"PREFECT_UI_API_URL"}
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    url = env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert _database(url) == _database(
        local["prefect-server"]["env"]["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert _database(url) == ("postgresql+asyncpg", "visionops_prefect")


def test_compose_worker_has_the_client_env(compose, local):
    services = compose["services"]
    worker = services["prefect-worker"]
    assert worker["command"] == ["prefect", "worker", "start", "--pool", WORK_POOL,
                                 "--type", "process"]
    assert worker["build"]["dockerfile"] == "infra/Dockerfile"
    env = _env(worker)
    assert set(local["client_env"]) <= set(env) <= set(local["prefect-worker"]["env"])
    for key, value in CLIENT_HTTP_RETRIES.items():
        assert env[key] == value
    assert env["MLFLOW_TRACKING_USERNAME"] == USERS["writer"]
    for variable, name in (("MLFLOW_TRACKING_URI", "mlflow"), ("AWS_ENDPOINT_URL", "s3"),
                           ("PREFECT_API_URL", "prefect-server")):
        ours, stacks = urlsplit(env[variable]), urlsplit(local["client_env"][variable])
        assert ours.netloc == f"{name}:{DEFAULT_PORTS[PORT_KEY[name]]}", variable
        assert (ours.scheme, ours.path) == (stacks.scheme, stacks.path), variable


def _strings(value):
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def test_compose_variables_are_the_env_examples(compose_text):
    values = [text.replace("$$", "") for text in _strings(yaml.safe_load(compose_text))]
    references = [match.groups() for text in values for match in VARIABLE.finditer(text)]
    example = _env_example()
    assert {name for name, _, _ in references} == set(example)
    # every other $ is escaped for the shell ($$), not left for Compose to interpolate
    assert not [text for text in values if "$" in VARIABLE.sub("", text)]
    for name, operator, _ in references:
        secret = name.endswith(("PASSWORD", "KEY"))
        assert operator == (":?" if secret else ":-"), name
        if secret:
            assert example[name].startswith("change-me"), name


def test_compose_named_volumes_are_declared_and_bind_mounts_exist(compose):
    declared = set(compose["volumes"])
    used = {}
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (INFRA / source).exists(), (name, source)
            else:
                used[source] = name
    assert set(used) == declared
    assert {used[volume] for volume in declared} == {"postgres", "s3", "prefect-server"}


def test_init_sql_creates_exactly_the_stack_databases(compose):
    sql = (INFRA / "postgres" / "init-databases.sql").read_text()
    created = re.findall(r"^CREATE DATABASE (\w+);", sql, flags=re.MULTILINE | re.IGNORECASE)
    prefix = _stack(Path("/tmp/x")).db_prefix
    assert sorted(created) == sorted(f"{prefix}_{name}" for name in DATABASES)
    mounts = [volume.split(":") for volume in compose["services"]["postgres"]["volumes"]]
    assert ["./postgres/init-databases.sql",
            "/docker-entrypoint-initdb.d/init-databases.sql", "ro"] in mounts


def test_buckets_job_creates_the_stack_buckets(compose):
    job = compose["services"]["buckets"]
    assert set(_env(job)["BUCKETS"].split()) == set(BUCKETS.values())
    assert "for bucket in $BUCKETS;" in job["command"][0]
    assert "create-bucket" in job["command"][0]
    assert _env(job)["AWS_ENDPOINT_URL"] == f"http://s3:{DEFAULT_PORTS['s3']}"


def test_object_store_credentials_come_from_the_environment(compose):
    s3 = compose["services"]["s3"]
    assert s3["command"][:2] == ["server", "-s3"]
    assert not any(part.startswith("-s3.config") for part in s3["command"])
    assert f"-s3.port={DEFAULT_PORTS['s3']}" in s3["command"]
    for name in ("s3", "buckets", "mlflow", "prefect-worker"):
        env = _env(compose["services"][name])
        assert env["AWS_ACCESS_KEY_ID"] == _env_example()["VISIONOPS_S3_ACCESS_KEY"], name
        assert env["AWS_SECRET_ACCESS_KEY"] == _env_example()["VISIONOPS_S3_SECRET_KEY"], name


def test_mlflow_users_job_creates_the_stack_users(compose):
    job = compose["services"]["mlflow-users"]
    script = job["command"][2]
    compile(script, "mlflow-users", "exec")
    for user in USERS.values():
        assert f'"{user}"' in script
    env = _env(job)
    assert env["MLFLOW_TRACKING_USERNAME"] == ADMIN
    assert env["MLFLOW_TRACKING_PASSWORD"] == _env_example()["VISIONOPS_MLFLOW_ADMIN_PASSWORD"]


# -- Kubernetes ------------------------------------------------------------------------

def _manifests(name: str) -> dict[tuple[str, str], dict]:
    documents = yaml.safe_load_all((INFRA / "kubernetes" / name).read_text())
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents if doc}


def _container(deployment: dict) -> dict:
    spec = deployment["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"][
        "labels"].items()
    (container,) = spec["template"]["spec"]["containers"]
    return container


def _port(container: dict, port) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    named = {item.get("name"): item["containerPort"] for item in container["ports"]}
    return named[port] if isinstance(port, str) else port


def _k8s_env(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container["env"]}


def _secret_keys(container: dict) -> set[str]:
    keys = set()
    for item in container["env"]:
        reference = item.get("valueFrom", {}).get("secretKeyRef")
        if reference:
            assert reference["name"] == "visionops-stack", item["name"]
            keys.add(reference["key"])
    return keys


def _pool_job_env() -> dict[str, str]:
    k8s = yaml.safe_load((INFRA / "kubernetes" / "prefect.yaml").read_text())
    return k8s["deployments"][0]["work_pool"]["job_variables"]["env"]


def test_kubernetes_manifests_have_the_right_kinds():
    mlflow = _manifests("mlflow.yaml")
    worker = _manifests("prefect-worker.yaml")
    assert set(mlflow) == {("ConfigMap", "mlflow-auth"), ("Deployment", "mlflow"),
                           ("Service", "mlflow")}
    assert set(worker) == {("ConfigMap", "visionops-prefect"), ("Deployment", "prefect-worker")}
    for document in [*mlflow.values(), *worker.values()]:
        assert document["metadata"]["namespace"] == "visionops"
    service, deployment = mlflow["Service", "mlflow"], mlflow["Deployment", "mlflow"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == _port(_container(deployment), port["targetPort"]) \
        == DEFAULT_PORTS["mlflow"]


def test_kubernetes_mlflow_matches_the_local_server(local):
    manifests = _manifests("mlflow.yaml")
    container = _container(manifests["Deployment", "mlflow"])
    assert [item["containerPort"] for item in container["ports"]] == [DEFAULT_PORTS["mlflow"]]
    for probe in ("readinessProbe", "livenessProbe"):
        check = container[probe]["httpGet"]
        assert check["path"] == "/health"
        assert _port(container, check["port"]) == DEFAULT_PORTS["mlflow"]
    command, stack_argv = container["command"], local["mlflow"]["argv"]
    assert _words(command) == ["mlflow", "server"]
    options, stacks = _options(command), _options(stack_argv)
    assert set(stacks) <= set(options)
    for option in ("--app-name", "--artifacts-destination"):
        assert options[option] == stacks[option], option
    assert _database(options["--backend-store-uri"]) == _database(stacks["--backend-store-uri"])
    assert make_url(options["--backend-store-uri"]).password is None
    assert int(options["--port"]) == DEFAULT_PORTS["mlflow"]

    env = _k8s_env(container)
    assert set(env) == set(local["mlflow"]["env"]) | KUBERNETES_MLFLOW_EXTRA_ENV
    assert "PGPASSWORD" in {name for name, item in env.items() if "valueFrom" in item}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == _pool_job_env()["AWS_ENDPOINT_URL"]
    allowed = options["--allowed-hosts"].split(",")
    assert _netloc(_pool_job_env()["MLFLOW_TRACKING_URI"]) in allowed
    worker = _k8s_env(_container(_manifests("prefect-worker.yaml")["Deployment",
                                                                   "prefect-worker"]))
    assert _netloc(worker["MLFLOW_TRACKING_URI"]["value"]) in allowed


def test_kubernetes_mlflow_auth_config_is_the_repos_on_postgres():
    manifests = _manifests("mlflow.yaml")
    deployment = manifests["Deployment", "mlflow"]
    container = _container(deployment)
    path = Path(_k8s_env(container)["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    (mount,) = [item for item in container["volumeMounts"] if item["mountPath"] == str(path.parent)]
    (volume,) = [item for item in deployment["spec"]["template"]["spec"]["volumes"]
                 if item["name"] == mount["name"]]
    config_map = manifests["ConfigMap", volume["configMap"]["name"]]
    configs = []
    for text in (config_map["data"][path.name], (REPO / "mlflow" / "basic_auth.ini").read_text()):
        parser = configparser.ConfigParser()
        parser.read_string(text)
        configs.append(dict(parser["mlflow"]))
    ours, repos = configs
    url = ours.pop("database_uri")
    assert _database(url) == ("postgresql", "visionops_mlflow_auth")
    assert make_url(url).password is None   # a ConfigMap holds no secret
    repos.pop("database_uri")
    assert ours == repos


def test_kubernetes_worker_has_the_client_env(local):
    manifests = _manifests("prefect-worker.yaml")
    container = _container(manifests["Deployment", "prefect-worker"])
    assert container["command"][:7] == ["prefect", "worker", "start", "--pool", WORK_POOL,
                                        "--type", "process"]
    env = _k8s_env(container)
    assert set(local["client_env"]) <= set(env) <= set(local["prefect-worker"]["env"])
    for key, value in CLIENT_HTTP_RETRIES.items():
        assert env[key]["value"] == value
    assert env["MLFLOW_TRACKING_USERNAME"]["value"] == USERS["writer"]
    reference = env["PREFECT_API_URL"]["valueFrom"]["configMapKeyRef"]
    config_map = manifests["ConfigMap", reference["name"]]
    assert config_map["data"][reference["key"]].endswith(
        f":{DEFAULT_PORTS['prefect']}/api")
    for name in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"):
        assert env[name]["value"] == _pool_job_env()[name], name
    assert _secret_keys(container) >= {"mlflow-writer-password", "s3-access-key",
                                       "s3-secret-key"}
    check = container["livenessProbe"]["httpGet"]
    assert check["path"] == "/health" and _port(container, check["port"])
    assert "--with-healthcheck" in container["command"]


def test_kubernetes_secret_keys_are_documented():
    readme = (INFRA / "README.md").read_text()
    for name, kind in (("mlflow.yaml", "mlflow"), ("prefect-worker.yaml", "prefect-worker")):
        for key in _secret_keys(_container(_manifests(name)["Deployment", kind])):
            assert f"--from-literal={key}=" in readme, key


def test_mlflow_folder_never_shadows_the_mlflow_library():
    """mlflow/ holds the server's configuration only: with the repository first on the
    path (a script run from its root), `import mlflow` still finds the library."""
    assert not (REPO / "mlflow" / "__init__.py").exists()
    spec = importlib.machinery.PathFinder.find_spec("mlflow", [str(REPO), *sys.path])
    assert spec is not None and spec.origin is not None   # a regular package, not a folder
    origin = Path(spec.origin)
    assert "site-packages" in origin.parts
    assert not origin.is_relative_to(REPO / "mlflow")
