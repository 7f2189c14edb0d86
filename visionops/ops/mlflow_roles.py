"""Who may do what on the team's MLflow server (basic-auth app, MLflow 3.17), set through
its REST API as the admin. Measured against a real server (tests/security/test_mlflow_roles.py):

- writer (the pipeline): creates experiments and registered models, and owns (MANAGE) the
  ones it created: runs, artifacts, model versions, tags, aliases, stages. It creates the
  pipeline's experiment and registered model at `stack up`, so no one else holds the names.
- reviewer: reads experiments, runs, artifacts, registered models and versions; creates
  nothing (403 on experiments, registered models, runs, logged models, model versions) and
  writes nothing (403 on tags, metrics, aliases, stages, permissions).
- promoter: reads as a reviewer, and sets aliases (`champion`) on the pipeline's registered
  model; 403 on creating experiments, registered models and runs, on stages, on version tags
  and descriptions, on deleting versions or the model, and on granting permissions.
  MLflow cannot narrow it further: setting an alias needs EDIT on the registered model, and
  EDIT also lets the promoter create model versions there (from a run it can read, or a copy
  of a version), edit the registered model's description and tags, and rename it. Deleting an
  alias needs MANAGE, which would also let it revoke the writer's own grant: not given.
  Stage transitions are version edits (which hold the versions' class_names and
  input_contract tags), so they are refused with them.

Creation is refused only on a server with workspaces on (SERVER_OPTIONS): without them MLflow
lets every user create, and a DENY that stops creating experiments also stops reading them.
With them, creating needs a workspace grant (USE) that only the writer's role holds, and
with `grant_default_workspace_access = false` (mlflow/basic_auth.ini) a user reads only
what a role grants.
"""

from __future__ import annotations

import requests

SERVER_OPTIONS = ("--enable-workspaces",)  # on `mlflow server --app-name basic-auth`
WORKSPACE = "default"  # the one MLflow serves when a request names none
CREATORS_ROLE = "visionops-creators"  # (workspace, *, USE): the writer's
ROLES = ("writer", "reviewer", "promoter")
TIMEOUT_S = 30

# Grants on the user's own (synthetic) role: (resource type, pattern, permission);
# "{model}" stands for the pipeline's registered model.
READ_ALL = (("experiment", "*", "READ"), ("registered_model", "*", "READ"),
            ("prompt", "*", "READ"))
GRANTS = {
    "reviewer": READ_ALL,
    "promoter": (*READ_ALL, ("registered_model", "{model}", "EDIT"),
                 # version tags, descriptions and stages stay the writer's
                 ("registered_model_version", "*", "READ")),
}


def promotions_experiment(experiment_name: str) -> str:
    """Where `visionops models promote` records each move (visionops.io.registry): the
    one experiment a promoter may create runs in."""
    return f"{experiment_name}-promotions"


class RoleError(RuntimeError):
    """The MLflow server refused or could not do a user or permission change."""


def _call(url: str, auth: tuple[str, str], method: str, path: str, *,
          ok_errors: tuple[str, ...] = (), **kwargs) -> dict:
    """One REST call; {} when it failed with one of `ok_errors` (MLflow error codes)."""
    response = requests.request(method, url.rstrip("/") + path, auth=auth, timeout=TIMEOUT_S,
                                **kwargs)
    if response.ok:
        return response.json() if response.content else {}
    try:
        code = response.json().get("error_code")
    except ValueError:
        code = None
    if code in ok_errors:
        return {}
    raise RoleError(f"MLflow {method} {path} as {auth[0]}: HTTP {response.status_code} "
                    f"{response.text[:300]}")


def create_user(url: str, admin: tuple[str, str], username: str, password: str) -> None:
    """The user, with this password (set again when the user already exists)."""
    created = _call(url, admin, "POST", "/api/2.0/mlflow/users/create",
                    json={"username": username, "password": password},
                    ok_errors=("RESOURCE_ALREADY_EXISTS",))
    if not created:
        _call(url, admin, "PATCH", "/api/2.0/mlflow/users/update-password",
              json={"username": username, "password": password})


