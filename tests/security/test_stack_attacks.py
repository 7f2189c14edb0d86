"""The security read's attacks on the team stack, each tried against the real servers that
`visionops stack up` starts (PostgreSQL, SeaweedFS, MLflow with basic auth, the Prefect
server and worker); each test asserts the attack fails. README, "Security", maps them."""

from __future__ import annotations

import http.server
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
import requests
from botocore.exceptions import ClientError
from projects import make_project, visionops

from visionops.ops import processes
from visionops.ops.objectstore import free_port
from visionops.ops.stack import BUCKETS, SERVICES, Stack

WEED = Path(sys.executable).with_name("weed")


# -- 1. Prefect: code execution through an open API ---------------------------------------

def test_prefect_api_refuses_callers_without_the_auth_string(team_stack):
    api = team_stack.prefect_api_url
    # A valid CSRF token, so that only the missing or wrong auth string can refuse.
    csrf = dict(team_stack.prefect_session().headers)
    deployment = {"name": "evil", "flow_id": "00000000-0000-0000-0000-000000000000"}
    for auth in (None, ("visionops", "not-the-string")):
        caller = requests.Session()
        caller.auth, caller.headers = auth, csrf
        assert caller.post(f"{api}/deployments/", json=deployment).status_code == 401
        assert caller.post(f"{api}/flow_runs/filter", json={}).status_code == 401
        assert caller.get(f"{api}/admin/settings").status_code == 401
    assert requests.get(f"{api}/health", timeout=30).ok  # probes need no secret


def test_prefect_api_refuses_writes_without_a_csrf_token(team_stack):
    api, auth = team_stack.prefect_api_url, tuple(team_stack.prefect_auth_string.split(":", 1))
    pool = {"name": f"evil-{os.getpid()}", "type": "process"}
    refused = requests.post(f"{api}/work_pools/", json=pool, auth=auth, timeout=30)
    assert refused.status_code == 403 and "CSRF" in refused.text
    # the same call as Prefect's own client makes it, token first, passes
    session = team_stack.prefect_session()
    assert session.post(f"{api}/work_pools/", json=pool).status_code == 201
    assert session.delete(f"{api}/work_pools/{pool['name']}").status_code == 204


def test_prefect_api_answers_no_other_origin(team_stack):
    api = team_stack.prefect_api_url
    preflight = {"Access-Control-Request-Method": "POST"}
    evil = requests.options(f"{api}/deployments/", timeout=30,
                            headers={**preflight, "Origin": "https://evil.example"})
    assert evil.headers.get("access-control-allow-origin") not in ("*", "https://evil.example")
    own = requests.options(f"{api}/deployments/", timeout=30,
                           headers={**preflight, "Origin": team_stack.prefect_ui_origin})
    assert own.headers.get("access-control-allow-origin") == team_stack.prefect_ui_origin


# -- 2. The object store: no object without credentials, on any port ----------------------

@pytest.fixture
def stored_object(team_stack):
    s3 = team_stack.object_store("mlflow-server").client()
    key = f"attack/{os.getpid()}-{time.monotonic_ns()}"
    s3.put_object(Bucket=BUCKETS["mlflow"], Key=key, Body=b"the real model")
    yield s3, key
    s3.delete_object(Bucket=BUCKETS["mlflow"], Key=key)


def test_store_http_ports_refuse_reads_and_writes_without_its_keys(team_stack, stored_object):
    s3, key = stored_object
    filer = f"http://127.0.0.1:{team_stack.weed_ports['filer.port']}"
    volume = f"http://127.0.0.1:{team_stack.weed_ports['volume.port']}"
    path = f"{filer}/buckets/{BUCKETS['mlflow']}/{key}"
    assert requests.put(path, data=b"a swapped model", timeout=30).status_code == 401
    assert requests.post(path, files={"file": ("x", b"a swapped model")},
                         timeout=30).status_code == 401
    assert requests.get(path, timeout=30).status_code == 401
    assert requests.get(f"{filer}/buckets/", timeout=30).status_code == 401
    # a file id handed out by the master does not open the volume server either
    master = f"http://127.0.0.1:{team_stack.weed_ports['master.port']}"
    fid = requests.get(f"{master}/dir/assign", timeout=30).json()["fid"]
    assert requests.post(f"{volume}/{fid}", files={"file": ("x", b"junk")},
                         timeout=30).status_code == 401
    assert s3.get_object(Bucket=BUCKETS["mlflow"], Key=key)["Body"].read() == b"the real model"


