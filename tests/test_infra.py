"""infra/ describes what runs for real elsewhere: the Kubernetes deployment declares the
same flow as the process-pool one that the deployment tests run, and the container and
Kubernetes descriptions of the team stack declare what `visionops stack up` runs, with
nothing reachable, connecting or starting that should not (a loopback bind, a preflight
that refuses example secrets, a PostgreSQL role and an S3 identity per service, Prefect's
auth, CSRF and CORS, no unpickling)."""

from __future__ import annotations

import configparser
import functools
import http.server
import importlib.machinery
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tomllib
import types
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import psutil
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
# what `visionops stack up` (visionops/ops/stack.py) runs for real, read from its code,
# and their scripts (preflight, PostgreSQL init, the object store's and MLflow's
# entrypoints) are run here for real.

INFRA = REPO / "infra"
# the compose service for each part of the local stack, and the port key it publishes
COMPOSE_SERVICE = {"s3": "s3", "mlflow": "mlflow", "prefect-server": "prefect-server",
                   "prefect-worker": "prefect-worker"}
PORT_KEY = {"s3": "s3", "mlflow": "mlflow", "prefect-server": "prefect"}
# one-shot jobs: the secrets check before anything, then what `stack up` does between
# starts: buckets, then MLflow users
ONE_SHOT = {"preflight", "buckets", "mlflow-users"}
# the online model service (`visionops serve-model`), beyond what `stack up` starts
SERVING = "serving"
SERVING_USER = "visionops-serving"
SERVING_PASSWORD = "VISIONOPS_MLFLOW_SERVING_PASSWORD"
BIND_VARIABLE = "VISIONOPS_BIND_ADDRESS"
# The entrypoint writes the auth ini's database_uri from it (MLflow reads that from the ini).
COMPOSE_MLFLOW_EXTRA_ENV = {"AUTH_DATABASE_URI"}
# On Kubernetes the database URLs carry no password: libpq and asyncpg read PGPASSWORD.
KUBERNETES_MLFLOW_EXTRA_ENV = {"PGPASSWORD"}
# On Kubernetes the Prefect auth string is built from the Secret's password: $(VAR).
KUBERNETES_WORKER_EXTRA_ENV = {"VISIONOPS_PREFECT_AUTH_PASSWORD"}
# Who may do what on which bucket: the object store's identities (compose's s3 service).
S3_IDENTITY_BUCKETS = {"admin": None, "mlflow-server": {"mlflow"}, "writer": {"dvc", "landing"},
                       "reviewer": {"mlflow", "dvc", "landing"}}
S3_IDENTITY_ACTIONS = {"mlflow-server": {"Read", "Write", "List", "Tagging"},
                       "writer": {"Read", "Write", "List", "Tagging"},
                       "reviewer": {"Read", "List"}}
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")
K8S_REFERENCE = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _stack(state_dir: Path) -> Stack:
    return Stack(project=Path("."), state_dir=state_dir, ports=dict(DEFAULT_PORTS),
                 secrets=defaultdict(lambda: "dummy-secret"))


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


@functools.cache
def _repo_params():
    """The repository's params.yaml, as the image holds it in /opt/visionops."""
    from visionops.core.config import load_params

    return load_params(REPO / "params.yaml")


def _secret(name: str) -> bool:
    return name.endswith(("PASSWORD", "KEY"))


def _secret_names() -> set[str]:
    return {name for name in _env_example() if _secret(name)}


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
def raw_compose(compose_text) -> dict:
    """infra/compose.yaml before interpolation."""
    return yaml.safe_load(compose_text)


@pytest.fixture(scope="module")
def compose(raw_compose) -> dict:
    """infra/compose.yaml as Compose sees it with infra/.env.example's values."""
    return _interpolate(raw_compose, _env_example())


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


def _strings(value):
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_compose_has_a_service_for_each_part_of_the_local_stack(compose):
    expected = {COMPOSE_SERVICE[name] for name in SERVICES} | {"postgres", SERVING} | ONE_SHOT
    assert set(compose["services"]) == expected
    for name in ONE_SHOT:
        assert compose["services"][name]["restart"] == "no", name


def test_compose_publishes_the_local_stack_ports(compose):
    published = {name: _published(service) for name, service in compose["services"].items()
                 if service.get("ports")}
    expected = {name: DEFAULT_PORTS[key] for name, key in PORT_KEY.items()} | {
        "postgres": 5432, SERVING: _repo_params().serving.port}
    assert published == {name: {port: port} for name, port in expected.items()}


def test_published_ports_bind_loopback_unless_told_otherwise(raw_compose):
    """Every published port names its host address: 127.0.0.1, or the bind variable whose
    default (and .env.example's value) is 127.0.0.1. Nothing else is reachable from the
    host: no `expose`, no host networking."""
    for name, service in raw_compose["services"].items():
        assert "expose" not in service and service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            address, _, _ = str(port).rsplit(":", 2)
            assert address in ("127.0.0.1", f"${{{BIND_VARIABLE}:-127.0.0.1}}"), (name, port)
            assert _interpolate(address, {}) == "127.0.0.1"
    assert _env_example()[BIND_VARIABLE] == "127.0.0.1"
    assert raw_compose["services"]["postgres"]["ports"] == ["127.0.0.1:5432:5432"]


def test_object_store_publishes_its_s3_port_only_and_binds_the_rest_to_loopback(compose):
    """Of `weed`'s ports (master 9333, volume 8080, filer 8888, their gRPC ports) only S3
    is published; inside the container everything but S3 listens on loopback."""
    service = compose["services"]["s3"]
    assert _published(service) == {DEFAULT_PORTS["s3"]: DEFAULT_PORTS["s3"]}
    command = service["command"]
    binds = [part for part in command if part.startswith(("-ip=", "-ip.bind="))]
    assert binds == ["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    assert "-s3.ip.bind=0.0.0.0" in command   # the other containers' one way in
    assert f"-s3.port={DEFAULT_PORTS['s3']}" in command
    assert not any(part.startswith("-s3.config") for part in command)   # the entrypoint's


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
    assert "/healthz'" in " ".join(services["s3"]["healthcheck"]["test"])


def test_every_service_waits_for_the_preflight(compose):
    for name, service in compose["services"].items():
        if name != "preflight":
            assert service["depends_on"]["preflight"] == {
                "condition": "service_completed_successfully"}, name


# -- preflight: start-up refuses the example's secrets ---------------------------------

def _preflight_script(compose) -> str:
    service = compose["services"]["preflight"]
    assert service["entrypoint"] == ["/bin/sh", "-c"]
    (script,) = service["command"]
    return script


def _run_preflight(script: str, variables: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/sh", "-c", script], env={"PATH": os.environ["PATH"],
                                                          **variables},
                          capture_output=True, text=True, timeout=30)