def apply_role(url: str, admin: tuple[str, str], username: str, role: str,
               experiment_name: str, model_name: str) -> None:
    """Give `username` exactly what `role` may do. A reviewer's or promoter's other grants
    (an earlier role, or what a user owns from creating it) are revoked; a writer keeps
    what it owns and gets MANAGE on the pipeline's experiment and model if they exist."""
    if role not in ROLES:
        raise RoleError(f"unknown role {role!r}; choose from {', '.join(ROLES)}")
    info = _call(url, admin, "GET", "/api/3.0/mlflow/server-info")
    if not info.get("workspaces_enabled"):
        raise RoleError(f"the MLflow server at {url} runs without workspaces, so it lets every "
                        f"user create experiments and models: start it with {SERVER_OPTIONS}")
    creators = _creators_role(url, admin)
    if role == "writer":
        _call(url, admin, "POST", "/api/3.0/mlflow/roles/assign",
              json={"username": username, "role_id": creators},
              ok_errors=("RESOURCE_ALREADY_EXISTS",))
        for kind, resource_id in _existing(url, admin, experiment_name, model_name):
            held = _call(url, admin, "GET", "/api/3.0/mlflow/users/permissions/get",
                         params={"username": username, "resource_type": kind,
                                 "resource_id": resource_id})
            if held.get("permission") != "MANAGE":
                _call(url, admin, "POST", "/api/3.0/mlflow/users/permissions/revoke",
                      json={"username": username, "resource_type": kind,
                            "resource_id": resource_id}, ok_errors=("RESOURCE_DOES_NOT_EXIST",))
                _grant(url, admin, username, (kind, resource_id, "MANAGE"))
        return
    if creators in {held["id"] for held in _call(
            url, admin, "GET", "/api/3.0/mlflow/users/roles/list",
            params={"username": username})["roles"]}:
        _call(url, admin, "DELETE", "/api/3.0/mlflow/roles/unassign",
              json={"username": username, "role_id": creators})
    wanted = {(kind, pattern.format(model=model_name), permission)
              for kind, pattern, permission in GRANTS[role]}
    held = {(row["resource_type"], row["resource_pattern"], row["permission"])
            for row in _call(url, admin, "GET", "/api/3.0/mlflow/users/permissions/list",
                             params={"username": username})["permissions"]
            if row["role_name"].startswith("__user_") and row["workspace"] == WORKSPACE}
    if role == "promoter":  # records each move there (visionops.io.registry)
        history = _call(url, admin, "GET", "/api/2.0/mlflow/experiments/get-by-name",
                        params={"experiment_name": promotions_experiment(experiment_name)},
                        ok_errors=("RESOURCE_DOES_NOT_EXIST",))
        if history:
            wanted.add(("experiment", history["experiment"]["experiment_id"], "EDIT"))
    for kind, pattern, _ in held - wanted:
        _call(url, admin, "POST", "/api/3.0/mlflow/users/permissions/revoke",
              json={"username": username, "resource_type": kind, "resource_id": pattern})
    for grant in wanted - held:
        _grant(url, admin, username, grant)


def create_writer_resources(url: str, writer_auth: tuple[str, str], experiment_name: str,
                            model_name: str) -> None:
    """The pipeline's experiment, its promotion history's, its scoring runs' and its
    registered model, created by the writer (so it owns them) unless they exist. (A
    missing registered model reads as 403, not 404, to anyone but the admin, so the
    writer does not look first.)"""
    for name in (experiment_name, promotions_experiment(experiment_name),
                 f"{experiment_name}-scoring"):  # `visionops score` (visionops.jobs.scoring)
        _call(url, writer_auth, "POST", "/api/2.0/mlflow/experiments/create",
              json={"name": name}, ok_errors=("RESOURCE_ALREADY_EXISTS",))
    _call(url, writer_auth, "POST", "/api/2.0/mlflow/registered-models/create",
          json={"name": model_name}, ok_errors=("RESOURCE_ALREADY_EXISTS",))


def _grant(url: str, admin: tuple[str, str], username: str,
           grant: tuple[str, str, str]) -> None:
    kind, resource_id, permission = grant
    _call(url, admin, "POST", "/api/3.0/mlflow/users/permissions/grant",
          json={"username": username, "resource_type": kind, "resource_id": resource_id,
                "permission": permission}, ok_errors=("RESOURCE_ALREADY_EXISTS",))


def _creators_role(url: str, admin: tuple[str, str]) -> int:
    """The id of the role that may create in the workspace, made if missing."""
    roles = _call(url, admin, "GET", "/api/3.0/mlflow/roles/list",
                  params={"workspace": WORKSPACE})["roles"]
    role = next((role for role in roles if role["name"] == CREATORS_ROLE), None)
    if role is None:
        role = _call(url, admin, "POST", "/api/3.0/mlflow/roles/create",
                     json={"workspace": WORKSPACE, "name": CREATORS_ROLE,
                           "description": "creates experiments and registered models"})["role"]
    if not any(held["resource_type"] == "workspace" and held["permission"] == "USE"
               for held in role.get("permissions", [])):
        _call(url, admin, "POST", "/api/3.0/mlflow/roles/permissions/add",
              json={"role_id": role["id"], "resource_type": "workspace",
                    "resource_pattern": "*", "permission": "USE"},
              ok_errors=("RESOURCE_ALREADY_EXISTS",))
    return role["id"]


def _existing(url: str, admin: tuple[str, str], experiment_name: str,
              model_name: str) -> list[tuple[str, str]]:
    """(resource type, id) of the pipeline's experiment and model, those that exist."""
    found = []
    experiment = _call(url, admin, "GET", "/api/2.0/mlflow/experiments/get-by-name",
                       params={"experiment_name": experiment_name},
                       ok_errors=("RESOURCE_DOES_NOT_EXIST",))
    if experiment:
        found.append(("experiment", experiment["experiment"]["experiment_id"]))
    if _call(url, admin, "GET", "/api/2.0/mlflow/registered-models/get",
             params={"name": model_name}, ok_errors=("RESOURCE_DOES_NOT_EXIST",)):
        found.append(("registered_model", model_name))
    return found