def _weed_shell(stack: Stack, commands: str, cwd: Path) -> str:
    """`weed shell` against the store's master and filer gRPC ports, run in `cwd` (where
    it looks for a security.toml); what it printed, or the end of it when it hung on."""
    ports = stack.weed_ports
    try:
        done = subprocess.run(
            [str(WEED), "shell", f"-master=127.0.0.1:{ports['master.port']}",
             f"-filer=127.0.0.1:{ports['filer.port']}"],
            input=commands, cwd=cwd, capture_output=True, text=True, timeout=20)
        return done.stdout + done.stderr
    except subprocess.TimeoutExpired as hung:
        return f"{hung.stdout or ''}{hung.stderr or ''}(timed out)"


def test_store_grpc_ports_refuse_a_client_without_its_certificate(team_stack, stored_object,
                                                                 tmp_path):
    """Without the store's mutual TLS, this very shell listed and deleted the object
    (measured on SeaweedFS 4.48 with JWT keys alone: the HTTP ports were shut, gRPC not)."""
    s3, key = stored_object
    folder = f"/buckets/{BUCKETS['mlflow']}/{key.rsplit('/', 1)[0]}"
    attack = _weed_shell(team_stack, f"fs.ls {folder}\nfs.rm /buckets/{BUCKETS['mlflow']}/{key}\n",
                         tmp_path)  # no security.toml here
    assert key.rsplit("/", 1)[1] not in attack
    assert s3.get_object(Bucket=BUCKETS["mlflow"], Key=key)["Body"].read() == b"the real model"


def test_clients_get_narrower_s3_keys_than_the_admin(team_stack):
    pipeline = team_stack.client_env()
    person = team_stack.person_env()
    admin_key = team_stack.secrets["s3_access_key"]
    assert admin_key not in (pipeline["AWS_ACCESS_KEY_ID"], person["AWS_ACCESS_KEY_ID"])

    def client(env):
        return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    writer, reviewer = client(pipeline), client(person)
    writer.put_object(Bucket=BUCKETS["landing"], Key="attack/ok.txt", Body=b"ok")
    assert reviewer.get_object(Bucket=BUCKETS["landing"],
                               Key="attack/ok.txt")["Body"].read() == b"ok"
    denied = [
        lambda: reviewer.put_object(Bucket=BUCKETS["landing"], Key="attack/x", Body=b"x"),
        lambda: reviewer.delete_object(Bucket=BUCKETS["landing"], Key="attack/ok.txt"),
        lambda: writer.create_bucket(Bucket="attack-bucket"),
        lambda: writer.put_object(Bucket=BUCKETS["mlflow"], Key="artifacts/x", Body=b"x"),
    ]
    for attempt in denied:
        with pytest.raises(ClientError) as refused:
            attempt()
        assert refused.value.response["Error"]["Code"] == "AccessDenied"
    writer.delete_object(Bucket=BUCKETS["landing"], Key="attack/ok.txt")


# -- 4. Secrets on disk and on command lines ------------------------------------------------

def test_stack_secrets_are_readable_by_their_owner_only(team_stack):
    state = team_stack.state_dir
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    secret_files = [state / "state.json", state / "stack.env", state / "s3" / "s3.json",
                    state / "s3" / "security" / "security.toml",
                    state / "s3" / "security" / "store.key",
                    state / "mlflow" / "basic_auth.ini",
                    *(state / "logs").iterdir()]
    modes = {str(path.relative_to(state)): oct(stat.S_IMODE(path.stat().st_mode))
             for path in secret_files}
    assert set(modes.values()) == {"0o600"}, modes
    local = team_stack.project / ".dvc" / "config.local"
    assert stat.S_IMODE(local.stat().st_mode) == 0o600
    assert not any(value in local.read_text() for value in team_stack.secrets.values())


def test_no_secret_is_on_any_command_line(team_stack):
    secret_values = [*team_stack.secrets.values(), "postgresql://"]
    for name in SERVICES:
        for pid in processes.group_members(team_stack.pids[name]):
            try:
                command = " ".join(processes.psutil.Process(pid).cmdline())
            except processes.psutil.NoSuchProcess:
                continue
            leaked = [value for value in secret_values if value in command]
            assert not leaked, f"{name} (pid {pid}) shows {leaked} in `ps`: {command}"