def test_preflight_is_given_every_secret(raw_compose):
    env = raw_compose["services"]["preflight"]["environment"]
    assert set(env) == _secret_names()
    for name, value in env.items():
        assert value.startswith(f"${{{name}:?"), name


def test_preflight_refuses_each_change_me_value_by_name(compose):
    script, example = _preflight_script(compose), _env_example()
    as_shipped = _run_preflight(script, _env(compose["services"]["preflight"]))
    assert as_shipped.returncode == 1
    refused = re.findall(r"^preflight: (\w+) is still a change-me value", as_shipped.stderr,
                         flags=re.MULTILINE)
    assert sorted(refused) == sorted(_secret_names())

    good = {name: secrets.token_hex(16) for name in _secret_names()}
    passed = _run_preflight(script, good)
    assert (passed.returncode, passed.stdout, passed.stderr) == (0, "", "")

    name = "VISIONOPS_POSTGRES_MLFLOW_PASSWORD"
    for value, reason in ((example[name], "is still a change-me value"),
                          ("Change-Me-" + secrets.token_hex(8), "is still a change-me value"),
                          ("pw@attacker.example/db", "may hold only letters, digits"),
                          ("pw with spaces " + secrets.token_hex(4), "may hold only letters"),
                          ("short-pw", "is shorter than 12 characters"),
                          ("", "is shorter than 12 characters")):
        run = _run_preflight(script, {**good, name: value})
        assert run.returncode == 1, value
        assert run.stderr.startswith(f"preflight: {name} {reason}"), (value, run.stderr)
        assert run.stderr.count("preflight:") == 1, run.stderr


def test_kubernetes_pods_run_the_preflight_on_every_secret_they_read(raw_compose):
    """Each Deployment's init container runs compose's preflight script (Kubernetes reads
    `$$` as `$`, as Compose does) on every key of the Secret its containers read, each
    as VISIONOPS_<KEY>, the name it has in infra/.env."""
    (script,) = raw_compose["services"]["preflight"]["command"]
    assert not K8S_REFERENCE.search(script)   # no $(VAR) for Kubernetes to expand
    for name, kind in KUBERNETES_DEPLOYMENTS:
        spec = _manifests(name)["Deployment", kind]["spec"]["template"]["spec"]
        (init,) = spec["initContainers"]
        assert init["command"] == ["/bin/sh", "-c", script], name
        checked = {}
        for item in init["env"]:
            key = item["valueFrom"]["secretKeyRef"]["key"]
            assert item["name"] == "VISIONOPS_" + key.upper().replace("-", "_"), item
            checked[item["name"]] = key
        assert set(checked) <= _secret_names(), name
        assert set(checked.values()) == _secret_keys(_container(_manifests(name)[
            "Deployment", kind])), name


# -- PostgreSQL: a role per service ----------------------------------------------------

INIT_SCRIPT = INFRA / "postgres" / "init-databases.sh"


def _database_owners() -> dict[str, str]:
    sql = INIT_SCRIPT.read_text()
    return dict(re.findall(r"^CREATE DATABASE (\w+) OWNER (\w+);", sql, flags=re.MULTILINE))


def test_init_script_creates_exactly_the_stack_databases(compose):
    prefix = _stack(Path("/tmp/x")).db_prefix
    owners = _database_owners()
    assert sorted(owners) == sorted(f"{prefix}_{name}" for name in DATABASES)
    assert set(owners.values()) == {f"{prefix}_mlflow", f"{prefix}_prefect"}
    mounts = [volume.split(":") for volume in compose["services"]["postgres"]["volumes"]]
    assert ["./postgres/init-databases.sh",
            "/docker-entrypoint-initdb.d/init-databases.sh", "ro"] in mounts
    env = _env(compose["services"]["postgres"])
    for variable in re.findall(r"\$(VISIONOPS_\w+)", INIT_SCRIPT.read_text()):
        assert env[variable] == _env_example()[variable], variable


def _compose_database_urls(compose) -> dict[str, str]:
    """Every PostgreSQL URL a compose service is given: {service/variable: url}."""
    return {f"{name}/{key}": value for name, service in compose["services"].items()
            for key, value in _env(service).items() if value.startswith("postgresql")}


def test_no_service_connects_to_postgresql_as_the_superuser(compose, local):
    owners = _database_owners()
    urls = _compose_database_urls(compose)
    assert {_database(url)[1] for url in urls.values()} == set(owners)
    for where, url in urls.items():
        parsed = make_url(url)
        assert parsed.username == owners[parsed.database] != "postgres", where
        assert parsed.password == _env_example()[
            f"VISIONOPS_POSTGRES_{parsed.username.removeprefix('visionops_').upper()}_PASSWORD"]
    mlflow = _env(compose["services"]["mlflow"])
    assert _database(mlflow["MLFLOW_BACKEND_STORE_URI"]) == _database(
        local["mlflow"]["env"]["MLFLOW_BACKEND_STORE_URI"])
    assert _database(mlflow["AUTH_DATABASE_URI"]) == ("postgresql", "visionops_mlflow_auth")

    kubernetes = {}
    for name, kind in KUBERNETES_DEPLOYMENTS:
        env = _k8s_env(_container(_manifests(name)["Deployment", kind]))
        for key, item in env.items():
            if item.get("value", "").startswith("postgresql"):
                kubernetes[f"{kind}/{key}"] = (item["value"], env)
    config = configparser.ConfigParser()
    config.read_string(_manifests("mlflow.yaml")["ConfigMap", "mlflow-auth"]["data"][
        "basic_auth.ini"])
    kubernetes["mlflow-auth"] = (config["mlflow"]["database_uri"], _k8s_env(_container(
        _manifests("mlflow.yaml")["Deployment", "mlflow"])))
    assert {_database(url)[1] for url, _ in kubernetes.values()} == set(owners)
    for where, (url, env) in kubernetes.items():
        parsed = make_url(url)
        assert parsed.username == owners[parsed.database] != "postgres", where
        assert parsed.password is None, where
        role = parsed.username.removeprefix("visionops_")
        assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == \
            f"postgres-{role}-password", where


def _postgres_binaries() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return candidates[-1].parent if candidates else None


