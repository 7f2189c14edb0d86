"""The `visionops` command."""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from visionops.core.config import DEFAULT_PARAMS, ConfigError, load_params

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Keep an image-recognition model fresh: validate, retrain, gate, promote.")

ParamsFile = Annotated[Path, typer.Option("--params", help="The params.yaml to use.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]
DataFolder = Annotated[Path, typer.Argument(help="Image folder <label>/<image>.")]


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _load(params_file: Path):
    try:
        return load_params(params_file)
    except ConfigError as exc:
        _fail(str(exc), code=2)


def _summary_text(summary: dict, params_file: Path) -> str:
    metrics = "  ".join(f"{k}={v:.4f}" for k, v in summary["metrics"].items())
    params = load_params(params_file)
    store = summary["tracking_uri"]
    if store.startswith("sqlite:"):
        start_ui, ui = f"  .venv/bin/mlflow ui --backend-store-uri {store} --port 5000", \
            "http://127.0.0.1:5000"
    else:
        start_ui, ui = None, store.rstrip("/")
    from visionops.io.locks import prefect_server_url

    prefect_api = prefect_server_url()  # not this command's temporary server, gone by now
    return "\n".join(line for line in [
        "",
        "visionops retrain: done",
        f"  data version (DVC md5): {summary['data_version']}",
        f"  MLflow run:             {summary['run_id']}",
        f"  test metrics:           {metrics}",
        f"  gate decision:          {summary['decision']}: {summary['reason']}",
        f"  registered:             {summary['model_name']} version {summary['model_version']}"
        if summary["model_version"] is not None else
        f"  registered:             nothing new ({summary['model_name']})",
        f"  champion now:           version {summary['champion_version']}",
        "",
        "See it in the MLflow UI:",
        start_ui,
        f"  open {ui}/#/experiments/{summary['experiment_id']}/runs/{summary['run_id']}"
        f"  (models: {ui}/#/models/{params.registry.model_name})",
        "See the flow run in the Prefect UI:",
        f"  open {prefect_api.removesuffix('/api')}/runs" if prefect_api else
        "  .venv/bin/prefect server start   then open http://127.0.0.1:4200/runs",
    ] if line is not None)


@app.command()
def retrain(
    data: Annotated[Path | None, typer.Option(help="Image folder <label>/<image>.")] = None,
    params_file: ParamsFile = Path(DEFAULT_PARAMS),
    as_json: AsJson = False,
) -> None:
    """Run the retraining flow: validate, version, train, evaluate, gate, register, promote."""
    _load(params_file)  # fail on a bad config before any server starts
    from visionops.ops.warmstart import flow_settings, import_while_waiting, start_prefect_server

    server = start_prefect_server()
    from flows.retrain import retrain as retrain_flow
    from visionops.core.drift import DataDriftError
    from visionops.io.validation import DataValidationError

    # Only while the server starts: a retrain that trains needs them, one that finds
    # nothing changed does not.
    import_while_waiting(server, ["great_expectations", "keras"])
    if server is not None:
        server.wait()

    try:
        with flow_settings(server):
            summary = retrain_flow(params_path=str(params_file),
                                   data_dir=str(data) if data else None)
    except DataValidationError as exc:
        _fail(f"the dataset did not pass validation; nothing was trained or promoted.\n{exc}")
    except DataDriftError as exc:
        _fail(f"the dataset drifted too far; nothing was trained or promoted.\n{exc}")
    except FileNotFoundError as exc:
        _fail(str(exc))
    typer.echo(_summary_text(summary, params_file))
    if as_json:
        sys.stdout.flush()
        typer.echo(json.dumps(summary))


@app.command()
def serve(params_file: ParamsFile = Path(DEFAULT_PARAMS)) -> None:
    """Run the retrain flow on `schedule` from params.yaml in this one process (no worker
    needed; needs a Prefect server: PREFECT_API_URL). Stop it with Ctrl-C."""
    params = _load(params_file)
    from prefect.schedules import Cron

    from flows.retrain import retrain as retrain_flow

    retrain_flow.serve(
        name="serve", schedule=Cron(params.schedule.cron, timezone=params.schedule.timezone),
        parameters={"params_path": str(params_file.resolve())}, global_limit=1,
        description="Nightly retrain served by `visionops serve`.")


@app.command()
def validate(
    path: DataFolder,
    params_file: ParamsFile = Path(DEFAULT_PARAMS),
    as_json: AsJson = False,
) -> None:
    """Check an image folder; exit 0 when it is fit for training."""
    params = _load(params_file)
    from visionops.io.validation import validate_dataset

    try:
        report, _ = validate_dataset(path, params.validation, params.data_docs_dir)
    except FileNotFoundError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        typer.echo(f"{report.describe()}\nData Docs: {report.data_docs}")
    if not report.success:
        raise typer.Exit(1)


@app.command()
def ingest(
    source: Annotated[str | None, typer.Argument(
        help="Landing area: a folder or s3://bucket/prefix holding <label>/<file>. "
             "Default: ingest.landing in params.yaml.")] = None,
    params_file: ParamsFile = Path(DEFAULT_PARAMS),
    as_json: AsJson = False,
) -> None:
    """Validate new images from a landing area, add them to the dataset, re-version it."""
    params = _load(params_file)
    source = source or params.landing
    if source is None:
        _fail("no landing area: give SOURCE or set ingest.landing in params.yaml", code=2)
    from botocore.exceptions import BotoCoreError, ClientError

    from visionops.io.ingest import IngestBusy
    from visionops.io.ingest import ingest as ingest_batch
    from visionops.io.landing import LandingError

    try:
        result = ingest_batch(source, params)
    except (FileNotFoundError, LandingError, IngestBusy) as exc:
        _fail(str(exc))
    except (BotoCoreError, ClientError) as exc:
        _fail(f"{source}: {exc}\n(S3 endpoint and credentials come from AWS_ENDPOINT_URL, "
              "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or the AWS profile)")
    typer.echo(json.dumps(result.to_dict()) if as_json else result.describe())
    if result.quarantined:
        raise typer.Exit(1)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="validate | split | train | evaluate")],
    params_file: ParamsFile = Path(DEFAULT_PARAMS),
) -> None:
    """Run one pipeline stage on files (what `dvc repro` calls; see dvc.yaml)."""
    from visionops.core.model_safety import UnsafeModelFiles
    from visionops.jobs.stages import STAGES

    if name not in STAGES:
        _fail(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}", code=2)
    try:
        finished = STAGES[name](_load(params_file))
    except UnsafeModelFiles as exc:
        _fail(str(exc))
    if finished is False:
        raise typer.Exit(1)


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Images, or folders of images.")],
    params_file: ParamsFile = Path(DEFAULT_PARAMS),
    as_json: AsJson = False,
    csv_out: Annotated[Path | None, typer.Option(
        "--csv", help="Run the predict flow on one folder and write its labels here.")] = None,
) -> None:
    """Label images with the champion (`models:/<name>@champion`)."""
    params = _load(params_file)
    from visionops.io.registry import RegistryError

    try:
        if csv_out is not None:
            from flows.predict import predict as predict_flow

            if len(paths) != 1 or not paths[0].is_dir():
                _fail("--csv takes exactly one folder", code=2)
            summary = predict_flow(str(paths[0]), str(csv_out), str(params_file))
            typer.echo(json.dumps(summary) if as_json else
                       f"{summary['images']} images labelled by champion "
                       f"v{summary['champion_version']} into {summary['csv']}")
            return
        from visionops.core.predict import image_paths, predict_paths
        from visionops.io.models import load_champion

        champion = load_champion(params)
        rows = list(predict_paths(champion, image_paths(paths)))
    except (RegistryError, FileNotFoundError, ValueError) as exc:  # ValueError: a bad image
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps({"champion_version": champion.version, "predictions": rows}))
        return
    for row in rows:
        typer.echo(f"{row['path']}\t{row['label']}\t{row['probability']:.4f}")


