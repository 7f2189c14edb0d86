"""MLflow roles (visionops/ops/mlflow_roles.py) against a real `mlflow server --app-name
basic-auth`, started as the stack starts it (mlflow/basic_auth.ini, mlflow_roles.SERVER_OPTIONS)
on SQLite: the writer owns the pipeline's experiment and model, a reviewer reads and can
neither create nor write, a promoter moves the champion alias and nothing the pipeline needs.
The security read's attack: a reviewer taking the model's name first blocked the writer."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from mlflow import MlflowClient

from visionops.core.config import load_params
from visionops.ops import mlflow_roles, processes
from visionops.ops.objectstore import free_port
from visionops.ops.stack import AUTH_CONFIG_TEMPLATE

ADMIN = ("admin", "admin-password-for-tests")
PASSWORDS = {"writer": "writer-password-123", "reviewer": "reviewer-password-123",
             "promoter": "promoter-password-123"}
USERS = {role: (f"test-{role}", password) for role, password in PASSWORDS.items()}
PARAMS = load_params()
EXPERIMENT, MODEL = PARAMS.mlflow.experiment_name, PARAMS.registry.model_name
FORBIDDEN = 403


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A basic-auth MLflow server of its own: SQLite stores, local artifacts."""
    folder = tmp_path_factory.mktemp("mlflow-roles")
    (folder / "basic_auth.ini").write_text(AUTH_CONFIG_TEMPLATE.read_text())  # sqlite, cwd
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--app-name",
               "basic-auth", *mlflow_roles.SERVER_OPTIONS,
               "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
               "--artifacts-destination", str(folder / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MLFLOW_", "AWS_"))}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(folder / "basic_auth.ini"),
               MLFLOW_FLASK_SERVER_SECRET_KEY="flask-secret-for-tests",
               MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN[1],
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # GenAI jobs: 8 processes
    log = folder / "server.log"
    pid = processes.start(command, log, env=env, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not _answers(url):
            assert processes.alive(pid) and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        yield url
    finally:
        processes.stop(pid, timeout=1)


def _answers(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=5).ok
    except requests.RequestException:  # refused, or still starting: too slow to answer
        return False


@pytest.fixture(scope="module")
def stack(server):
    """What `stack up` does (users, roles, the writer's resources), then one training run
    of the writer's through MLflow's own client: a version 1, champion."""
    for role, (username, password) in USERS.items():
        mlflow_roles.create_user(server, ADMIN, username, password)
        mlflow_roles.apply_role(server, ADMIN, username, role, EXPERIMENT, MODEL)
    mlflow_roles.create_writer_resources(server, USERS["writer"], EXPERIMENT, MODEL)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_USERNAME", USERS["writer"][0])
        env.setenv("MLFLOW_TRACKING_PASSWORD", USERS["writer"][1])
        client = MlflowClient(server)
        experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
        run = client.create_run(experiment_id)
        client.log_metric(run.info.run_id, "accuracy", 0.9)
        client.log_text(run.info.run_id, "weights", "model/weights.txt")
        version = client.create_model_version(MODEL, f"{run.info.artifact_uri}/model",
                                              run_id=run.info.run_id)
        client.set_registered_model_alias(MODEL, "champion", version.version)
    return SimpleNamespace(url=server, experiment_id=experiment_id, run=run.info,
                           version=version.version)


def rest(stack, role_or_auth, method: str, path: str, **body) -> requests.Response:
    auth = USERS[role_or_auth] if isinstance(role_or_auth, str) else role_or_auth
    send = {"params": body} if method == "GET" else {"json": body}
    return requests.request(method, stack.url + path, auth=auth, timeout=30, **send)


def status(stack, role, method, path, **body) -> int:
    return rest(stack, role, method, path, **body).status_code


def artifact_path(stack, name: str) -> str:
    root = stack.run.artifact_uri.removeprefix("mlflow-artifacts:/")
    return f"/api/2.0/mlflow-artifacts/artifacts/{root}/{name}"


# Every creation and write a reviewer could try; the promoter's refusals are a subset.
CREATIONS = {
    "create experiment": ("POST", "/api/2.0/mlflow/experiments/create",
                          lambda s: {"name": "squatted-experiment"}),
    "create registered model": ("POST", "/api/2.0/mlflow/registered-models/create",
                                lambda s: {"name": "squatted-model"}),
    "create run": ("POST", "/api/2.0/mlflow/runs/create",
                   lambda s: {"experiment_id": s.experiment_id}),
    "create logged model": ("POST", "/api/2.0/mlflow/logged-models",
                            lambda s: {"experiment_id": s.experiment_id, "name": "m"}),
}
WRITES = {
    "create model version": ("POST", "/api/2.0/mlflow/model-versions/create",
                             lambda s: {"name": MODEL, "run_id": s.run.run_id,
                                        "source": f"{s.run.artifact_uri}/model"}),
    "log metric": ("POST", "/api/2.0/mlflow/runs/log-metric",
                   lambda s: {"run_id": s.run.run_id, "key": "accuracy", "value": 1.0,
                              "timestamp": 0}),
    "set experiment tag": ("POST", "/api/2.0/mlflow/experiments/set-experiment-tag",
                           lambda s: {"experiment_id": s.experiment_id, "key": "k",
                                      "value": "v"}),
    "set model version tag": ("POST", "/api/2.0/mlflow/model-versions/set-tag",
                              lambda s: {"name": MODEL, "version": s.version,
                                         "key": "class_names", "value": "[]"}),
    "transition stage": ("POST", "/api/2.0/mlflow/model-versions/transition-stage",
                         lambda s: {"name": MODEL, "version": s.version, "stage": "Production",
                                    "archive_existing_versions": False}),
    "delete model version": ("DELETE", "/api/2.0/mlflow/model-versions/delete",
                             lambda s: {"name": MODEL, "version": s.version}),
    "delete registered model": ("DELETE", "/api/2.0/mlflow/registered-models/delete",
                                lambda s: {"name": MODEL}),
    "grant a permission": ("POST", "/api/3.0/mlflow/users/permissions/grant",
                           lambda s: {"username": USERS["reviewer"][0],
                                      "resource_type": "registered_model",
                                      "resource_id": MODEL, "permission": "EDIT"}),
}
REVIEWER_ONLY = {
    "set champion": ("POST", "/api/2.0/mlflow/registered-models/alias",
                     lambda s: {"name": MODEL, "alias": "champion", "version": s.version}),
    "delete champion": ("DELETE", "/api/2.0/mlflow/registered-models/alias",
                        lambda s: {"name": MODEL, "alias": "champion"}),
    "set registered model tag": ("POST", "/api/2.0/mlflow/registered-models/set-tag",
                                 lambda s: {"name": MODEL, "key": "k", "value": "v"}),
    "rename registered model": ("POST", "/api/2.0/mlflow/registered-models/rename",
                                lambda s: {"name": MODEL, "new_name": "renamed"}),
}


def test_reviewer_reads_everything(stack):
    reads = {
        "/api/2.0/mlflow/experiments/get": {"experiment_id": stack.experiment_id},
        "/api/2.0/mlflow/runs/get": {"run_id": stack.run.run_id},
        "/api/2.0/mlflow/registered-models/get": {"name": MODEL},
        "/api/2.0/mlflow/model-versions/get": {"name": MODEL, "version": stack.version},
        "/api/2.0/mlflow/registered-models/alias": {"name": MODEL, "alias": "champion"},
        artifact_path(stack, "model/weights.txt"): {},
    }
    for path, query in reads.items():
        assert status(stack, "reviewer", "GET", path, **query) == 200, path
    found = rest(stack, "reviewer", "POST", "/api/2.0/mlflow/experiments/search",
                 max_results=100).json()["experiments"]
    assert EXPERIMENT in {experiment["name"] for experiment in found}
    models = rest(stack, "reviewer", "GET", "/api/2.0/mlflow/registered-models/search").json()
    assert MODEL in {model["name"] for model in models["registered_models"]}


@pytest.mark.parametrize("action", [*CREATIONS, *WRITES, *REVIEWER_ONLY, "upload artifact"])
def test_reviewer_creates_and_writes_nothing(stack, action):
    if action == "upload artifact":
        response = requests.put(stack.url + artifact_path(stack, "forged.txt"), data=b"x",
                                auth=USERS["reviewer"], timeout=30)
    else:
        method, path, body = {**CREATIONS, **WRITES, **REVIEWER_ONLY}[action]
        response = rest(stack, "reviewer", method, path, **body(stack))
    assert response.status_code == FORBIDDEN, response.text


def test_writer_creates_runs_versions_and_aliases_in_its_model(stack):
    experiment = stack.experiment_id
    run = rest(stack, "writer", "POST", "/api/2.0/mlflow/runs/create", experiment_id=experiment)
    assert run.ok, run.text
    run_info = run.json()["run"]["info"]
    version = rest(stack, "writer", "POST", "/api/2.0/mlflow/model-versions/create", name=MODEL,
                   run_id=run_info["run_id"], source=f"{run_info['artifact_uri']}/model")
    assert version.ok, version.text
    number = version.json()["model_version"]["version"]
    assert status(stack, "writer", "POST", "/api/2.0/mlflow/registered-models/alias",
                  name=MODEL, alias="challenger", version=number) == 200
    assert status(stack, "writer", "DELETE", "/api/2.0/mlflow/registered-models/alias",
                  name=MODEL, alias="challenger") == 200


def test_promoter_moves_champion(stack):
    move = {"name": MODEL, "alias": "champion", "version": stack.version}
    assert status(stack, "promoter", "POST", "/api/2.0/mlflow/registered-models/alias",
                  **move) == 200
    champion = rest(stack, "promoter", "GET", "/api/2.0/mlflow/registered-models/alias",
                    name=MODEL, alias="champion")
    assert champion.json()["model_version"]["version"] == stack.version
    # deleting an alias takes MANAGE, which would also let the promoter revoke the writer's
    # grants; moving the alias (a set) is all a promotion or rollback does
    assert status(stack, "promoter", "DELETE", "/api/2.0/mlflow/registered-models/alias",
                  name=MODEL, alias="champion") == FORBIDDEN


PROMOTER_REFUSED = [*CREATIONS, *(action for action in WRITES if action != "create model version")]


@pytest.mark.parametrize("action", PROMOTER_REFUSED)
def test_promoter_creates_and_writes_nothing_else(stack, action):
    method, path, body = {**CREATIONS, **WRITES}[action]
    response = rest(stack, "promoter", method, path, **body(stack))
    assert response.status_code == FORBIDDEN, response.text


def test_promoter_leftovers_are_what_mlflow_ties_to_aliases(stack):
    """Measured, not wished: EDIT on the model, which setting an alias needs, also lets the
    promoter create versions and edit and rename the registered model. If this fails, MLflow
    changed: tighten the promoter's role (mlflow_roles.GRANTS) and this test."""
    method, path, body = WRITES["create model version"]
    assert rest(stack, "promoter", method, path, **body(stack)).status_code == 200
    assert status(stack, "promoter", "POST", "/api/2.0/mlflow/registered-models/set-tag",
                  name=MODEL, key="k", value="v") == 200
    renamed = f"{MODEL}-renamed"
    assert status(stack, "promoter", "POST", "/api/2.0/mlflow/registered-models/rename",
                  name=MODEL, new_name=renamed) == 200
    restored = rest(stack, ADMIN, "POST", "/api/2.0/mlflow/registered-models/rename",
                    name=renamed, new_name=MODEL)
    assert restored.ok, restored.text


def test_reviewer_taking_the_model_name_first_does_not_block_the_writer(stack):
    """The security read's attack, on the pipeline's name and on a name no one holds yet."""
    for name in (MODEL, "visionops-next"):
        assert status(stack, "reviewer", "POST", "/api/2.0/mlflow/registered-models/create",
                      name=name) == FORBIDDEN
        assert status(stack, "reviewer", "POST", "/api/2.0/mlflow/experiments/create",
                      name=name) == FORBIDDEN
    mlflow_roles.create_writer_resources(stack.url, USERS["writer"], "visionops-next",
                                         "visionops-next")
    for name in (MODEL, "visionops-next"):
        owner = rest(stack, ADMIN, "GET", "/api/3.0/mlflow/users/permissions/get",
                     username=USERS["writer"][0], resource_type="registered_model",
                     resource_id=name).json()
        assert owner["permission"] == "MANAGE", name
    method, path, body = WRITES["create model version"]
    assert rest(stack, "writer", method, path, **{**body(stack), "name": "visionops-next"}).ok


def test_changing_a_role_takes_back_the_old_one(stack):
    """`stack user add NAME --role reviewer` on a promoter; and a grant left from before
    (a user owning a model it created when creating was open) is revoked too."""
    pat = ("pat", "pat-password-1234")
    mlflow_roles.create_user(stack.url, ADMIN, *pat)
    mlflow_roles.create_user(stack.url, ADMIN, *pat)  # again: already there is fine
    mlflow_roles.apply_role(stack.url, ADMIN, pat[0], "promoter", EXPERIMENT, MODEL)
    move = {"name": MODEL, "alias": "champion", "version": stack.version}
    alias_path = "/api/2.0/mlflow/registered-models/alias"
    assert status(stack, pat, "POST", alias_path, **move) == 200
    assert status(stack, ADMIN, "POST", "/api/3.0/mlflow/users/permissions/grant",
                  username=pat[0], resource_type="experiment",
                  resource_id=stack.experiment_id, permission="MANAGE") == 200
    mlflow_roles.apply_role(stack.url, ADMIN, pat[0], "reviewer", EXPERIMENT, MODEL)
    assert status(stack, pat, "POST", alias_path, **move) == FORBIDDEN
    assert status(stack, pat, "POST", "/api/2.0/mlflow/runs/create",
                  experiment_id=stack.experiment_id) == FORBIDDEN
    assert status(stack, pat, "GET", "/api/2.0/mlflow/registered-models/get", name=MODEL) == 200


def test_stack_up_again_keeps_the_writer_owner_and_the_others_out(stack):
    """A second `stack up` on the same server: the same calls, nothing fails or widens;
    a writer that lost its grant on the pipeline's model (a promoter with MANAGE could have
    revoked it) gets it back."""
    revoked = rest(stack, ADMIN, "POST", "/api/3.0/mlflow/users/permissions/revoke",
                   username=USERS["writer"][0], resource_type="registered_model",
                   resource_id=MODEL)
    assert revoked.ok, revoked.text
    for role, (username, password) in USERS.items():
        mlflow_roles.create_user(stack.url, ADMIN, username, password)
        mlflow_roles.apply_role(stack.url, ADMIN, username, role, EXPERIMENT, MODEL)
    mlflow_roles.create_writer_resources(stack.url, USERS["writer"], EXPERIMENT, MODEL)
    method, path, body = WRITES["create model version"]
    assert rest(stack, "writer", method, path, **body(stack)).ok
    assert rest(stack, "reviewer", method, path, **body(stack)).status_code == FORBIDDEN
    assert status(stack, "promoter", "POST", "/api/2.0/mlflow/registered-models/alias",
                  name=MODEL, alias="champion", version=stack.version) == 200


def test_a_user_without_a_role_reads_nothing(stack):
    nobody = ("nobody", "nobody-password-123")
    mlflow_roles.create_user(stack.url, ADMIN, *nobody)
    assert status(stack, nobody, "GET", "/api/2.0/mlflow/experiments/get",
                  experiment_id=stack.experiment_id) == FORBIDDEN
    assert status(stack, nobody, "POST", "/api/2.0/mlflow/experiments/create",
                  name="nobody's") == FORBIDDEN