# -- 5. Roles: the reviewer cannot take the pipeline's names; people get their own account --

def _mlflow(stack: Stack, path: str, auth, body: dict | None = None) -> requests.Response:
    if body is None:
        return requests.get(stack.mlflow_url + path, auth=auth, timeout=30)
    return requests.post(stack.mlflow_url + path, json=body, auth=auth, timeout=30)


def test_the_writer_owns_the_experiment_and_model_and_the_reviewer_creates_nothing(
        team_stack):
    reviewer = team_stack.user("reviewer")
    experiment = _mlflow(team_stack, "/api/2.0/mlflow/experiments/get-by-name"
                                     "?experiment_name=tiny", reviewer)
    assert experiment.ok, experiment.text  # made by `stack up`, before any run
    model = _mlflow(team_stack, "/api/2.0/mlflow/registered-models/get?name=tiny-digits",
                    reviewer)
    assert model.ok, model.text
    attempts = {
        "experiment": ("/api/2.0/mlflow/experiments/create", {"name": "taken-by-reviewer"}),
        "registered model": ("/api/2.0/mlflow/registered-models/create",
                             {"name": "taken-by-reviewer"}),
        "run": ("/api/2.0/mlflow/runs/create",
                {"experiment_id": experiment.json()["experiment"]["experiment_id"]}),
        "model tag": ("/api/2.0/mlflow/registered-models/set-tag",
                      {"name": "tiny-digits", "key": "k", "value": "v"}),
    }
    answers = {what: _mlflow(team_stack, path, reviewer, body).status_code
               for what, (path, body) in attempts.items()}
    assert answers == dict.fromkeys(attempts, 403), answers


def test_each_person_gets_an_account_of_their_own_and_never_the_writers(team_stack):
    project = str(team_stack.project)
    added = visionops("stack", "user", "add", "ana", "--role", "promoter", "--project", project)
    assert added.returncode == 0, added.stdout + added.stderr
    env = visionops("stack", "env", "--user", "ana", "--project", project)
    default = visionops("stack", "env", "--project", project)
    writer_password = team_stack.user("writer")[1]
    for shell in (env, default):
        assert shell.returncode == 0, shell.stderr
        assert writer_password not in shell.stdout
        assert team_stack.secrets["prefect_auth"] not in shell.stdout
    assert "MLFLOW_TRACKING_USERNAME=ana" in env.stdout
    password = Stack.load(team_stack.project).people["ana"]["password"]
    ana = ("ana", password)
    experiment = _mlflow(team_stack, "/api/2.0/mlflow/experiments/get-by-name"
                                     "?experiment_name=tiny", ana).json()["experiment"]
    assert _mlflow(team_stack, "/api/2.0/mlflow/runs/create",
                   ana, {"experiment_id": experiment["experiment_id"]}).status_code == 403
    assert _mlflow(team_stack, "/api/2.0/mlflow/registered-models/create",
                   ana, {"name": "ana-model"}).status_code == 403


# -- 6. Credentials go only to the server the stack started --------------------------------

class _Squatter(http.server.BaseHTTPRequestHandler):
    """Answers every request on a port the stack wants, and keeps what it was sent."""
    seen_authorization: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        self._answer()

    def do_POST(self):  # noqa: N802
        self._answer()

    def _answer(self):
        if self.headers.get("Authorization"):
            self.seen_authorization.append(self.headers["Authorization"])
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_a_process_squatting_mlflows_port_is_sent_no_password(tmp_path):
    port = free_port()
    squatter = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Squatter)
    threading.Thread(target=squatter.serve_forever, daemon=True).start()
    project = make_project(tmp_path / "project", labels=range(2), per_class=2)
    try:
        up = visionops("stack", "up", "--project", str(project), "--s3-port", "0",
                       "--mlflow-port", str(port), "--prefect-port", "0",
                       "--db-prefix", f"visionops_sq{os.getpid()}", timeout=300)
        assert up.returncode != 0
        assert f"127.0.0.1:{port}" in up.stdout + up.stderr
        assert _Squatter.seen_authorization == []
    finally:
        squatter.shutdown()
        down = visionops("stack", "down", "--project", str(project), "--purge")
        assert down.returncode == 0, down.stdout + down.stderr