@pytest.fixture
def private_postgres():
    """A PostgreSQL cluster of this test's own (initdb, a free port, loopback): its
    superuser over the socket without a password, everyone else over TCP with one."""
    binaries = _postgres_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server binaries (initdb) on this machine")
    as_owner = []
    folder = Path(tempfile.mkdtemp(prefix="visionops-pg-"))
    if os.geteuid() == 0:   # initdb refuses root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root with no `postgres` user to run initdb as")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_owner = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = folder / "data"
    try:
        subprocess.run([*as_owner, str(binaries / "initdb"), "-D", str(data), "-U", "postgres",
                        "--auth-local=trust", "--auth-host=scram-sha-256", "-N"],
                       check=True, capture_output=True, timeout=60)
        subprocess.run([*as_owner, str(binaries / "pg_ctl"), "-D", str(data), "-l",
                        str(folder / "log"), "-w", "-o",
                        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True, timeout=60)
        yield {"socket": str(folder), "port": port}
    finally:
        subprocess.run([*as_owner, str(binaries / "pg_ctl"), "-D", str(data), "-m",
                        "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def test_init_script_gives_each_service_a_role_that_reaches_only_its_databases(
        compose, private_postgres):
    """The init script, run as the postgres image runs it (its environment, the
    superuser over the socket), on a fresh cluster; then every URL the services are given
    connects, as a role that is no superuser, to its own databases and to no other."""
    import psycopg2

    env = _env(compose["services"]["postgres"])
    subprocess.run(["/bin/sh", str(INIT_SCRIPT)], check=True, capture_output=True, timeout=60,
                   env={"PATH": os.environ["PATH"], "PGHOST": private_postgres["socket"],
                        "PGPORT": str(private_postgres["port"]), "POSTGRES_USER": "postgres",
                        "POSTGRES_DB": "postgres",
                        **{key: value for key, value in env.items()
                           if key.startswith("VISIONOPS_")}})

    def connect(url: str, database: str | None = None, password: str | None = None):
        parsed = make_url(url).set(drivername="postgresql", host="127.0.0.1",
                                   port=private_postgres["port"])
        if database:
            parsed = parsed.set(database=database)
        if password:
            parsed = parsed.set(password=password)
        return psycopg2.connect(parsed.render_as_string(hide_password=False),
                                connect_timeout=10)

    owners = _database_owners()
    for where, url in _compose_database_urls(compose).items():
        role, own = make_url(url).username, make_url(url).database
        connection = connect(url)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_user, rolsuper, rolcreatedb, rolcreaterole "
                           "FROM pg_roles WHERE rolname = current_user")
            assert cursor.fetchone() == (role, False, False, False), where
            cursor.execute("CREATE TABLE owned_here (id int)")   # it owns the schema too
            cursor.execute("DROP TABLE owned_here")
            cursor.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'")
            if role.endswith("_prefect") and cursor.fetchone():   # Prefect's migrations
                cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        connection.close()
        for database in [*(name for name, owner in owners.items() if owner != role),
                         "postgres"]:
            with pytest.raises(psycopg2.OperationalError, match="CONNECT privilege"):
                connect(url, database=database)
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            connect(url, password="not-" + make_url(url).password)
        assert own in owners


# -- MLflow ----------------------------------------------------------------------------

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
    assert "--backend-store-uri" not in options   # its password would show in `ps`
    backend = _env(service)["MLFLOW_BACKEND_STORE_URI"]
    assert backend.startswith("postgresql://")
    assert _database(backend) == _database(local["mlflow"]["env"]["MLFLOW_BACKEND_STORE_URI"])
    assert int(options["--port"]) == DEFAULT_PORTS["mlflow"]


def test_compose_mlflow_env_names_are_the_local_servers(compose, local):
    env = _env(compose["services"]["mlflow"])
    assert set(env) == set(local["mlflow"]["env"]) | COMPOSE_MLFLOW_EXTRA_ENV
    worker = _env(compose["services"]["prefect-worker"])
    assert env["MLFLOW_S3_ENDPOINT_URL"] == worker["AWS_ENDPOINT_URL"]


def test_no_secret_is_on_a_command_line(compose):
    """A container's command line is readable by anyone who can list its processes: no
    password, key or URL holding one is passed there, in Compose or on Kubernetes."""
    example = _env_example()
    values = {example[name] for name in _secret_names()}
    for name, service in compose["services"].items():
        for part in [*_strings(service.get("command", [])),
                     *_strings(service.get("entrypoint", [])),
                     *_strings(service.get("healthcheck", {}))]:
            assert not [value for value in values if value in part], name
            assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", part), (name, part)
    for manifest, kind in KUBERNETES_DEPLOYMENTS:
        spec = _manifests(manifest)["Deployment", kind]["spec"]["template"]["spec"]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            secret_backed = {item["name"] for item in container.get("env", [])
                             if "secretKeyRef" in item.get("valueFrom", {})}
            for part in [*container.get("command", []), *container.get("args", [])]:
                assert not set(K8S_REFERENCE.findall(part)) & secret_backed, (kind, part)
                assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", part), (kind, part)


def test_compose_mlflow_moves_the_repos_auth_config_to_postgres(compose, local, tmp_path):
    """The entrypoint's shell snippet, run here on the repository's basic_auth.ini, gives
    what stack.py writes: the same settings, the users database on PostgreSQL, in a file
    only its user can read."""
    service = compose["services"]["mlflow"]
    source, target = next(volume.split(":")[:2] for volume in service["volumes"]
                          if volume.endswith("basic_auth.ini:ro"))
    assert (INFRA / source).resolve() == REPO / "mlflow" / "basic_auth.ini"
    shell, flag, script, name = service["entrypoint"]
    assert (shell, flag) == ("/bin/sh", "-c")
    env = _env(service)
    auth_url = env["AUTH_DATABASE_URI"]
    assert _database(auth_url) == ("postgresql", "visionops_mlflow_auth")
    written = tmp_path / "basic_auth.ini"
    subprocess.run([shell, flag, script.replace(target, str(INFRA / source)), name, "true"],
                   check=True, env={"PATH": os.environ["PATH"], "AUTH_DATABASE_URI": auth_url,
                                    "MLFLOW_AUTH_CONFIG_PATH": str(written)})
    assert env["MLFLOW_AUTH_CONFIG_PATH"] != target   # the mount is read-only
    assert stat.S_IMODE(written.stat().st_mode) == 0o600   # it holds the role's password
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
    for client in ("prefect-worker", "mlflow-users", SERVING):
        uri = _env(compose["services"][client])["MLFLOW_TRACKING_URI"]
        assert _netloc(uri) in allowed, client


def test_mlflow_never_unpickles_in_any_container():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]
    for name in ("mlflow", "mlflow-users", "prefect-worker", SERVING):
        assert compose[name]["environment"]["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    for manifest, kind in (("mlflow.yaml", "mlflow"), ("prefect-worker.yaml", "prefect-worker"),
                           ("serving.yaml", "visionops-serving")):
        env = _k8s_env(_container(_manifests(manifest)["Deployment", kind]))
        assert env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"]["value"] == "false", kind
    assert _pool_job_env()["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    assert "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false" in (INFRA / "Dockerfile").read_text()


def test_mlflow_users_job_sets_up_the_stacks_roles(compose, monkeypatch):
    """The job's script, run here with a recorder in place of visionops/ops/mlflow_roles.py
    (the functions `stack up` calls): the writer, the reviewer and the model service's user
    are created and given their roles by the admin (the service's: the reviewer's, which
    only reads), then the writer creates the pipeline's experiment and model."""
    import visionops.ops
    from visionops.core.config import load_params

    job = compose["services"]["mlflow-users"]
    python, flag, script = job["command"]
    assert (python, flag) == ("python", "-c")
    env = _env(job)
    assert env["MLFLOW_TRACKING_USERNAME"] == ADMIN
    assert env["MLFLOW_TRACKING_PASSWORD"] == _env_example()["VISIONOPS_MLFLOW_ADMIN_PASSWORD"]
    calls = []

    def recorder(function: str):
        return lambda *args: calls.append((function, *args))

    roles = types.ModuleType("visionops.ops.mlflow_roles")
    for function in ("create_user", "apply_role", "create_writer_resources"):
        setattr(roles, function, recorder(function))
    monkeypatch.setitem(sys.modules, roles.__name__, roles)
    monkeypatch.setattr(visionops.ops, "mlflow_roles", roles, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)   # the image's working directory holds the repository's params
    exec(compile(script, "mlflow-users", "exec"), {"__name__": "__main__"})

    params = load_params(REPO / "params.yaml")
    names = (params.mlflow.experiment_name, params.registry.model_name)
    url, admin = env["MLFLOW_TRACKING_URI"], (ADMIN, env["MLFLOW_TRACKING_PASSWORD"])
    writer = (USERS["writer"], env["WRITER_PASSWORD"])
    reviewer = (USERS["reviewer"], env["REVIEWER_PASSWORD"])
    serving = (SERVING_USER, env["SERVING_PASSWORD"])
    assert env["WRITER_PASSWORD"] == _env_example()["VISIONOPS_MLFLOW_WRITER_PASSWORD"]
    assert env["REVIEWER_PASSWORD"] == _env_example()["VISIONOPS_MLFLOW_REVIEWER_PASSWORD"]
    assert env["SERVING_PASSWORD"] == _env_example()[SERVING_PASSWORD]
    assert calls == [("create_user", url, admin, *writer),
                     ("create_user", url, admin, *reviewer),
                     ("create_user", url, admin, *serving),
                     ("apply_role", url, admin, writer[0], "writer", *names),
                     ("apply_role", url, admin, reviewer[0], "reviewer", *names),
                     ("apply_role", url, admin, serving[0], "reviewer", *names),
                     ("create_writer_resources", url, writer, *names)]


# -- Prefect ---------------------------------------------------------------------------

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


def test_compose_prefect_api_takes_auth_csrf_and_its_uis_origin_only(compose):
    server = _env(compose["services"]["prefect-server"])
    worker = _env(compose["services"]["prefect-worker"])
    password = _env_example()["VISIONOPS_PREFECT_AUTH_PASSWORD"]
    assert server["PREFECT_SERVER_API_AUTH_STRING"] == f"visionops:{password}"
    assert worker["PREFECT_API_AUTH_STRING"] == server["PREFECT_SERVER_API_AUTH_STRING"]
    assert server["PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"] == "true"
    origin = server["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"]
    ui_api = urlsplit(server["PREFECT_UI_API_URL"])
    assert origin == f"{ui_api.scheme}://{ui_api.netloc}" == _env_example()[
        "VISIONOPS_PREFECT_UI_ORIGIN"]
    assert ui_api.path == "/api" and "*" not in origin and "," not in origin


def test_prefect_server_with_composes_settings_refuses_what_it_should(compose, tmp_path):
    """Prefect's own API app, made with the compose server's environment: the
    healthcheck's GET /api/health answers without credentials, everything else wants the
    auth string, a state change wants a CSRF token, and a browser on another origin is
    refused. No database is reached (the app's startup is not run)."""
    env = {key: value for key, value in _env(compose["services"]["prefect-server"]).items()
           if key.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path)
    probe = textwrap.dedent("""
        import json, os, warnings
        warnings.simplefilter("ignore")
        from prefect.server.api.server import create_app
        from starlette.testclient import TestClient
        user, _, password = os.environ["PREFECT_SERVER_API_AUTH_STRING"].partition(":")
        origin = os.environ["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"]
        client = TestClient(create_app())
        preflight = {"Access-Control-Request-Method": "POST"}
        print(json.dumps({
            "health": client.get("/api/health").status_code,
            "anonymous": client.get("/api/version").status_code,
            "wrong": client.get("/api/version", auth=(user, password + "x")).status_code,
            "right": client.get("/api/version", auth=(user, password)).status_code,
            "no_csrf": client.post("/api/flows/filter", json={}, auth=(user, password)).status_code,
            "other_origin": client.options("/api/flows/filter", headers={
                "Origin": "http://attacker.example", **preflight}).status_code,
            "ui_origin": client.options("/api/flows/filter", headers={
                "Origin": origin, **preflight}).headers.get("access-control-allow-origin"),
        }))
    """)
    outside = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    done = subprocess.run([sys.executable, "-c", probe], env={**outside, **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert answers == {"health": 200, "anonymous": 401, "wrong": 401, "right": 200,
                       "no_csrf": 403, "other_origin": 400,
                       "ui_origin": env["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"]}


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


def test_compose_variables_are_the_env_examples(compose_text):
    values = [text.replace("$$", "") for text in _strings(yaml.safe_load(compose_text))]
    references = [match.groups() for text in values for match in VARIABLE.finditer(text)]
    example = _env_example()
    assert {name for name, _, _ in references} == set(example)
    # every other $ is escaped for the shell ($$), not left for Compose to interpolate
    assert not [text for text in values if "$" in VARIABLE.sub("", text)]
    for name, operator, _ in references:
        secret = _secret(name)
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
    assert {used[volume] for volume in declared} == {"postgres", "s3", "prefect-server",
                                                     SERVING}


# -- the object store ------------------------------------------------------------------

def test_buckets_job_creates_the_stack_buckets_as_admin(compose):
    job = compose["services"]["buckets"]
    assert set(_env(job)["BUCKETS"].split()) == set(BUCKETS.values())
    assert "for bucket in $BUCKETS;" in job["command"][0]
    assert "create-bucket" in job["command"][0]
    assert _env(job)["AWS_ENDPOINT_URL"] == f"http://s3:{DEFAULT_PORTS['s3']}"
    assert _env(job)["AWS_ACCESS_KEY_ID"] == _env_example()["VISIONOPS_S3_ADMIN_ACCESS_KEY"]


def test_each_object_store_client_has_its_own_keys(compose):
    """The admin's keys go to the buckets job only; the MLflow server, the worker and
    people each have an identity of their own."""
    example = _env_example()
    holders = {"buckets": "ADMIN", "mlflow": "MLFLOW_SERVER", "prefect-worker": "WRITER"}
    for name, service in compose["services"].items():
        env = _env(service)
        if name in holders:
            prefix = f"VISIONOPS_S3_{holders[name]}"
            assert env["AWS_ACCESS_KEY_ID"] == example[f"{prefix}_ACCESS_KEY"], name
            assert env["AWS_SECRET_ACCESS_KEY"] == example[f"{prefix}_SECRET_KEY"], name
        else:
            assert "AWS_ACCESS_KEY_ID" not in env, name
        if name not in ("buckets", "s3", "preflight"):
            assert example["VISIONOPS_S3_ADMIN_SECRET_KEY"] not in env.values(), name


def _run_object_store_entrypoint(compose, command: list[str], folder: Path,
                                 **popen) -> subprocess.Popen:
    """The s3 service's entrypoint, run here with `command` in place of its own: it
    writes its configuration under `folder` (TMPDIR) and then runs the command."""
    service = compose["services"]["s3"]
    python, flag, script = service["entrypoint"]
    assert (python, flag) == ("python", "-c")
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TMPDIR": str(folder), **_env(service)}
    return subprocess.Popen([sys.executable, flag, script, *command], env=env, **popen)


def _written_config(arguments: list[str]) -> Path:
    (config_dir,) = [part.split("=", 1)[1] for part in arguments
                     if part.startswith("-config_dir=")]
    (s3_config,) = [part.split("=", 1)[1] for part in arguments
                    if part.startswith("-s3.config=")]
    assert Path(s3_config).parent == Path(config_dir)
    return Path(config_dir)


def test_object_store_entrypoint_writes_identities_and_fresh_jwt_keys(compose, tmp_path):
    """Run here, the entrypoint hands `weed` a private folder holding security.toml (a new
    JWT key for each HTTP port family and mutual TLS on every gRPC port) and s3.json
    (each identity's keys from the environment, and only its own actions)."""
    keys, folders = [], []
    for _ in range(2):
        run = _run_object_store_entrypoint(compose, ["echo", "weed"], tmp_path,
                                           stdout=subprocess.PIPE, text=True)
        arguments = run.communicate(timeout=60)[0].split()   # echo's, less its own name
        assert run.returncode == 0
        assert arguments[0].startswith("-config_dir=") and arguments[1] == "weed"
        folder = _written_config(arguments)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        folders.append(folder)
        security = tomllib.loads((folder / "security.toml").read_text())
        jwt = security["jwt"]
        keys.append([jwt["signing"]["key"], jwt["signing"]["read"]["key"],
                     jwt["filer_signing"]["key"], jwt["filer_signing"]["read"]["key"]])
        assert all(len(key) >= 32 for key in keys[-1]) and len(set(keys[-1])) == 4
        for component in ("master", "volume", "filer", "s3", "client"):
            assert Path(security["grpc"][component]["cert"]).parent == folder, component
        assert Path(security["grpc"]["ca"]).is_file()
    assert folders[0] != folders[1] and not set(keys[0]) & set(keys[1])   # new every start

    identities = {identity["name"]: identity for identity in json.loads(
        (folders[-1] / "s3.json").read_text())["identities"]}
    assert set(identities) == set(S3_IDENTITY_BUCKETS)
    example = _env_example()
    for name, identity in identities.items():
        prefix = "VISIONOPS_S3_" + name.upper().replace("-", "_")
        assert identity["credentials"] == [{"accessKey": example[f"{prefix}_ACCESS_KEY"],
                                            "secretKey": example[f"{prefix}_SECRET_KEY"]}]
    assert "Admin" in identities["admin"]["actions"]
    for name, actions in S3_IDENTITY_ACTIONS.items():
        granted = [action.split(":") for action in identities[name]["actions"]]
        assert all(len(pair) == 2 for pair in granted), name   # every action names a bucket
        assert {action for action, _ in granted} == actions, name
        assert {bucket for _, bucket in granted} == {BUCKETS[key] for key in
                                                     S3_IDENTITY_BUCKETS[name]}, name


def _listening(pid: int) -> dict[int, str]:
    return {connection.laddr.port: connection.laddr.ip
            for connection in psutil.Process(pid).net_connections(kind="inet")
            if connection.status == psutil.CONN_LISTEN}


def _stop_group(process: subprocess.Popen) -> None:
    """`weed` can hang in its graceful shutdown: SIGTERM, then SIGKILL."""
    for signal_number in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, signal_number)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=1)
            return
        except subprocess.TimeoutExpired:
            continue


def test_object_store_as_compose_runs_it_refuses_what_each_identity_may_not_do(
        compose, tmp_path):
    """compose's s3 service run here (its entrypoint and `weed` command; the data folder
    and the ports moved): only S3 (HTTP and gRPC) listens beyond loopback; the filer's
    HTTP port wants a JWT, S3's gRPC port a client certificate; and each identity may do
    what it needs, and no more."""
    import boto3
    import grpc
    from botocore.exceptions import ClientError

    ports = {name: _free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
        "filer.port.grpc", "s3.port", "s3.port.grpc")}
    data = tmp_path / "data"
    data.mkdir()
    command = [part.replace("/var/lib/seaweedfs", str(data)) for part in
               compose["services"]["s3"]["command"]]
    assert f"-dir={data}" in command
    command += [f"-{name}={port}" for name, port in ports.items()]
    log = (tmp_path / "weed.log").open("w")
    store = _run_object_store_entrypoint(compose, command, tmp_path, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    example = _env_example()

    def client(name: str):
        prefix = "VISIONOPS_S3_" + name.upper().replace("-", "_")
        return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                            aws_access_key_id=example[f"{prefix}_ACCESS_KEY"],
                            aws_secret_access_key=example[f"{prefix}_SECRET_KEY"])

    def refused(call, *args, **kwargs) -> bool:
        try:
            call(*args, **kwargs)
        except ClientError as exc:
            return exc.response["Error"]["Code"] == "AccessDenied"
        return False

    try:
        deadline = time.monotonic() + 60
        while True:   # the healthcheck's request, without credentials
            try:
                with urllib.request.urlopen(f"{endpoint}/healthz", timeout=2) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                assert store.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "weed.log").read_text()[-3000:]
                time.sleep(0.3)

        listening = _listening(store.pid)
        assert set(ports.values()) <= set(listening)
        beyond_loopback = {port for port, address in listening.items()
                           if not address.startswith("127.")}
        assert beyond_loopback == {ports["s3.port"], ports["s3.port.grpc"]}

        admin = client("admin")
        for bucket in BUCKETS.values():
            admin.create_bucket(Bucket=bucket)
        mlflow_server, writer, reviewer = (client(name) for name in (
            "mlflow-server", "writer", "reviewer"))
        mlflow_server.put_object(Bucket=BUCKETS["mlflow"], Key="artifacts/a", Body=b"model")
        writer.put_object(Bucket=BUCKETS["dvc"], Key="store/a", Body=b"data")
        writer.put_object(Bucket=BUCKETS["landing"], Key="new/a", Body=b"photo")
        assert refused(mlflow_server.put_object, Bucket=BUCKETS["dvc"], Key="x", Body=b"x")
        assert refused(writer.put_object, Bucket=BUCKETS["mlflow"], Key="x", Body=b"x")
        assert refused(writer.create_bucket, Bucket="visionops-other")
        assert refused(writer.delete_bucket, Bucket=BUCKETS["landing"])
        for bucket, key in ((BUCKETS["mlflow"], "artifacts/a"), (BUCKETS["dvc"], "store/a")):
            assert reviewer.get_object(Bucket=bucket, Key=key)["Body"].read()
            assert reviewer.list_objects_v2(Bucket=bucket)["KeyCount"] == 1
            assert refused(reviewer.put_object, Bucket=bucket, Key=key, Body=b"replaced")
            assert refused(reviewer.delete_object, Bucket=bucket, Key=key)

        # the filer's own HTTP port: a plain PUT once replaced what S3 then served
        put = urllib.request.Request(
            f"http://127.0.0.1:{ports['filer.port']}/buckets/{BUCKETS['dvc']}/store/a",
            data=b"replaced", method="PUT")
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(put, timeout=10)
        assert answer.value.code == 401
        assert writer.get_object(Bucket=BUCKETS["dvc"], Key="store/a")["Body"].read() == b"data"

        # S3's gRPC port updates its identities: without the store's certificate no call
        # arrives (an unprotected store answers INVALID_ARGUMENT to this empty request)
        with grpc.insecure_channel(f"127.0.0.1:{ports['s3.port.grpc']}") as channel:
            remove = channel.unary_unary("/messaging_pb.SeaweedS3IamCache/RemoveIdentity")
            with pytest.raises(grpc.RpcError) as call:
                remove(b"", timeout=10)
        assert call.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        _stop_group(store)
        log.close()


