"""The team stack on one machine, without Docker: PostgreSQL (already running), a
SeaweedFS object store, an MLflow tracking server (PostgreSQL store, proxied S3
artifacts, basic auth), a Prefect server on PostgreSQL and a process worker.

`up` starts what is not running, `down` stops it by PID, `status` checks each part.
Ports, secrets, PIDs and each process's identity live in `<project>/.stack/state.json`
(git-ignored; the folder 0700, every file in it 0600, written atomically);
`client_env` is all a client (the flows, `visionops retrain`, DVC, boto3) needs.
infra/compose.yaml declares the same services, ports, buckets and variables.

Who may do what (README, "Security"):
- Prefect's API takes one auth string, CSRF tokens, and only its own UI's origin; the
  string is the pipeline's and the operator's, since whoever holds it can make the
  worker run a command.
- MLflow: the pipeline's `writer` creates and owns the experiment and the registered
  model; a `reviewer` reads; a `promoter` reads and moves aliases (ops/mlflow_roles.py).
- S3: the admin keys stay in the stack; the MLflow server writes its bucket only, the
  writer the DVC and landing buckets, a reviewer reads.
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
from dataclasses import dataclass, field
from pathlib import Path

from visionops.core.files import private_folder, write_atomic
from visionops.ops import mlflow_roles, processes
from visionops.ops.objectstore import (
    READER_ACTIONS,
    WRITER_ACTIONS,
    ObjectStore,
    S3Identity,
    bucket_actions,
    free_port,
    start_seaweedfs,
)

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
POSTGRES_URL_VARIABLE = "VISIONOPS_POSTGRES_URL"
DEFAULT_PORTS = {"s3": 8333, "mlflow": 5000, "prefect": 4200}
BUCKETS = {"mlflow": "visionops-mlflow", "dvc": "visionops-dvc", "landing": "visionops-landing"}
DATABASES = ("mlflow", "mlflow_auth", "prefect")  # each prefixed: visionops_mlflow, ...
WORK_POOL = "visionops"
USERS = {"writer": "visionops-writer", "reviewer": "visionops-reviewer"}
ADMIN = "admin"
PERSON_ROLES = ("reviewer", "promoter")  # `stack user add NAME --role ...`
# The S3 identities beside the admin's, and what each may do on which bucket.
S3_IDENTITIES = {
    "mlflow-server": bucket_actions(WRITER_ACTIONS, [BUCKETS["mlflow"]]),
    "writer": bucket_actions(WRITER_ACTIONS, [BUCKETS["dvc"], BUCKETS["landing"]]),
    "reviewer": bucket_actions(READER_ACTIONS, BUCKETS.values()),
}
# Loading a model never unpickles: see visionops/io/models.py.
NO_PICKLES = {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
DVC_REMOTE = "stack"
# Started in this order, stopped in the reverse one.
SERVICES = ("s3", "mlflow", "prefect-server", "prefect-worker")
SERVICE_PORT = {"s3": "s3", "mlflow": "mlflow", "prefect-server": "prefect"}
# What each part's command line held before identities were recorded (see Stack.load).
EARLIER_COMMAND_MARKS = {
    "s3": lambda stack: ("weed", "server", f"-dir={stack.state_dir / 's3'}"),
    "mlflow": lambda stack: ("mlflow", "server", str(stack.ports.get("mlflow"))),
    "prefect-server": lambda stack: ("prefect", "server", str(stack.ports.get("prefect"))),
    "prefect-worker": lambda stack: ("prefect", "worker", WORK_POOL),
}
# The MLflow client's own HTTP retries stay short: the flow's tasks retry transient faults.
CLIENT_HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
AUTH_CONFIG_TEMPLATE = Path(__file__).resolve().parents[2] / "mlflow" / "basic_auth.ini"


STATE_KEYS = ("postgres_url", "db_prefix", "ports", "weed_ports", "secrets", "pids",
              "identities", "people")


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
    identities: dict[str, dict] = field(default_factory=dict)  # processes.Identity, saved
    people: dict[str, dict[str, str]] = field(default_factory=dict)  # name: role, password
    # parts running from an earlier visionops's state, without today's security settings
    started_unsecured: list[str] = field(default_factory=list)

    # -- state -------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @classmethod
    def load(cls, project: Path, state_dir: Path | None = None) -> Stack:
        project = project.resolve()
        state_dir = state_dir or project / ".stack"
        if state_dir.is_symlink():
            raise StackError(f"{state_dir} is a symlink; the stack keeps its secrets only in "
                             "a folder of its own: remove the link")
        state_dir = state_dir.resolve()
        state_file = state_dir / "state.json"
        if not state_file.exists():
            return cls(project=project, state_dir=state_dir)
        try:
            saved = json.loads(state_file.read_text())
        except ValueError as exc:
            raise StackError(
                f"{state_file} is not readable JSON ({exc}). It is written atomically, so "
                "something else changed it. The servers it named may still run: "
                "`pgrep -af 'weed server|mlflow server|prefect'` lists them.") from exc
        stack = cls(project=project, state_dir=state_dir, **{
            key: saved[key] for key in STATE_KEYS if key in saved})
        if saved.get("pids") and "identities" not in saved:
            stack._adopt_earlier_processes()
        return stack

    def _adopt_earlier_processes(self) -> None:
        """A state.json written before identities were recorded: a recorded PID still
        running the command that part runs is taken as that part (so `down` stops it);
        any other is dropped. `up` then refuses until `down`: those servers lack the
        security settings."""
        self.started_unsecured = []
        for name, pid in list(self.pids.items()):
            try:
                identity = processes.Identity.of(pid, settle_s=0)
            except (processes.psutil.NoSuchProcess, processes.psutil.AccessDenied):
                identity = None
            marks = EARLIER_COMMAND_MARKS[name](self)
            if identity and all(any(mark in word for word in identity.cmdline)
                                for mark in marks):
                self.identities[name] = identity.to_dict()
                self.started_unsecured.append(name)
            else:
                self.pids.pop(name)

    def save(self) -> None:
        private_folder(self.state_dir)
        write_atomic(self.state_file, json.dumps(
            {key: getattr(self, key) for key in STATE_KEYS}, indent=2))

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

    @property
    def postgres_url_shown(self) -> str:
        from sqlalchemy.engine import make_url

        return make_url(self.postgres_url).render_as_string(hide_password=True)

    @property
    def prefect_ui_origin(self) -> str:
        return f"http://127.0.0.1:{self.ports['prefect']}"

    def database_url(self, name: str, driver: str = "postgresql") -> str:
        from sqlalchemy.engine import make_url

        url = make_url(self.postgres_url).set(drivername=driver,
                                              database=f"{self.db_prefix}_{name}")
        return url.render_as_string(hide_password=False)

    def object_store(self, identity: str = "admin") -> ObjectStore:
        """The store as `admin` (the stack itself) or one of S3_IDENTITIES."""
        prefix = "s3" if identity == "admin" else f"s3_{identity}"
        return ObjectStore(self.s3_endpoint, self.secrets[f"{prefix}_access_key"],
                           self.secrets[f"{prefix}_secret_key"], self.pids.get("s3", 0),
                           self._log("s3"))

    def user(self, role: str) -> tuple[str, str]:
        """(username, password) of `admin`, `writer` or `reviewer` on the MLflow server."""
        return (ADMIN if role == "admin" else USERS[role]), self.secrets[f"mlflow_{role}"]

    @property
    def prefect_auth_string(self) -> str:
        return f"visionops:{self.secrets['prefect_auth']}"

    def prefect_session(self):
        """A requests session for the Prefect API as Prefect's own client talks to it: the
        stack's auth string as basic auth, then a CSRF token for this session on every
        request."""
        import uuid

        import requests

        session = requests.Session()
        session.auth = tuple(self.prefect_auth_string.split(":", 1))
        client = str(uuid.uuid4())
        answer = session.get(f"{self.prefect_api_url}/csrf-token?client={client}", timeout=30)
        if answer.ok:
            session.headers.update({"Prefect-Csrf-Token": answer.json()["token"],
                                    "Prefect-Csrf-Client": client})
        return session

    def client_env(self) -> dict[str, str]:
        """What the pipeline sets: `visionops retrain`, the worker's flow runs, DVC and
        boto3 (the S3 landing area) read these. The writer's: never a person's."""
        username, password = self.user("writer")
        return {**self._mlflow_env(username, password),
                "PREFECT_API_URL": self.prefect_api_url,
                "PREFECT_API_AUTH_STRING": self.prefect_auth_string,
                **self.object_store("writer").env()}

    def person_env(self, name: str | None = None) -> dict[str, str]:
        """What a person sets: their own MLflow account (the stack's reviewer when no name
        is given) and read-only S3 keys. No Prefect auth string: it can run commands."""
        if name is None:
            username, password = self.user("reviewer")
        elif name in self.people:
            username, password = name, self.people[name]["password"]
        else:
            raise StackError(f"no user {name!r} on this stack; add one with `visionops stack "
                             f"user add {name} --role reviewer|promoter`")
        return {**self._mlflow_env(username, password), **self.object_store("reviewer").env()}

    def _mlflow_env(self, username: str, password: str) -> dict[str, str]:
        return {"VISIONOPS_MLFLOW__TRACKING_URI": self.mlflow_url,  # mlflow.tracking_uri
                "MLFLOW_TRACKING_URI": self.mlflow_url,  # for the `mlflow` command
                "MLFLOW_TRACKING_USERNAME": username,
                "MLFLOW_TRACKING_PASSWORD": password,
                **CLIENT_HTTP_RETRIES, **NO_PICKLES}

    # -- up ----------------------------------------------------------------------------

    def up(self, requested_ports: dict[str, int] | None = None, say=print) -> None:
        """Start every part that is not running; parts already up are left alone."""
        if self.started_unsecured:
            raise StackError(
                f"{', '.join(self.started_unsecured)} still run as an earlier visionops "
                "started them, without the Prefect auth string, the narrower S3 keys and "
                "MLflow's roles: `visionops stack down`, then `visionops stack up` (data, "
                "databases and passwords are kept).")
        for name, default in DEFAULT_PORTS.items():
            if name not in self.ports:
                wanted = (requested_ports or {}).get(name, default)
                self.ports[name] = wanted or free_port()
        for role in ("admin", "writer", "reviewer"):
            self.secrets.setdefault(f"mlflow_{role}", secrets.token_urlsafe(18))
        for prefix in ("s3", *(f"s3_{name}" for name in S3_IDENTITIES)):
            self.secrets.setdefault(f"{prefix}_access_key", "visionops" + secrets.token_hex(6))
            self.secrets.setdefault(f"{prefix}_secret_key", secrets.token_hex(20))
        self.secrets.setdefault("flask_secret_key", secrets.token_urlsafe(24))
        self.secrets.setdefault("prefect_auth", secrets.token_urlsafe(24))
        self.save()
        for folder in ("logs", "mlflow", "prefect"):
            private_folder(self.state_dir / folder)

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
        self._set_up_accounts()
        if not self._running("prefect-worker"):
            self._start("prefect-worker")
            say(f"Prefect worker: pool {WORK_POOL!r}, runs flows in {self.project}")
        self.configure_dvc_remote()
        self.save()
        write_atomic(self.state_dir / "stack.env", "".join(
            f"{key}={value}\n" for key, value in self.client_env().items()))

    def _running(self, name: str) -> bool:
        """Its process runs, and is the one this stack started (not a reused PID)."""
        pid, saved = self.pids.get(name), self.identities.get(name)
        return bool(pid and saved) and processes.owns(processes.Identity.from_dict(saved), pid)

    def _record(self, name: str, pid: int) -> None:
        """Remember a started part at once: a failure later in `up` leaves nothing
        running that state.json does not name."""
        self.pids[name] = pid
        try:
            self.identities[name] = processes.Identity.of(pid).to_dict()
        except processes.psutil.NoSuchProcess:
            self.identities[name] = {"boot": "", "created": 0, "cmdline": []}  # never ours
            self.save()
            raise StackError(f"{name} ended as soon as it started; see {self._log(name)}:\n"
                             + _tail(self._log(name))) from None
        self.save()

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
                f"No PostgreSQL answered at {self.postgres_url_shown}: {str(exc).strip()}\n"
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
        identities = tuple(
            S3Identity(name, self.secrets[f"s3_{name}_access_key"],
                       self.secrets[f"s3_{name}_secret_key"], actions)
            for name, actions in S3_IDENTITIES.items())
        store = start_seaweedfs(self.state_dir / "s3", self.secrets["s3_access_key"],
                                self.secrets["s3_secret_key"], ports=self.weed_ports or None,
                                s3_port=self.ports["s3"], log=self._log("s3"),
                                identities=identities)
        self.weed_ports = store.ports
        self._record("s3", store.pid)
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
            store = self.object_store("mlflow-server")
            return Launch(
                [_bin("mlflow"), "server", "--app-name", "basic-auth",
                 *mlflow_roles.SERVER_OPTIONS,
                 "--artifacts-destination", f"s3://{BUCKETS['mlflow']}/artifacts",
                 "--host", "127.0.0.1", "--port", str(self.ports["mlflow"]), "--workers", "2"],
                # the database URL may hold a password: never on the command line
                {"MLFLOW_BACKEND_STORE_URI": self.database_url("mlflow"),
                 "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
                 "AWS_ACCESS_KEY_ID": store.access_key,
                 "AWS_SECRET_ACCESS_KEY": store.secret_key,
                 "AWS_DEFAULT_REGION": "us-east-1",
                 **NO_PICKLES,
                 # MLflow's GenAI job runner: 8 more processes and ~5 s at each start, for
                 # features this product does not use
                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
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
                 self.database_url("prefect", driver="postgresql+asyncpg"),
                 "PREFECT_SERVER_API_AUTH_STRING": self.prefect_auth_string,
                 "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true",
                 # a page on another site cannot call the API from a browser
                 "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": self.prefect_ui_origin})
        if name == "prefect-worker":
            return Launch(
                [_bin("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process"],
                {**prefect, **self.client_env()}, cwd=self.project)
        raise KeyError(f"no launch for {name!r}")

    def _start(self, name: str) -> None:
        launch = self.launch(name)
        if name == "mlflow":
            private_folder(launch.cwd)
            write_atomic(launch.cwd / "basic_auth.ini", self.auth_config_text())
        self._record(name, processes.start(launch.command, self._log(name),
                                           env={**self._server_env(), **launch.env},
                                           cwd=launch.cwd))

    def _wait_healthy(self, name: str, say, timeout: float = 180) -> None:
        """Until the server started answers on its port. Only its own listening socket
        counts: a process squatting the port would otherwise get the passwords."""
        deadline = time.monotonic() + timeout
        while not (self._owns_port(name) and self.healthy(name)):
            if not self._running(name) or time.monotonic() > deadline:
                raise StackError(f"{name} did not start; see {self._log(name)}:\n"
                                 + _tail(self._log(name)) + self._squatter_note(name))
            time.sleep(0.5)
        url = self.mlflow_url if name == "mlflow" else self.prefect_api_url
        say(f"{name}: {url}")

    def _owns_port(self, name: str) -> bool:
        port = self.ports[SERVICE_PORT[name]]
        return self._running(name) and processes.listens_on(self.pids[name], port)

    def _squatter_note(self, name: str) -> str:
        port = self.ports[SERVICE_PORT[name]]
        if _answers(f"http://127.0.0.1:{port}/"):
            return (f"\nAnother process holds 127.0.0.1:{port}; it was sent nothing. "
                    "Stop it, or choose another port.")
        return ""

    def _set_up_accounts(self) -> None:
        """MLflow's users and what each may do; then the pipeline's experiment and
        registered model, created by the writer so that no one else can take the names."""
        if not self._owns_port("mlflow"):
            raise StackError(f"MLflow's port {self.ports['mlflow']} is not held by the "
                             f"server this stack started (pid {self.pids.get('mlflow')}); "
                             "no password was sent. `visionops stack down --only mlflow`, "
                             "then `stack up`.")
        admin = self.user("admin")
        for role in USERS:
            mlflow_roles.create_user(self.mlflow_url, admin, *self.user(role))
        self._apply_role(USERS["writer"], "writer")
        params = self._params()
        mlflow_roles.create_writer_resources(self.mlflow_url, self.user("writer"),
                                             params.mlflow.experiment_name,
                                             params.registry.model_name)
        self._apply_role(USERS["reviewer"], "reviewer")
        for name, person in self.people.items():
            mlflow_roles.create_user(self.mlflow_url, admin, name, person["password"])
            self._apply_role(name, person["role"])

    def _apply_role(self, username: str, role: str) -> None:
        params = self._params()
        mlflow_roles.apply_role(self.mlflow_url, self.user("admin"), username, role,
                                params.mlflow.experiment_name, params.registry.model_name)

    def _params(self):
        from visionops.core.config import load_params

        params_file = self.project / "params.yaml"
        return load_params(params_file) if params_file.exists() else load_params()

    def add_person(self, name: str, role: str) -> tuple[str, str]:
        """An MLflow account of their own for a person: (username, password)."""
        if role not in PERSON_ROLES:
            raise StackError(f"unknown role {role!r}; choose from {', '.join(PERSON_ROLES)}")
        if name in (ADMIN, *USERS.values()):
            raise StackError(f"{name!r} is one of the stack's own accounts; choose another name")
        if not self._owns_port("mlflow"):
            raise StackError("MLflow is not running: `visionops stack up` first")
        person = self.people.get(name) or {"password": secrets.token_urlsafe(18)}
        person["role"] = role
        mlflow_roles.create_user(self.mlflow_url, self.user("admin"), name, person["password"])
        self._apply_role(name, role)
        self.people[name] = person
        self.save()
        return name, person["password"]

    def configure_dvc_remote(self) -> None:
        """The project's default DVC remote becomes the stack's bucket, in
        `.dvc/config.local` (git-ignored, 0600): nothing committed changes. It holds no
        keys: DVC takes them from the environment that `client_env` sets."""
        if not (self.project / ".dvc").is_dir():
            return
        config = self.project / ".dvc" / "config.local"
        if not config.exists():
            write_atomic(config, "")
        os.chmod(config, 0o600)
        settings = {"url": f"s3://{BUCKETS['dvc']}/store", "endpointurl": self.s3_endpoint,
                    "region": "us-east-1"}
        dvc = [_bin("dvc")]
        run = dict(cwd=self.project, check=True, capture_output=True)
        subprocess.run([*dvc, "remote", "add", "--local", "--force", DVC_REMOTE,
                        settings.pop("url")], **run)
        for key, value in settings.items():
            subprocess.run([*dvc, "remote", "modify", "--local", DVC_REMOTE, key, "--", value],
                           **run)
        for key in ("access_key_id", "secret_access_key"):  # left by earlier versions
            subprocess.run([*dvc, "remote", "modify", "--local", "--unset", DVC_REMOTE, key],
                           **run)
        subprocess.run([*dvc, "remote", "default", "--local", DVC_REMOTE], **run)
        os.chmod(config, 0o600)

    # -- status and down ---------------------------------------------------------------

    def healthy(self, name: str) -> bool:
        try:
            if name == "s3":
                if not self._owns_port("s3"):
                    return False
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
        """Each part as the stack started it: a PID now held by another process (after a
        reboot, say) is reported as not ours, and the part as down."""
        urls = {"s3": self.ports.get("s3") and self.s3_endpoint,
                "mlflow": self.ports.get("mlflow") and self.mlflow_url,
                "prefect-server": self.ports.get("prefect") and self.prefect_api_url}
        report = {}
        for name in SERVICES:
            running = self._running(name)
            pid = self.pids.get(name)
            report[name] = {"pid": pid if running else None, "running": running,
                            "healthy": running and self.healthy(name), "url": urls.get(name)}
            if pid and not running and processes.alive(pid):
                report[name]["not_ours"] = pid
        return report

    def down(self, only: list[str] | None = None, purge: bool = False, say=print) -> None:
        """Stop the parts (all by default) by PID, last started first. `purge` also
        drops the databases, the stored objects and the DVC remote setting."""
        for name in reversed(SERVICES):
            if only and name not in only:
                continue
            pid, saved = self.pids.pop(name, None), self.identities.pop(name, None)
            if not pid:
                continue
            if saved is None:
                say(f"{name}: pid {pid} has no recorded identity; not signalled")
            elif processes.stop(pid, timeout=3 if name == "s3" else 15,
                                identity=processes.Identity.from_dict(saved)):
                say(f"stopped {name} (pid {pid})")
            else:
                say(f"{name}: pid {pid} is now another process (not the one started); "
                    "not signalled")
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


def has_password(database_url: str) -> bool:
    from sqlalchemy.engine import make_url

    return bool(make_url(database_url).password)


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