@app.command("serve-model")
def serve_model(
    params_file: ParamsFile = Path(DEFAULT_PARAMS),
    host: Annotated[str | None, typer.Option(help="Address to listen on (serving.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (serving.port).")] = None,
) -> None:
    """Serve the champion over HTTP (/predict, /health, /ready, /version, /metrics),
    following the alias: a promotion or rollback is loaded in the background and swapped in."""
    params = _load(params_file)
    from visionops.serving.server import serve

    serve(params, host=host, port=port)


@app.command()
def score(
    source: Annotated[str | None, typer.Argument(
        help="Folder or s3://bucket/prefix of images (default: scoring.source).")] = None,
    params_file: ParamsFile = Path(DEFAULT_PARAMS),
    output: Annotated[Path | None, typer.Option(
        help="Parquet file to write (default: scoring.output_dir/<time>-v<version>.parquet).")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Batch-score images with the champion: a drift report against its training data,
    predictions as Parquet, an MLflow run, low-confidence images copied for review."""
    params = _load(params_file)
    if source is None and params.scoring.source is None:
        _fail("no SOURCE given and scoring.source is not set in params.yaml", code=2)
    location = source or params.scoring_source
    if not location.startswith("s3://"):
        location = str(Path(location).resolve())  # SOURCE is relative to where you are
        if not Path(location).is_dir():  # said before a Prefect server starts for nothing
            _fail(f"{location}: no such folder")
    from flows.score import score as score_flow
    from visionops.io.registry import RegistryError

    try:
        summary = score_flow(location, str(params_file), str(output) if output else None)
    except (RegistryError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(f"{summary['images']} images scored by champion v{summary['model_version']} "
               f"into {summary['output']}; drift: {summary['drift_status']}; "
               f"{summary['sent_for_review']} sent for review to {summary['review_dir']}"
               + (f" ({summary['already_sent']} sent before)" if summary.get("already_sent")
                  else ""))


models_app = typer.Typer(no_args_is_help=True,
                         help="The model registry: list, compare, promote, roll back.")
app.add_typer(models_app, name="models")


def _registry(params_file: Path):
    from visionops.io.registry import Registry

    return Registry(_load(params_file))


@models_app.command("list")
def models_list(params_file: ParamsFile = Path(DEFAULT_PARAMS), as_json: AsJson = False) -> None:
    """Every version with its aliases, test metrics, data version and times."""
    rows = _registry(params_file).listing()
    if as_json:
        typer.echo(json.dumps(rows))
        return
    typer.echo(f"{'version':>7}  {'aliases':<20} {'accuracy':>8} {'f1_macro':>8}  "
               f"{'decision':<15} {'created':<19}  {'promoted':<19}  data version")
    for row in rows:
        metrics = row["metrics"]
        typer.echo(f"{row['version']:>7}  {','.join(row['aliases']) or '-':<20} "
                   f"{metrics.get('accuracy', float('nan')):>8.4f} "
                   f"{metrics.get('f1_macro', float('nan')):>8.4f}  {row['decision']:<15} "
                   f"{row['created']:<19}  {row['promoted'] or '-':<19}  {row['data_version']}")


@models_app.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="The version to make champion.")],
    reason: Annotated[str, typer.Option(help="Why; recorded in the history.")],
    params_file: ParamsFile = Path(DEFAULT_PARAMS),
) -> None:
    """Make VERSION the champion (the `champion` alias); the move is recorded in the history."""
    from mlflow.exceptions import MlflowException

    from visionops.io.registry import RegistryError

    try:
        event = _registry(params_file).promote(version, reason)
    except RegistryError as exc:
        _fail(str(exc))
    except MlflowException as exc:  # e.g. 403: this account may not move the alias
        _fail(f"the tracking server refused the promotion: {exc.message}")
    typer.echo(f"champion: v{event['from_version'] or '-'} -> v{event['to_version']} "
               f"({event['reason']})")
    _ensure_exports(params_file, event["to_version"])


def _ensure_exports(params_file: Path, version: str) -> None:
    from visionops.io.models import ensure_exports
    from visionops.jobs.scoring import current_test_split

    params = _load(params_file)

    def test_images() -> list[Path]:
        return [params.data_dir / path for path in current_test_split(params)[0][:8]]

    from mlflow.exceptions import MlflowException

    try:
        report = ensure_exports(params, version, test_images)
    except (ValueError, OSError, MlflowException) as exc:
        # no data here, or an account that may not write the version's run (a promoter):
        # the promotion stands, unexported; the pipeline exports what it promotes
        typer.echo(f"exports of v{version} not made: {exc}", err=True)
        return
    if report is None:
        return
    exported = ", ".join(path.name for path in report.published) or "nothing"
    typer.echo(f"exported v{version} into its run's export/: {exported}")
    for reason in report.refused.values():
        typer.echo(f"not exported: {reason}", err=True)


@models_app.command("rollback")
def models_rollback(
    reason: Annotated[str, typer.Option(help="Why; recorded in the history.")] = "rollback",
    params_file: ParamsFile = Path(DEFAULT_PARAMS),
) -> None:
    """Move `champion` back to the version it replaced."""
    from mlflow.exceptions import MlflowException

    from visionops.io.registry import RegistryError

    try:
        event = _registry(params_file).rollback(reason)
    except RegistryError as exc:
        _fail(str(exc))
    except MlflowException as exc:
        _fail(f"the tracking server refused the rollback: {exc.message}")
    typer.echo(f"rolled back: champion v{event['from_version']} -> v{event['to_version']}")
    _ensure_exports(params_file, event["to_version"])


@models_app.command("history")
def models_history(params_file: ParamsFile = Path(DEFAULT_PARAMS), as_json: AsJson = False
                   ) -> None:
    """Every promotion and rollback: when, who, from which version to which, why."""
    events = _registry(params_file).history()
    if as_json:
        typer.echo(json.dumps(events))
        return
    for event in events:
        accuracy = event["metrics"].get("test_accuracy")
        typer.echo(f"{event['time']}  {event['event']:<8} v{event['from_version'] or '-'} -> "
                   f"v{event['to_version']}  by {event['actor']}: {event['reason']}"
                   + (f"  (test accuracy {accuracy:.4f})" if accuracy is not None else ""))


@models_app.command("compare")
def models_compare(
    version_a: Annotated[str, typer.Argument(help="A version.")],
    version_b: Annotated[str, typer.Argument(help="Another version.")],
    params_file: ParamsFile = Path(DEFAULT_PARAMS),
    as_json: AsJson = False,
) -> None:
    """Score two versions side by side on the current test split."""
    from visionops.io.registry import RegistryError
    from visionops.jobs.scoring import compare_versions

    try:
        table = compare_versions(_load(params_file), [version_a, version_b])
    except RegistryError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(table))
        return
    typer.echo(f"on the current test split ({table['test_images']} images, "
               f"data {table['data_version']}):")
    typer.echo(f"{'metric':<16}" + "".join(f"{'v' + v:>10}" for v in table["versions"]))
    for metric, values in table["metrics"].items():
        typer.echo(f"{metric:<16}" + "".join(f"{values[v]:>10.4f}" for v in table["versions"]))
    test = table["mcnemar"]
    typer.echo(f"McNemar exact: only v{version_a} right {test['b']}, only v{version_b} right "
               f"{test['c']}, p={test['p_value']:.4g}")


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Where to write <digit>/<file>.png.")] = Path("data"),
    per_class: Annotated[int | None, typer.Option(help="Keep only N images per digit.")] = None,
) -> None:
    """Write scikit-learn's bundled handwritten digits as PNG files."""
    from visionops.core.demo import write_digits

    count = write_digits(out, per_class=per_class)
    typer.echo(f"{count} demo images in {out}/<digit>/")


if __name__ == "__main__":
    app()


stack_app = typer.Typer(no_args_is_help=True, help=(
    "The team stack on this machine, without Docker: object store (SeaweedFS), MLflow "
    "server and Prefect server on PostgreSQL, a Prefect worker. See README, "
    "'Run it for a team'."))
app.add_typer(stack_app, name="stack")

ProjectFolder = Annotated[Path, typer.Option("--project", help="The visionops repository.")]
StateFolder = Annotated[Path | None, typer.Option(
    "--state-dir", help="Where ports, secrets, PIDs, logs and data live [<project>/.stack].")]


def _stack(project: Path, state_dir: Path | None):
    from visionops.ops.stack import Stack, StackError

    try:
        return Stack.load(project, state_dir)
    except StackError as exc:
        _fail(str(exc))


@stack_app.command("up")
def stack_up(
    project: ProjectFolder = Path("."),
    state_dir: StateFolder = None,
    postgres_url: Annotated[str | None, typer.Option(
        envvar="VISIONOPS_POSTGRES_URL",
        help="A PostgreSQL to keep MLflow's and Prefect's data in (databases are created).")]
    = None,
    db_prefix: Annotated[str, typer.Option(help="Prefix of the databases' names.")]
    = "visionops",
    s3_port: Annotated[int, typer.Option(help="0: any free port.")] = 8333,
    mlflow_port: Annotated[int, typer.Option(help="0: any free port.")] = 5000,
    prefect_port: Annotated[int, typer.Option(help="0: any free port.")] = 4200,
) -> None:
    """Start every part of the stack that is not running, then print how to use it."""
    from visionops.ops.stack import (
        DEFAULT_POSTGRES_URL,
        POSTGRES_URL_VARIABLE,
        StackError,
        has_password,
    )

    given_on_command_line = postgres_url != os.environ.get(POSTGRES_URL_VARIABLE)
    if postgres_url and given_on_command_line and has_password(postgres_url):
        _fail(f"--postgres-url holds a password, which `ps` shows to every user: set "
              f"{POSTGRES_URL_VARIABLE} instead (or leave the password to ~/.pgpass)")
    stack = _stack(project, state_dir)
    if not stack.state_file.exists():
        stack.postgres_url = postgres_url or DEFAULT_POSTGRES_URL
        stack.db_prefix = db_prefix
    try:
        stack.up({"s3": s3_port, "mlflow": mlflow_port, "prefect": prefect_port},
                 say=typer.echo)
    except StackError as exc:
        _fail(str(exc))
    typer.echo("\n".join([
        "", "The stack is up. Run the pipeline by hand (or from CI) as its writer with:",
        f"  eval \"$(visionops stack env --pipeline --project {project})\"",
        "then `visionops retrain` tracks to MLflow, runs on Prefect and versions data on S3.",
        "Give each person an account of their own: "
        "`visionops stack user add NAME --role reviewer|promoter`, then "
        "`visionops stack env --user NAME`.",
        f"MLflow UI {stack.mlflow_url}; Prefect UI {stack.prefect_api_url.removesuffix('/api')}"
        f" (its auth string and every password are in {stack.state_file}, mode 600)",
    ]))


@stack_app.command("env")
def stack_env(
    project: ProjectFolder = Path("."),
    state_dir: StateFolder = None,
    user: Annotated[str | None, typer.Option(
        help="A person's own account (`stack user add`); default: the stack's reviewer.")]
    = None,
    pipeline: Annotated[bool, typer.Option(
        help="The pipeline's writer account and the Prefect auth string: for running the "
             "flows by hand or from CI, never for a person's everyday shell.")] = False,
) -> None:
    """Print `export` lines for a shell: MLflow, S3 and DVC clients (and, with --pipeline,
    Prefect) use them."""
    import shlex

    from visionops.ops.stack import StackError

    stack = _stack(project, state_dir)
    if not stack.state_file.exists():
        _fail(f"no stack at {stack.state_dir}: run `visionops stack up` first")
    if pipeline and user:
        _fail("--pipeline and --user name two different accounts: choose one")
    try:
        env = stack.client_env() if pipeline else stack.person_env(user)
    except StackError as exc:
        _fail(str(exc))
    for key, value in env.items():
        typer.echo(f"export {key}={shlex.quote(value)}")


user_app = typer.Typer(no_args_is_help=True, help="People's own MLflow accounts.")
stack_app.add_typer(user_app, name="user")


@user_app.command("add")
def stack_user_add(
    name: Annotated[str, typer.Argument(help="The person's user name on MLflow.")],
    role: Annotated[str, typer.Option(
        help="reviewer: reads everything. promoter: reads, and moves the registered "
             "model's aliases (champion).")] = "reviewer",
    project: ProjectFolder = Path("."),
    state_dir: StateFolder = None,
) -> None:
    """Create (or change the role of) a person's MLflow account; its password is kept in
    the stack's state, shown by `stack env --user NAME`."""
    from visionops.ops.stack import StackError

    stack = _stack(project, state_dir)
    try:
        username, _ = stack.add_person(name, role)
    except StackError as exc:
        _fail(str(exc))
    typer.echo(f"{username}: {role} on {stack.mlflow_url}. Their shell: "
               f"eval \"$(visionops stack env --user {username} --project {project})\"")


@stack_app.command("status")
def stack_status(project: ProjectFolder = Path("."), state_dir: StateFolder = None,
                 as_json: AsJson = False) -> None:
    """Each part: its PID, whether it runs and answers, its address. Exit 1 if any is down."""
    status = _stack(project, state_dir).status()
    if as_json:
        typer.echo(json.dumps(status))
    else:
        for name, part in status.items():
            state = "up" if part["healthy"] else ("starting" if part["running"] else "down")
            typer.echo(f"{name:<15} {state:<9} pid {part['pid'] or '-':<8} {part['url'] or ''}")
            if part.get("not_ours"):
                typer.echo(f"{'':<15} pid {part['not_ours']} is another process now, not the "
                           "one the stack started")
    if not all(part["healthy"] for part in status.values()):
        raise typer.Exit(1)


@stack_app.command("down")
def stack_down(
    project: ProjectFolder = Path("."),
    state_dir: StateFolder = None,
    only: Annotated[list[str] | None, typer.Option(
        help="Stop just this part (s3, mlflow, prefect-server, prefect-worker); repeatable. "
             "`stack up` starts it again at the same address.")] = None,
    purge: Annotated[bool, typer.Option(
        help="Also drop the databases and delete the stored objects and the state.")] = False,
) -> None:
    """Stop the stack's processes by their PIDs (last started first)."""
    from visionops.ops.stack import SERVICES

    unknown = sorted(set(only or []) - set(SERVICES))
    if unknown:
        _fail(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(SERVICES)}")
    _stack(project, state_dir).down(only=only, purge=purge, say=typer.echo)


def main() -> None:
    """The `visionops` command: the app, then an exit without the interpreter's teardown
    (see `EndWithoutTeardown`)."""
    ending = EndWithoutTeardown()
    try:
        app()
    except SystemExit as exc:
        ending.code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        raise


class EndWithoutTeardown:
    """Ends the process with `code`, once set, after the normal exit has run: threads
    joined, Prefect's logs and events sent, every atexit handler registered after this one
    (the temporary Prefect server's stop among them), logging's handlers flushed. What it
    skips is the interpreter's teardown of every loaded module: seconds once TensorFlow
    is loaded. Left unset (an exception other than SystemExit), the exit is the usual one."""

    def __init__(self) -> None:
        self.code: int | None = None
        atexit.register(self._end_now)  # handlers run last registered first: this one last

    def _end_now(self) -> None:
        if self.code is None:
            return
        logging.shutdown()  # logging's own atexit handler, registered before this one
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(self.code)