def test_mlflow_users_job_and_worker_reach_the_services_by_name(compose):
    for name in ("mlflow-users", "prefect-worker"):
        env = _env(compose["services"][name])
        assert urlsplit(env["MLFLOW_TRACKING_URI"]).hostname == "mlflow", name


# -- Kubernetes ------------------------------------------------------------------------

KUBERNETES_DEPLOYMENTS = (("mlflow.yaml", "mlflow"), ("prefect-worker.yaml", "prefect-worker"),
                          ("prefect-server.yaml", "prefect-server"),
                          ("serving.yaml", "visionops-serving"))


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


def _k8s_resolved(container: dict, manifests: dict) -> dict[str, str]:
    """Each variable's value as Kubernetes gives it, `$(VAR)` expanded from the variables
    defined before it; a Secret's value reads `<secret:key>`."""
    resolved = {}
    for item in container["env"]:
        if "value" in item:
            value = item["value"]
            for name in K8S_REFERENCE.findall(value):
                assert name in resolved, f"{item['name']}: $({name}) is not defined before it"
                value = value.replace(f"$({name})", resolved[name])
            resolved[item["name"]] = value
        elif "secretKeyRef" in item["valueFrom"]:
            resolved[item["name"]] = f"<secret:{item['valueFrom']['secretKeyRef']['key']}>"
        else:
            reference = item["valueFrom"]["configMapKeyRef"]
            resolved[item["name"]] = manifests["ConfigMap", reference["name"]]["data"][
                reference["key"]]
    return resolved


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
    server = _manifests("prefect-server.yaml")
    serving = _manifests("serving.yaml")
    assert set(mlflow) == {("ConfigMap", "mlflow-auth"), ("Deployment", "mlflow"),
                           ("Service", "mlflow")}
    assert set(worker) == {("ConfigMap", "visionops-prefect"), ("Deployment", "prefect-worker")}
    assert set(server) == {("ConfigMap", "prefect-server"), ("Deployment", "prefect-server"),
                           ("Service", "prefect-server")}
    assert set(serving) == {("Deployment", "visionops-serving"), ("Service", "visionops-serving"),
                            ("NetworkPolicy", "visionops-serving")}
    for document in [*mlflow.values(), *worker.values(), *server.values(), *serving.values()]:
        assert document["metadata"]["namespace"] == "visionops"
    ports = {"mlflow": DEFAULT_PORTS["mlflow"], "prefect-server": DEFAULT_PORTS["prefect"],
             "visionops-serving": _repo_params().serving.port}
    for manifests, name in ((mlflow, "mlflow"), (server, "prefect-server"),
                            (serving, "visionops-serving")):
        service, deployment = manifests["Service", name], manifests["Deployment", name]
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", name
        (port,) = service["spec"]["ports"]
        assert port["port"] == _port(_container(deployment), port["targetPort"]) \
            == ports[name]


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
    assert "--backend-store-uri" not in options
    env = _k8s_env(container)
    backend = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert _database(backend) == _database(local["mlflow"]["env"]["MLFLOW_BACKEND_STORE_URI"])
    assert make_url(backend).password is None
    assert int(options["--port"]) == DEFAULT_PORTS["mlflow"]

    assert set(env) == set(local["mlflow"]["env"]) | KUBERNETES_MLFLOW_EXTRA_ENV
    assert "PGPASSWORD" in {name for name, item in env.items() if "valueFrom" in item}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == _pool_job_env()["AWS_ENDPOINT_URL"]
    assert _secret_keys(container) >= {"s3-mlflow-server-access-key",
                                       "s3-mlflow-server-secret-key"}
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
    assert set(local["client_env"]) <= set(env) <= set(
        local["prefect-worker"]["env"]) | KUBERNETES_WORKER_EXTRA_ENV
    for key, value in CLIENT_HTTP_RETRIES.items():
        assert env[key]["value"] == value
    assert env["MLFLOW_TRACKING_USERNAME"]["value"] == USERS["writer"]
    reference = env["PREFECT_API_URL"]["valueFrom"]["configMapKeyRef"]
    config_map = manifests["ConfigMap", reference["name"]]
    assert config_map["data"][reference["key"]].endswith(
        f":{DEFAULT_PORTS['prefect']}/api")
    for name in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"):
        assert env[name]["value"] == _pool_job_env()[name], name
    assert _secret_keys(container) == {"mlflow-writer-password", "s3-writer-access-key",
                                       "s3-writer-secret-key", "prefect-auth-password"}
    check = container["livenessProbe"]["httpGet"]
    assert check["path"] == "/health" and _port(container, check["port"])
    assert "--with-healthcheck" in container["command"]