# -- 7. Stopping by PID never signals another process ---------------------------------------

def test_status_and_down_leave_a_process_that_took_over_a_recorded_pid(tmp_path):
    started = processes.start(["sleep", "300"], tmp_path / "started.log")
    recorded = processes.Identity.of(started).to_dict()
    processes.stop(started, timeout=3)
    stranger = subprocess.Popen(["sleep", "301"], start_new_session=True)
    try:
        # As after a reboot: the state names the stranger's PID with the worker's identity.
        state = tmp_path / "state"
        Stack(project=tmp_path, state_dir=state, pids={"prefect-worker": stranger.pid},
              identities={"prefect-worker": recorded}).save()
        status = visionops("stack", "status", "--project", str(tmp_path), "--state-dir",
                           str(state), "--json")
        worker = json.loads(status.stdout)["prefect-worker"]
        assert worker["running"] is False and worker["not_ours"] == stranger.pid
        down = visionops("stack", "down", "--project", str(tmp_path), "--state-dir", str(state))
        assert down.returncode == 0 and "not signalled" in down.stdout, down.stdout
        assert stranger.poll() is None  # still running: never signalled
    finally:
        stranger.kill()
        stranger.wait()


def test_state_from_an_earlier_version_is_stopped_never_run_unsecured(tmp_path):
    """state.json of a visionops that recorded PIDs only: a PID still running that part's
    command is stopped by `down`; another process holding a recorded PID is left alone;
    `up` refuses to keep servers that lack today's settings."""
    earlier_worker = processes.start(
        [sys.executable, "-c", "import time; time.sleep(300)", "prefect", "worker",
         "visionops"], tmp_path / "worker.log")
    stranger = subprocess.Popen(["sleep", "302"], start_new_session=True)
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_text(json.dumps({
        "ports": {"s3": 1, "mlflow": 2, "prefect": 3},
        "pids": {"prefect-worker": earlier_worker, "mlflow": stranger.pid}}))
    try:
        where = ["--project", str(tmp_path), "--state-dir", str(state)]
        up = visionops("stack", "up", *where)
        assert up.returncode == 1 and "earlier visionops" in up.stdout + up.stderr
        assert "prefect-worker" in up.stdout + up.stderr
        down = visionops("stack", "down", *where)
        assert down.returncode == 0, down.stdout + down.stderr
        assert not processes.alive(earlier_worker)
        assert stranger.poll() is None
    finally:
        processes.stop(earlier_worker, timeout=3)
        stranger.kill()
        stranger.wait()


def test_a_promoter_promotes_with_the_project_command_and_writes_nothing_else(team_stack):
    project = team_stack.project
    visionops("stack", "user", "add", "pia", "--role", "promoter", "--project", str(project))
    writer = team_stack.user("writer")
    experiment = _mlflow(team_stack, "/api/2.0/mlflow/experiments/get-by-name"
                                     "?experiment_name=tiny", writer).json()["experiment"]
    run = _mlflow(team_stack, "/api/2.0/mlflow/runs/create", writer,
                  {"experiment_id": experiment["experiment_id"]}).json()["run"]["info"]
    version = _mlflow(team_stack, "/api/2.0/mlflow/model-versions/create", writer, {
        "name": "tiny-digits", "run_id": run["run_id"],
        "source": f"{run['artifact_uri']}/model"}).json()["model_version"]["version"]
    shell = visionops("stack", "env", "--user", "pia", "--project", str(project)).stdout
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    env.update(line.removeprefix("export ").split("=", 1) for line in shell.splitlines())
    env = {key: value.strip("'") for key, value in env.items()}
    promoted = visionops("models", "promote", version, "--reason", "security test",
                         "--params", str(project / "params.yaml"), env=env)
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    champion = _mlflow(team_stack, "/api/2.0/mlflow/registered-models/alias"
                                   "?name=tiny-digits&alias=champion", writer).json()
    assert champion["model_version"]["version"] == version
    refused = visionops("models", "promote", version, "--reason", "again",
                        "--params", str(project / "params.yaml"),
                        env={**env, "MLFLOW_TRACKING_PASSWORD": "wrong"})
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
