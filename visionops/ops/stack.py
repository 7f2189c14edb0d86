"""The team stack on one machine, without Docker: PostgreSQL (already running), a
SeaweedFS object store, an MLflow tracking server (PostgreSQL store, proxied S3
artifacts, basic auth), a Prefect server on PostgreSQL and a process worker.

`up` starts what is not running, `down` stops it by PID, `status` checks each part.
Ports, secrets and PIDs live in `<project>/.stack/state.json` (git-ignored, mode 600);
`client_env` is all a client (the flows, `visionops retrain`, DVC, boto3) needs.
infra/compose.yaml declares the same services, ports, buckets and variables.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path

from visionops.ops import processes
from visionops.ops.objectstore import ObjectStore, free_port, start_seaweedfs

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
POSTGRES_URL_VARIABLE = "VISIONOPS_POSTGRES_URL"
DEFAULT_PORTS = {"s3": 8333, "mlflow": 5000, "prefect": 4200}
BUCKETS = {"mlflow": "visionops-mlflow", "dvc": "visionops-dvc", "landing": "visionops-landing"}
DATABASES = ("mlflow", "mlflow_auth", "prefect")  # each prefixed: visionops_mlflow, ...
WORK_POOL = "visionops"
USERS = {"writer": "visionops-writer", "reviewer": "visionops-reviewer"}
ADMIN = "admin"
DVC_REMOTE = "stack"
# Started in this order, stopped in the reverse one.
SERVICES = ("s3", "mlflow", "prefect-server", "prefect-worker")
# The MLflow client's own HTTP retries stay short: the flow's tasks retry transient faults.
CLIENT_HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
AUTH_CONFIG_TEMPLATE = Path(__file__).resolve().parents[2] / "mlflow" / "basic_auth.ini"


class StackError(RuntimeError):
    """The stack cannot start or stop; the message says what to do."""


def _bin(name: str) -> str:
    beside_python = Path(sys.executable).with_name(name)
    return str(beside_python) if beside_python.exists() else (shutil.which(name) or name)


@dataclass
class Launch:
    command: list[str]
    env: dict[str, str]  # set on top of the caller's environment (less its client settings)
    cwd: Path | None = None


@dataclass
class Stack:
    project: Path
    state_dir: Path
    postgres_url: str = DEFAULT_POSTGRES_URL
    db_prefix: str = "visionops"
    ports: dict[str, int] = field(default_factory=dict)
    weed_ports: dict[str, int] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    # -- state -------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @classmethod
    def load(cls, project: Path, state_dir: Path | None = None) -> Stack:
        project = project.resolve()
        state_dir = (state_dir or project / ".stack").resolve()
        state_file = state_dir / "state.json"
        if not state_file.exists():
            return cls(project=project, state_dir=state_dir)
        saved = json.loads(state_file.read_text())
        return cls(project=project, state_dir=state_dir, **{
            key: saved[key] for key in ("postgres_url", "db_prefix", "ports", "weed_ports",
                                        "secrets", "pids") if key in saved})

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"postgres_url": self.postgres_url, "db_prefix": self.db_prefix,
                           "ports": self.ports, "weed_ports": self.weed_ports,
                           "secrets": self.secrets, "pids": self.pids}, indent=2)
        _write_private(self.state_file, text)

    # -- addresses ---------------------------------------------------------------------

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['prefect']}/api"

    def database_url(self, name: str, driver: str = "postgresql") -> str:
        from sqlalchemy.engine import make_url

        url = make_url(self.postgres_url).set(drivername=driver,
                                              database=f"{self.db_prefix}_{name}")
        return url.render_as_string(hide_password=False)

    def object_store(self) -> ObjectStore:
        return ObjectStore(self.s3_endpoint, self.secrets["s3_access_key"],
                           self.secrets["s3_secret_key"], self.pids.get("s3", 0),
                           self.state_dir / "logs" / "s3.log")

    def user(self, role: str) -> tuple[str, str]:
        """(username, password) of `admin`, `writer` or `reviewer` on the MLflow server."""
        return (ADMIN if role == "admin" else USERS[role]), self.secrets[f"mlflow_{role}"]

    def client_env(self) -> dict[str, str]:
        """What a client of the stack sets: `visionops retrain`, a worker's flow runs, DVC
        and boto3 (the S3 landing area) all read these."""
        username, password = self.user("writer")
        return {
            "VISIONOPS_MLFLOW__TRACKING_URI": self.mlflow_url,  # mlflow.tracking_uri
            "MLFLOW_TRACKING_URI": self.mlflow_url,  # for the `mlflow` command
            "MLFLOW_TRACKING_USERNAME": username,
            "MLFLOW_TRACKING_PASSWORD": password,
            **CLIENT_HTTP_RETRIES,
            "PREFECT_API_URL": self.prefect_api_url,
            **self.object_store().env(),
        }

    # -- up ----------------------------------------------------------------------------

    def up(self, requested_ports: dict[str, int] | None = None, say=print) -> None:
        """Start every part that is not running; parts already up are left alone."""
        for name, default in DEFAULT_PORTS.items():
            if name not in self.ports:
                wanted = (requested_ports or {}).get(name, default)
                self.ports[name] = wanted or free_port()
        for role in ("admin", "writer", "reviewer"):
            self.secrets.setdefault(f"mlflow_{role}", secrets.token_urlsafe(18))
        self.secrets.setdefault("s3_access_key", "visionops" + secrets.token_hex(4))
        self.secrets.setdefault("s3_secret_key", secrets.token_hex(20))
        self.secrets.setdefault("flask_secret_key", secrets.token_urlsafe(24))
        self.save()

        self._create_databases(say)
        if not self._running("s3"):
            self._start_object_store(say)
        starting = []
        for name in ("mlflow", "prefect-server"):
            if not self._running(name):
                self._start(name)
                starting.append(name)
        self.save()
        for name in starting:
            self._wait_healthy(name, say)
        self._create_users()
        if not self._running("prefect-worker"):
            self._start("prefect-worker")
            say(f"Prefect worker: pool {WORK_POOL!r}, runs flows in {self.project}")
        self.configure_dvc_remote()
        self.save()
        _write_private(self.state_dir / "stack.env", "".join(
            f"{key}={value}\n" for key, value in self.client_env().items()))

    def _running(self, name: str) -> bool:
        pid = self.pids.get(name)
        return bool(pid) and processes.alive(pid)

    def _log(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    def _server_env(self) -> dict[str, str]:
        """The caller's environment without any client settings pointing elsewhere."""
        return {key: value for key, value in os.environ.items()
                if not key.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}

    def _postgres(self):
        """An autocommit connection to the configured PostgreSQL (CREATE and DROP DATABASE
        cannot run in a transaction), or a StackError saying how to get one."""
        import psycopg2

        try:
            connection = psycopg2.connect(self.postgres_url, connect_timeout=5)
        except psycopg2.OperationalError as exc:
            raise StackError(
                f"No PostgreSQL answered at {self.postgres_url}: {str(exc).strip()}\n"
                "The stack keeps MLflow's and Prefect's data in PostgreSQL. Start one "
                "(Debian/Ubuntu: `sudo apt install postgresql && sudo service postgresql "
                f"start`) or set {POSTGRES_URL_VARIABLE} (or --postgres-url) to the URL of "
                "one you can create databases on.") from exc
        connection.autocommit = True
        return connection

    def _create_databases(self, say) -> None:
        connection = self._postgres()
        with connection.cursor() as cursor:
            for name in DATABASES:
                database = f"{self.db_prefix}_{name}"
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{database}"')
                    say(f"PostgreSQL: created database {database}")
        connection.close()

    def _start_object_store(self, say) -> None:
        store = start_seaweedfs(self.state_dir / "s3", self.secrets["s3_access_key"],
                                self.secrets["s3_secret_key"], ports=self.weed_ports or None,
                                s3_port=self.ports["s3"], log=self._log("s3"))
        self.weed_ports = store.ports
        self.pids["s3"] = store.pid
        client = store.client()
        existing = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
        for bucket in BUCKETS.values():
            if bucket not in existing:
                client.create_bucket(Bucket=bucket)
        say(f"object store (SeaweedFS): {self.s3_endpoint}  buckets: "
            + ", ".join(BUCKETS.values()))

    def auth_config_text(self) -> str:
        """mlflow/basic_auth.ini with its users' database on PostgreSQL."""
        return AUTH_CONFIG_TEMPLATE.read_text().replace(
            "sqlite:///basic_auth.db", self.database_url("mlflow_auth"))

    def launch(self, name: str) -> Launch:
        """How each server is started: its command line and the variables the stack sets."""
        if name == "mlflow":
            auth_dir = self.state_dir / "mlflow"
            return Launch(
                [_bin("mlflow"), "server", "--app-name", "basic-auth",
                 "--backend-store-uri", self.database_url("mlflow"),
                 "--artifacts-destination", f"s3://{BUCKETS['mlflow']}/artifacts",
                 "--host", "127.0.0.1", "--port", str(self.ports["mlflow"]), "--workers", "2"],
                {"MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
                 "AWS_ACCESS_KEY_ID": self.secrets["s3_access_key"],
                 "AWS_SECRET_ACCESS_KEY": self.secrets["s3_secret_key"],
                 "AWS_DEFAULT_REGION": "us-east-1",
                 "MLFLOW_AUTH_CONFIG_PATH": str(auth_dir / "basic_auth.ini"),
                 "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secrets["flask_secret_key"],
                 "MLFLOW_AUTH_ADMIN_PASSWORD": self.secrets["mlflow_admin"]},
                cwd=auth_dir)
        prefect = {"PREFECT_HOME": str(self.state_dir / "prefect"),
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        if name == "prefect-server":
            return Launch(
                [_bin("prefect"), "server", "start", "--host", "127.0.0.1",
                 "--port", str(self.ports["prefect"])],
                {**prefect, "PREFECT_API_DATABASE_CONNECTION_URL":
                 self.database_url("prefect", driver="postgresql+asyncpg")})
        if name == "prefect-worker":
            return Launch(
                [_bin("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process"],
                {**prefect, **self.client_env()}, cwd=self.project)
        raise KeyError(f"no launch for {name!r}")

    def _start(self, name: str) -> None:
        launch = self.launch(name)
        if name == "mlflow":
            launch.cwd.mkdir(parents=True, exist_ok=True)
            (launch.cwd / "basic_auth.ini").write_text(self.auth_config_text())
        self.pids[name] = processes.start(launch.command, self._log(name),
                                          env={**self._server_env(), **launch.env},
                                          cwd=launch.cwd)

    def _wait_healthy(self, name: str, say, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy(name):
            if not self._running(name) or time.monotonic() > deadline:
                raise StackError(f"{name} did not start; see {self._log(name)}:\n"
                                 + _tail(self._log(name)))
            time.sleep(0.5)
        url = self.mlflow_url if name == "mlflow" else self.prefect_api_url
        say(f"{name}: {url}")

    def _mlflow_api(self, path: str, body: dict | None, role: str | None = "admin"):
        request = urllib.request.Request(
            self.mlflow_url + path, method="GET" if body is None else "POST",
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"})
        if role:
            token = b64encode(":".join(self.user(role)).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    def _create_users(self) -> None:
        """The flows' writer and a reviewer; both read everything (the server's default
        permission), only the writer owns (and so can change) what the flows create."""
        for role in USERS:
            username, password = self.user(role)
            try:
                self._mlflow_api("/api/2.0/mlflow/users/create",
                                 {"username": username, "password": password})
            except urllib.error.HTTPError as exc:
                if "RESOURCE_ALREADY_EXISTS" not in exc.read().decode(errors="replace"):
                    raise

    def configure_dvc_remote(self) -> None:
        """The project's default DVC remote becomes the stack's bucket, in
        `.dvc/config.local` (git-ignored): nothing committed changes."""
        if not (self.project / ".dvc").is_dir():
            return
        store = self.object_store()
        settings = {"url": f"s3://{BUCKETS['dvc']}/store", "endpointurl": store.endpoint,
                    "access_key_id": store.access_key,
                    "secret_access_key": store.secret_key, "region": "us-east-1"}
        dvc = [_bin("dvc")]
        run = dict(cwd=self.project, check=True, capture_output=True)
        subprocess.run([*dvc, "remote", "add", "--local", "--force", DVC_REMOTE,
                        settings.pop("url")], **run)
        for key, value in settings.items():
            subprocess.run([*dvc, "remote", "modify", "--local", DVC_REMOTE, key, "--", value],
                           **run)
        subprocess.run([*dvc, "remote", "default", "--local", DVC_REMOTE], **run)

    # -- status and down ---------------------------------------------------------------

    def healthy(self, name: str) -> bool:
        try:
            if name == "s3":
                self.object_store().client().list_buckets()
                return True
            if name == "mlflow":
                return _answers(self.mlflow_url + "/health")
            if name == "prefect-server":
                return _answers(self.prefect_api_url + "/health")
        except Exception:  # noqa: BLE001 - not answering, whatever the reason
            return False
        return self._running(name)

    def status(self) -> dict[str, dict]:
        urls = {"s3": self.ports.get("s3") and self.s3_endpoint,
                "mlflow": self.ports.get("mlflow") and self.mlflow_url,
                "prefect-server": self.ports.get("prefect") and self.prefect_api_url}
        return {name: {"pid": self.pids.get(name), "running": self._running(name),
                       "healthy": self._running(name) and self.healthy(name),
                       "url": urls.get(name)} for name in SERVICES}

    def down(self, only: list[str] | None = None, purge: bool = False, say=print) -> None:
        """Stop the parts (all by default) by PID, last started first. `purge` also
        drops the databases, the stored objects and the DVC remote setting."""
        for name in reversed(SERVICES):
            if only and name not in only:
                continue
            pid = self.pids.pop(name, None)
            if pid:
                processes.stop(pid, timeout=3 if name == "s3" else 15)
                say(f"stopped {name} (pid {pid})")
        self.save()
        if purge and not only:
            self._purge(say)

    def _purge(self, say) -> None:
        connection = self._postgres()
        with connection.cursor() as cursor:
            for name in DATABASES:
                cursor.execute(f'DROP DATABASE IF EXISTS "{self.db_prefix}_{name}" WITH (FORCE)')
        connection.close()
        if (self.project / ".dvc").is_dir():
            subprocess.run([_bin("dvc"), "remote", "remove", "--local", DVC_REMOTE],
                           cwd=self.project, capture_output=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        say(f"purged: databases {self.db_prefix}_*, {self.state_dir}")


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds passwords), from its creation on."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except urllib.error.HTTPError:
        return True  # an HTTP answer, even 401, means the server is up
    except OSError:
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