def test_kubernetes_prefect_server_matches_the_local_one(local):
    manifests = _manifests("prefect-server.yaml")
    container = _container(manifests["Deployment", "prefect-server"])
    assert _words(container["command"]) == ["prefect", "server", "start"]
    assert int(_options(container["command"])["--port"]) == DEFAULT_PORTS["prefect"]
    for probe in ("readinessProbe", "livenessProbe"):   # answered without the auth string
        check = container[probe]["httpGet"]
        assert check["path"] == "/api/health"
        assert _port(container, check["port"]) == DEFAULT_PORTS["prefect"]
    env = _k8s_resolved(container, manifests)
    assert set(local["prefect-server"]["env"]) - {"PREFECT_HOME"} <= set(env)
    url = env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert _database(url) == _database(
        local["prefect-server"]["env"]["PREFECT_API_DATABASE_CONNECTION_URL"])


def test_kubernetes_prefect_api_takes_auth_csrf_and_its_uis_origin_only():
    manifests = _manifests("prefect-server.yaml")
    server = _k8s_resolved(_container(manifests["Deployment", "prefect-server"]), manifests)
    worker_manifests = _manifests("prefect-worker.yaml")
    worker = _k8s_resolved(_container(worker_manifests["Deployment", "prefect-worker"]),
                           worker_manifests)
    assert server["PREFECT_SERVER_API_AUTH_STRING"] == "visionops:<secret:prefect-auth-password>"
    assert worker["PREFECT_API_AUTH_STRING"] == server["PREFECT_SERVER_API_AUTH_STRING"]
    assert server["PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"] == "true"
    origin = server["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"]
    parts = urlsplit(origin)
    assert origin == f"{parts.scheme}://{parts.netloc}" and parts.scheme in ("http", "https")
    assert server["PREFECT_UI_API_URL"] == f"{origin}/api"
    assert urlsplit(worker["PREFECT_API_URL"]).port == DEFAULT_PORTS["prefect"]


def test_kubernetes_secret_keys_are_documented():
    readme = (INFRA / "README.md").read_text()
    for name, kind in KUBERNETES_DEPLOYMENTS:
        spec = _manifests(name)["Deployment", kind]["spec"]["template"]["spec"]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            for key in _secret_keys(container):
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


# -- the model service (`visionops serve-model`) ---------------------------------------
# Not run here (the service's behaviour is tested in its own tests): its command line is
# parsed by the real CLI, its environment read by the real params loader, and the compose
# healthcheck run against a real HTTP server.

def _serve_model_options(argv: list[str]) -> dict:
    """What `visionops serve-model` makes of a command line: its options, parsed by the
    CLI itself (an unknown option fails), without running it."""
    import typer.main

    from visionops.cli import app

    assert argv[:2] == ["visionops", "serve-model"], argv
    command = typer.main.get_command(app).commands["serve-model"]
    return command.make_context("serve-model", list(argv[2:])).params


def _params_under(env: dict[str, str], monkeypatch):
    """params.yaml read as in a container given `env` (and no other VISIONOPS_ variable)."""
    from visionops.core.config import ENV_PREFIX, load_params

    for key in [key for key in os.environ if key.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_params(REPO / "params.yaml")


def _serving_k8s() -> tuple[dict, dict, dict]:
    """serving.yaml's manifests, its Deployment's pod spec and its one container."""
    manifests = _manifests("serving.yaml")
    deployment = manifests["Deployment", "visionops-serving"]
    return manifests, deployment["spec"]["template"]["spec"], _container(deployment)


def test_compose_serving_listens_on_its_published_port_bound_like_the_rest(
        compose, raw_compose):
    """The service listens on every address inside its container, on the port Compose
    publishes, and the host side of that port binds the bind variable (loopback unless
    told otherwise), never all addresses."""
    service = compose["services"][SERVING]
    options = _serve_model_options(service["command"])
    assert options["host"] == "0.0.0.0"   # inside the container: the port mapping's way in
    assert str(options["params_file"]) == "params.yaml"
    (raw_port,) = raw_compose["services"][SERVING]["ports"]
    assert raw_port == f"${{{BIND_VARIABLE}:-127.0.0.1}}:{options['port']}:{options['port']}"
    assert _published(service) == {options["port"]: options["port"]}
    assert options["port"] == _repo_params().serving.port


def test_compose_serving_is_healthy_once_a_model_is_loaded_and_waits_for_mlflow(compose):
    service = compose["services"][SERVING]
    port = _serve_model_options(service["command"])["port"]
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    assert f"'http://127.0.0.1:{port}/ready'" in test[3]
    assert service["healthcheck"]["start_period"]   # TensorFlow's import, the first load
    assert service["depends_on"]["mlflow"] == {"condition": "service_healthy"}
    assert service["depends_on"]["mlflow-users"] == {
        "condition": "service_completed_successfully"}
    assert service["restart"] == "unless-stopped"


def test_compose_serving_healthcheck_fails_while_ready_answers_503(compose):
    """The healthcheck's own code, run against a real HTTP server on a free port in place
    of the service's: it exits non-zero while /ready answers 503, and 0 once it answers
    200; it asks /ready and nothing else."""
    (code,) = compose["services"][SERVING]["healthcheck"]["test"][3:]
    answer = {"status": 503}
    asked = []

    class Service(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            asked.append(self.path)
            self.send_response(answer["status"] if self.path == "/ready" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = _serve_model_options(compose["services"][SERVING]["command"])["port"]
    code = code.replace(f"127.0.0.1:{port}/", f"127.0.0.1:{server.server_address[1]}/")

    def healthcheck() -> int:
        return subprocess.run([sys.executable, "-c", code], capture_output=True,
                              timeout=30).returncode

    try:
        assert healthcheck() != 0
        answer["status"] = 200
        assert healthcheck() == 0
    finally:
        server.shutdown()
        server.server_close()
    assert asked == ["/ready", "/ready"]


def test_serving_reads_the_registry_as_its_own_read_only_user(compose, raw_compose):
    """Compose and Kubernetes give the service a user of its own (no one else's password),
    created with the reviewer's role by mlflow-users (test_mlflow_users_job_sets_up_the_
    stacks_roles), its password a secret the preflight checks; no S3 keys."""
    service = raw_compose["services"][SERVING]
    env = _env(service)
    assert env["MLFLOW_TRACKING_USERNAME"] == SERVING_USER
    assert SERVING_USER not in (ADMIN, *USERS.values())
    assert env["MLFLOW_TRACKING_PASSWORD"].startswith(f"${{{SERVING_PASSWORD}:?")
    assert SERVING_PASSWORD in raw_compose["services"]["preflight"]["environment"]
    assert SERVING_PASSWORD in _secret_names()
    others = {value for name, value in _env_example().items()
              if _secret(name) and name != SERVING_PASSWORD}
    assert not others & set(_env(compose["services"][SERVING]).values())
    assert not [key for key in env if key.startswith("AWS_")]

    manifests, pod, container = _serving_k8s()
    k8s = _k8s_env(container)
    assert k8s["MLFLOW_TRACKING_USERNAME"]["value"] == SERVING_USER
    assert k8s["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "visionops-stack", "key": "mlflow-serving-password"}
    assert _secret_keys(container) == {"mlflow-serving-password"}
    (init,) = pod["initContainers"]   # the preflight (test_kubernetes_pods_run_the_preflight...)
    assert [item["name"] for item in init["env"]] == [SERVING_PASSWORD]
    assert not [key for key in k8s if key.startswith("AWS_")]


def test_serving_env_sets_the_params_it_means(compose, monkeypatch):
    """The variables the service is given, read by the real params loader: the team's
    tracking server, and a review area on a volume it may write (the image's files are
    read-only); the tracking server accepts the Host header the service sends."""
    service = compose["services"][SERVING]
    env = _env(service)
    params = _params_under({key: value for key, value in env.items()
                            if key.startswith("VISIONOPS_")}, monkeypatch)
    assert params.mlflow.tracking_uri == env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
    assert params.review_dir in mounts and mounts[params.review_dir] in compose["volumes"]
    for key, value in CLIENT_HTTP_RETRIES.items():
        assert env[key] == value, key

    manifests, pod, container = _serving_k8s()
    k8s = {name: item["value"] for name, item in _k8s_env(container).items() if "value" in item}
    params = _params_under({key: value for key, value in k8s.items()
                            if key.startswith("VISIONOPS_")}, monkeypatch)
    assert params.mlflow.tracking_uri == k8s["MLFLOW_TRACKING_URI"] == _pool_job_env()[
        "MLFLOW_TRACKING_URI"]
    volumes = {volume["name"] for volume in pod["volumes"]}
    assert {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}.get(
        params.review_dir) in volumes
    mlflow = _container(_manifests("mlflow.yaml")["Deployment", "mlflow"])
    allowed = _options(mlflow["command"])["--allowed-hosts"].split(",")
    assert _netloc(params.mlflow.tracking_uri) in allowed


def test_kubernetes_serving_probes_ready_and_live_on_the_port_it_listens_on():
    """Traffic only to a pod whose model is loaded (/ready); a restart only when the
    server stops answering (/health), and not before TensorFlow and the model had time
    to load; both on the port the command line gives."""
    manifests, pod, container = _serving_k8s()
    options = _serve_model_options(container["command"])
    assert options["host"] == "0.0.0.0" and str(options["params_file"]) == "params.yaml"
    assert [item["containerPort"] for item in container["ports"]] == [options["port"]]
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health"),
                        ("startupProbe", "/health")):
        check = container[probe]["httpGet"]
        assert check["path"] == path, probe
        assert _port(container, check["port"]) == options["port"], probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert manifests["Deployment", "visionops-serving"]["spec"]["replicas"] >= 2
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert "args" not in container   # the command line holds no secret (test_no_secret_...)


def test_kubernetes_serving_runs_as_a_user_on_a_read_only_root(compose):
    """Not root (the image's `visionops`, as in Compose), no privilege escalation, no
    capabilities, and a read-only root filesystem with /tmp on an emptyDir."""
    manifests, pod, container = _serving_k8s()
    assert pod["securityContext"]["runAsNonRoot"] is True
    uid = container.get("securityContext", {}).get("runAsUser",
                                                   pod["securityContext"].get("runAsUser"))
    assert uid and uid != 0
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(rf"useradd --uid {uid} .*visionops", dockerfile)
    assert compose["services"][SERVING]["user"] == f"{uid}:{uid}"
    assert compose["services"][SERVING]["read_only"] is True
    assert any(str(mount).split(":")[0] == "/tmp" for mount in compose["services"][SERVING][
        "tmpfs"])
    for each in [*pod["initContainers"], container]:
        security = each["securityContext"]
        assert security["allowPrivilegeEscalation"] is False, each["name"]
        assert security["readOnlyRootFilesystem"] is True, each["name"]
        assert security["capabilities"]["drop"] == ["ALL"], each["name"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    (tmp,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]
    assert pod["automountServiceAccountToken"] is False


def test_kubernetes_serving_is_reachable_only_from_labelled_pods():
    """The service has no auth: its NetworkPolicy selects its pods and lets in only pods
    that carry a label, on its HTTP port only."""
    manifests, pod, container = _serving_k8s()
    policy = manifests["NetworkPolicy", "visionops-serving"]["spec"]
    deployment = manifests["Deployment", "visionops-serving"]
    assert policy["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert "Ingress" in policy["policyTypes"]
    (rule,) = policy["ingress"]
    assert rule["from"]
    for source in rule["from"]:
        assert source["podSelector"]["matchLabels"], source   # never every pod
        assert "ipBlock" not in source
    assert [_port(container, port["port"]) for port in rule["ports"]] == [
        _serve_model_options(container["command"])["port"]]
