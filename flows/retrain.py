"""The retrain flow: validate -> version -> preprocess -> train -> evaluate
(challenger and champion on the same test split) -> gate -> register -> promote.
Everything a reviewer needs lands in one MLflow run."""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.facts import dask_facts
from flows.hooks import (
    crash_runs_whose_heartbeats_stop,
    record_process,
    report_failure,
    report_unreported_crashes,
)
from tasks.drift import drift_task
from tasks.evaluate import evaluate_task
from tasks.gate import gate_task
from tasks.ingest import ingest_task
from tasks.preprocess import preprocess_task
from tasks.register import export_task, promote_task, register_task, servability_task
from tasks.train import train_task
from tasks.upload import upload_task
from tasks.validate import validate_task
from tasks.version import pull_task, record_task, sync_task, version_task
from visionops.core.config import DEFAULT_PARAMS, load_params
from visionops.core.drift import DataDriftError, DriftReport, write_drift
from visionops.core.gate import REJECTED, Check, GateDecision
from visionops.core.images import FACT_DTYPES
from visionops.core.metrics import (
    Evaluation,
    class_recalls,
    plot_confusion_matrix,
    plot_learning_curves,
)
from visionops.core.pipeline import (
    INPUT_CONTRACT_TAG,
    PIXELS,
    cache_folder,
    load_pixels,
    model_input,
    scale_for,
)
from visionops.core.training import claim_backup_dir
from visionops.io.dataset import content_hash, dvc_file, needs_pull
from visionops.io.locks import prefect_server_url
from visionops.io.models import FreshProcess, LoadedVersion, load_registered_version
from visionops.io.registry import CHAMPION_CHANGED, Registry
from visionops.io.tracking import (
    code_version,
    epoch_metrics_logger,
    gate_hash,
    git_commit,
    params_hash,
    use_experiment,
)
from visionops.io.transient import is_transient_error
from visionops.io.validation import DataValidationError, write_report

METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")
UNCHANGED = "unchanged"
NOT_LOADABLE = "not loadable"
_SUMMARY_DEFAULTS = {"champion_metrics": None, "model_version": None, "epochs_run": 0,
                     "fit_seconds": 0.0, "regated": False, "same_as_version": None}


def _log_validation(report, facts, out_dir: Path, docs_dir: Path) -> None:
    files = [(path, "validation") for path in write_report(report, facts, out_dir)]
    if docs_dir.is_dir():
        files.append((docs_dir, "validation/data_docs"))
    upload_task(files)


def _log_dict(values: dict, artifact_file: str, out_dir: Path) -> None:
    path = out_dir / "dicts" / artifact_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2))
    upload_task([(path, str(Path(artifact_file).parent))])


def _champion_facts(champion_mv, out_dir: Path) -> tuple[pd.DataFrame | None, str]:
    """The image facts table the champion's run recorded, or None and why not."""
    if champion_mv is None:
        return None, "no champion yet"
    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=champion_mv.run_id, artifact_path="validation/image_facts.csv",
            dst_path=str(out_dir / "champion"))
        return pd.read_csv(path, dtype=FACT_DTYPES), ""
    except (MlflowException, OSError, ValueError) as exc:
        return None, (f"the image facts of champion v{champion_mv.version} could not be "
                      f"read ({type(exc).__name__}: {exc})")


def _log_drift(report: DriftReport, reference, facts, out_dir: Path) -> None:
    upload_task([(path, "drift") for path in write_drift(report, reference, facts,
                                                          out_dir / "drift")])
    mlflow.set_tag("drift_status", report.status)
    mlflow.log_metrics({"drift_" + m.name.replace(" ", "_"): m.statistic
                        for m in report.measures})


def _log_evaluation(evaluation: Evaluation, prefix: str, class_names, out_dir: Path) -> None:
    mlflow.log_metrics({f"{prefix}_{k}": v for k, v in evaluation.metrics.items()})
    report_path = out_dir / f"{prefix}_classification_report.json"
    report_path.write_text(json.dumps(evaluation.report, indent=2))
    plot = plot_confusion_matrix(evaluation.confusion, class_names,
                                 out_dir / f"{prefix}_confusion_matrix.png")
    upload_task([(report_path, "evaluation"), (plot, "evaluation")])


def _check_servable(decision: GateDecision, registered, params, sample, expected,
                    fresh: FreshProcess) -> GateDecision:
    """Keep a gate-passing decision only if the registered version serves, loaded from
    the registry in a fresh process, the `expected` predictions of the in-process model."""
    uri = f"models:/{params.registry.model_name}/{registered.version}"
    problem = servability_task(uri, params.tracking_uri, sample, expected, fresh)
    checks = [*decision.checks, Check("servable", float(problem is None), 1.0, problem is None)]
    if problem:
        return replace(decision, decision=REJECTED, reason=f"not servable: {problem}",
                       checks=checks)
    return replace(decision, checks=checks)


def _record_decision(decision: GateDecision, registry: Registry, version: str,
                     gated_against: str | None, params, out_dir: Path) -> None:
    """Every check with its figures in the run; the decision on the run and the version,
    with what it was decided under (the gate's params, the champion compared with)."""
    mlflow.set_tags(decision.run_tags())
    mlflow.log_metrics(decision.run_metrics())
    # on the version first, `decision` last: it marks the record complete (_gate_again);
    # a decision gated again drops the old one first, so no old decision meets new figures
    if "decision" in registry.version(version).tags:
        registry.client.delete_model_version_tag(registry.name, str(version), "decision")
    tags = {"reason": decision.reason, "gate_hash": gate_hash(params),
            "gated_against": gated_against or "", "decision": decision.decision}
    for key, value in tags.items():
        registry.client.set_model_version_tag(registry.name, str(version), key, value)
    get_run_logger().info("Gate: %s (%s)", decision.decision, decision.reason)
    _log_dict(decision.to_dict(), "gate/decision.json", out_dir)


def _gate_again(version, champion_mv, params) -> bool:
    """Whether a version already trained on this lineage is to be gated again instead of
    reported unchanged: it was never decided (its run died after registering), the gate's
    params changed since, or it lost only because the champion changed during its run."""
    tags = version.tags
    if champion_mv is not None and str(champion_mv.version) == str(version.version):
        return False  # the champion itself (its decision may not have been recorded)
    if "decision" not in tags:
        return True
    reason = tags.get("reason", "")
    if tags["decision"] != REJECTED or reason.startswith("not servable"):
        return False
    champion_now = champion_mv and str(champion_mv.version)
    return (tags.get("gate_hash") != gate_hash(params)
            or (reason.startswith(CHAMPION_CHANGED)
                and tags.get("gated_against") != (champion_now or "")))


def _unchanged(same, champion_mv, lineage: dict, run_id: str, experiment_id: str,
               params, trained=None) -> dict:
    """Data, model code and training params are those `same` was trained on and gated
    with: training again would give the same model, so nothing is trained."""
    is_champion = champion_mv is not None and str(champion_mv.version) == str(same.version)
    what = (f"champion v{same.version}" if is_champion else
            f"v{same.version} ({same.tags.get('decision', 'undecided')}: "
            f"{same.tags.get('reason', '')})")
    reason = (f"data, model code and training params are those {what} was trained on; "
              "nothing to do")
    mlflow.set_tags({"decision": UNCHANGED, "reason": reason, "same_as_version": str(same.version),
                     "champion_version": str(champion_mv.version) if champion_mv else ""})
    get_run_logger().info("Nothing changed: %s", reason)
    return {
        **_SUMMARY_DEFAULTS, "data_version": lineage["data_version"], "run_id": run_id,
        "experiment_id": experiment_id, "tracking_uri": params.tracking_uri,
        "metrics": {key.removeprefix("test_"): float(value)
                    for key, value in same.tags.items() if key.startswith("test_")},
        "decision": UNCHANGED, "reason": reason, "model_name": params.registry.model_name,
        "same_as_version": same.version,
        "previous_champion_version": champion_mv and champion_mv.version,
        "champion_version": champion_mv and champion_mv.version,
        **({"epochs_run": trained.epochs_run, "fit_seconds": trained.fit_seconds}
           if trained else {}),
    }


def _decision_markdown(challenger: Evaluation, champion: Evaluation | None,
                       champion_version: str | None, decision: GateDecision,
                       model_version: str, data_version: str) -> str:
    header = f"| metric | challenger (v{model_version}) |"
    rule = "|---|---|"
    if champion is not None:
        header += f" champion (v{champion_version}) |"
        rule += "---|"
    rows = []
    for metric in METRICS:
        row = f"| {metric} | {challenger.metrics[metric]:.4f} |"
        if champion is not None:
            row += f" {champion.metrics[metric]:.4f} |"
        rows.append(row)
    return "\n".join([
        "# Retrain decision", "",
        f"**Decision:** `{decision.decision}`", "", f"**Reason:** {decision.reason}", "",
        f"Data version (DVC md5): `{data_version}`", "", header, rule, *rows,
    ])


def _check_drift(champion_mv, facts, params, out: Path) -> None:
    """The new data against the champion's; a check that cannot run is a warning tag."""
    reference, missing = _champion_facts(champion_mv, out)
    if reference is None:
        mlflow.set_tag("drift_status", "skipped" if champion_mv else "no_reference")
        if champion_mv is not None:
            mlflow.set_tag("drift_warning", f"drift check skipped: {missing}")
            get_run_logger().warning("Drift check skipped: %s", missing)
        return
    name = f"the data of champion v{champion_mv.version}"
    try:
        drift = drift_task(reference, facts, params.drift, name)
    except DataDriftError as exc:
        _log_drift(exc.report, reference, facts, out)
        mlflow.set_tags({"decision": "data_drift", "reason": str(exc)})
        raise
    _log_drift(drift, reference, facts, out)
    get_run_logger().info(drift.describe())


def _trained_on(registry: Registry, lineage: dict):
    """The newest version trained on this lineage whose model can still be loaded."""
    same = registry.latest_with(lineage)
    if same is None or same.tags.get("reason", "").startswith(NOT_LOADABLE):
        return None  # trained again: its model is gone
    return same


def _log_dvc_file(data: Path, logged: str | None = None) -> str | None:
    """Log `<data>.dvc` to the run unless it is the text `logged` already; its text."""
    text = dvc_file(data).read_text() if dvc_file(data).is_file() else None
    if text is not None and text != logged:
        upload_task([(dvc_file(data), "data")])
    return text


def _load_to_regate(registry: Registry, version) -> LoadedVersion | None:
    """A version to gate again, loaded, or None (it is then rejected as not loadable,
    and this run trains instead)."""
    try:
        return load_registered_version(registry.params, version.version)
    except (MlflowException, OSError, ValueError) as exc:
        if is_transient_error(exc):
            raise  # the store is away for a moment: fail the run, keep the version as it is
        reason = f"{NOT_LOADABLE}: {type(exc).__name__}: {exc}"[:500]
        for key, value in (("reason", reason), ("decision", REJECTED)):
            registry.client.set_model_version_tag(registry.name, str(version.version),
                                                  key, value)
        get_run_logger().warning("v%s cannot be gated again, training instead: %s",
                                 version.version, reason)
        return None


def _train(prepared, params, lineage: dict, out: Path):
    # Same data, code and params as an interrupted run: resume from its last epoch.
    lineage_key = "-".join(lineage[key].removesuffix(".dir") for key in sorted(lineage))
    cache = (cache_folder(params.root / ".visionops" / "cache", lineage["data_version"],
                          params.data.image_size, params.data.channels)
             if params.data.cache else None)
    with claim_backup_dir(params.root / ".visionops" / "checkpoints", lineage_key) as backup:
        trained = train_task(prepared, params.training, params.augment, out / "train",
                             callbacks=[epoch_metrics_logger()], backup_dir=backup,
                             cache=cache, shuffle_buffer=params.data.shuffle_buffer)
    if trained.backup_warning:
        mlflow.set_tag("training_backup_warning", trained.backup_warning)
    if trained.resumed_from_epoch:
        mlflow.set_tag("resumed_from_epoch", str(trained.resumed_from_epoch))
    mlflow.set_tags({"precision": trained.precision, "image_cache": str(trained.cached)})
    mlflow.log_metrics({"epochs_run": trained.epochs_run, "fit_seconds": trained.fit_seconds,
                        "fine_tuned_epochs": trained.fine_tuned_epochs,
                        "train_images_per_s": trained.train_images * trained.epochs_run
                        / max(trained.fit_seconds, 1e-9)})
    upload_task([*((path, "training") for path in plot_learning_curves(trained.history, out)),
                 *([(trained.augmented_samples, "training")] if trained.augmented_samples
                   else []),
                 (trained.tensorboard_dir, "tensorboard")])
    return trained


class Retrain:
    """One retrain, in the stages a reviewer thinks in; each is a Prefect subflow, so the
    UI shows data -> validation -> training -> evaluation -> promotion under the run.
    The stages hand arrays and models to each other on this object, not as flow
    parameters, which Prefect would copy and send to its API; their parameters are the
    few small values worth seeing in the UI."""

    def __init__(self, params, data: Path, by_hand: bool, out: Path, run_id: str,
                 experiment_id: str, commit: str):
        self.params, self.data, self.by_hand, self.out = params, data, by_hand, out
        self.run_id, self.experiment_id, self.commit = run_id, experiment_id, commit
        self.registry = Registry(params)
        self.actor = f"prefect flow run {flow_run.get_name()} ({flow_run.get_id()})"
        # Flows over this instance's bound methods: nothing of this run is kept on a flow
        # object shared with other instances once it ends.
        self.take_in_data = flow(name="retrain-data", log_prints=True)(self._take_in_data)
        self.validate_and_version = flow(name="retrain-validation", log_prints=True)(
            self._validate_and_version)
        self.train_or_reload = flow(name="retrain-training", log_prints=True)(
            self._train_or_reload)
        self.evaluate_and_gate = flow(name="retrain-evaluation", log_prints=True)(
            self._evaluate_and_gate)
        self.register_and_promote = flow(name="retrain-promotion", log_prints=True)(
            self._register_and_promote)

    def _take_in_data(self) -> str | None:
        """The recorded dataset checked out, and the landing area ingested into it;
        the text of data.dvc as logged to the run."""
        logger, params, data = get_run_logger(), self.params, self.data
        remote, branch = params.ingest.git_remote, params.ingest.git_branch
        if not self.by_hand:
            mlflow.set_tag("data_sync", sync_task(data, remote, branch))
        elif needs_pull(data):  # a folder given by hand is the user's: only filled if empty
            pull_task(data)
        if params.landing and not self.by_hand:
            ingested = ingest_task(params.landing, params)
            _log_dict(ingested.to_dict(), "data/ingest.json", self.out)
            logger.info(ingested.describe())
            if ingested.pending:
                mlflow.set_tag("ingest_pending", str(len(ingested.pending)))
        return _log_dvc_file(data)

    def _validate_and_version(self, logged_dvc_file: str | None) -> None:
        """Validation and drift (either can stop the run), the dataset version, the split."""
        params, data, out = self.params, self.data, self.out
        precomputed = (dask_facts(data, params.validation.max_side, params.compute)
                       if params.compute.runner == "dask" else None)
        try:
            report, facts = validate_task(data, params.validation, params.data_docs_dir,
                                          precomputed)
        except DataValidationError as exc:
            _log_validation(exc.report, exc.facts, out, params.data_docs_dir)
            mlflow.set_tags({"decision": "data_rejected", "reason": "data validation failed"})
            raise
        _log_validation(report, facts, out, params.data_docs_dir)

        if params.drift.enabled:
            _check_drift(self.champion_mv, facts, params, out)

        self.version = version_task(data)
        if not self.by_hand:  # a hand-edited data/ gets its version here
            recorded = record_task(data, params.ingest.git_remote, params.ingest.git_branch)
            mlflow.set_tag("data_commit", recorded.commit or "")
        _log_dvc_file(data, logged_dvc_file)  # again if versioning changed it
        mlflow.set_tags({"data_version": self.version.md5,
                         "dvc_file": self.version.dvc_file or "",
                         "dvc_remote": self.version.pushed_to or ""})
        split_table, self.prepared = preprocess_task(data, facts, params.data, params.split)
        split_path = out / "split.csv"
        split_table.to_csv(split_path, index=False)
        upload_task([(split_path, "data")])
        mlflow.log_params({f"n_{name}": len(getattr(self.prepared, name).y)
                           for name in ("train", "val", "test")}
                          | {"n_classes": len(self.prepared.class_names)})

    def _train_or_reload(self, regate_version: str | None) -> None:
        """The challenger: trained, or, for a version to gate again, loaded from the
        registry (trained after all when it no longer loads)."""
        self.model = self.trained = None
        self.contract = PIXELS
        if regate_version is not None:
            loaded = _load_to_regate(self.registry, self.same)
            if loaded is None:
                self.same = None
            else:
                self.model, self.contract = loaded.model, loaded.input_contract
        if self.same is None:
            self.trained = _train(self.prepared, self.params, self.lineage, self.out)
            self.model = self.trained.model

    def _evaluate_and_gate(self, champion_version: str | None) -> str:
        """Challenger and champion on the same test split, and the gate's decision."""
        prepared, out = self.prepared, self.out
        self.challenger = evaluate_task(self.model, self.data, prepared.test.paths,
                                        prepared.test.y, prepared.class_names,
                                        contract=self.contract)
        _log_evaluation(self.challenger, "test", prepared.class_names, out)
        self.champion = None
        if self.champion_mv is not None:
            loaded = load_registered_version(self.params, self.champion_mv.version)
            self.champion = evaluate_task.with_options(
                name="Evaluate champion on the same split")(
                loaded.model, self.data, prepared.test.paths, prepared.test.y,
                prepared.class_names, loaded.class_names, loaded.input_contract)
            _log_evaluation(self.champion, "champion_test", prepared.class_names, out)
            mlflow.set_tag("champion_version", self.champion_mv.version)
        self.decision = gate_task(
            self.challenger.metrics, self.champion and self.champion.metrics,
            self.params.gate, champion_version, class_recalls(self.challenger),
            self.champion and (self.challenger.predictions == prepared.test.y,
                               self.champion.predictions == prepared.test.y))
        return self.decision.decision

    def _register_and_promote(self, champion_version: str | None) -> str | None:
        """Register the challenger; if the gate passed and it serves from the registry,
        export it and promote it (compare-and-set on the champion). The version, or None
        when a run started together with this one registered the same lineage first."""
        params, registry, model = self.params, self.registry, self.model
        if self.same is None:
            with registry.lock():  # a run started together with this one may have won
                self.same = _trained_on(registry, self.lineage)
                if self.same is not None:
                    return None
                self.registered = register_task(
                    model, params.registry.model_name, self._sample(2), {
                        **self.lineage, "data_version": self.version.md5,
                        "git_commit": self.commit, INPUT_CONTRACT_TAG: self.contract,
                        "class_names": json.dumps(self.prepared.class_names),
                        **{f"test_{k}": f"{v:.4f}"
                           for k, v in self.challenger.metrics.items()}})
            self.regated = False
        else:
            self.registered, self.regated = self.same, True
        decision, exporting = self.decision, None
        if decision.promote:
            sample = self._sample(8)
            expected = model.predict(sample, verbose=0)  # before the export uses it
            # The exports are built while the fresh process loads the version: it is
            # mostly start-up time, and a version that passed the gate almost always serves.
            exporting = export_task.submit(model, self.out / "export", sample, params.export)
            decision = _check_servable(decision, self.registered, params, sample, expected,
                                       self.fresh)
        if decision.promote:
            registry.set_challenger(self.registered.version)
            exported = exporting.result()
            mlflow.log_metrics(exported.metrics())
            mlflow.set_tags(exported.tags())  # export.<format>: published, or why not
            upload_task([(path, f"export/{path.name}" if path.is_dir() else "export")
                         for path in exported.published])
            moved = promote_task(params, self.registered.version, decision.reason,
                                 self.actor, champion_version)
            if moved["event"] == "refused":
                decision = GateDecision(
                    REJECTED, moved["reason"],
                    [*decision.checks, Check("champion_unchanged", 0.0, 1.0, False)],
                    decision.mcnemar, decision.power)
        elif exporting is not None:
            exporting.wait()  # a version that does not serve is not exported
        _record_decision(decision, registry, self.registered.version, champion_version,
                         params, self.out)
        self.decision = decision
        return str(self.registered.version)

    def _sample(self, images: int) -> np.ndarray:
        """The first test images, as the challenger takes them."""
        size, channels = model_input(self.model)
        pixels = load_pixels(self.prepared.files("test")[:images], size, channels)
        return scale_for(pixels, self.contract).astype(np.float32)

    def summary(self) -> dict:
        champion_now = self.registry.champion()
        challenger, champion, decision = self.challenger, self.champion, self.decision
        create_markdown_artifact(
            key="retrain-decision", description="Challenger vs champion and the gate decision",
            markdown=_decision_markdown(challenger, champion,
                                        self.champion_mv and self.champion_mv.version,
                                        decision, self.registered.version, self.version.md5))
        return {
            "data_version": self.version.md5,
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "tracking_uri": self.params.tracking_uri,
            "metrics": challenger.metrics,
            "champion_metrics": champion and champion.metrics,
            "decision": decision.decision,
            "reason": decision.reason,
            "model_name": self.params.registry.model_name,
            "model_version": self.registered.version,
            "regated": self.regated,
            "same_as_version": self.regated and self.same.version or None,
            "previous_champion_version": self.champion_mv and self.champion_mv.version,
            "champion_version": champion_now and champion_now.version,
            "epochs_run": self.trained.epochs_run if self.trained else 0,
            "fit_seconds": self.trained.fit_seconds if self.trained else 0.0,
        }

    def run(self, fresh_process: contextlib.ExitStack) -> dict:
        logger = get_run_logger()
        logged_dvc_file = self.take_in_data()

        self.champion_mv = self.registry.champion()
        champion_version = self.champion_mv and str(self.champion_mv.version)
        self.lineage = {"data_version": content_hash(self.data),
                        "code_version": code_version(), "params_hash": params_hash(self.params)}
        mlflow.set_tags(self.lineage)
        self.same = _trained_on(self.registry, self.lineage)
        if self.same is not None and not _gate_again(self.same, self.champion_mv, self.params):
            return _unchanged(self.same, self.champion_mv, self.lineage, self.run_id,
                              self.experiment_id, self.params)
        if self.same is not None:
            logger.info("v%s was trained on this data, model code and training params; "
                        "gating it again instead of training", self.same.version)
            mlflow.set_tag("regated_version", str(self.same.version))
        # The serve check's process: its imports (seconds) run on the other core while this
        # one validates; it then waits, idle during training, to load the registered version.
        self.fresh = fresh_process.enter_context(FreshProcess(self.params.tracking_uri))

        self.validate_and_version(logged_dvc_file)
        self.train_or_reload(self.same and str(self.same.version))
        self.evaluate_and_gate(champion_version)
        if self.register_and_promote(champion_version) is None:
            return _unchanged(self.same, self.champion_mv, self.lineage, self.run_id,
                              self.experiment_id, self.params, self.trained)
        return self.summary()


@flow(name="retrain", log_prints=True, timeout_seconds=12 * 60 * 60,
      on_failure=[report_failure], on_crashed=[report_failure], on_running=[record_process])
def retrain(params_path: str = DEFAULT_PARAMS, data_dir: str | None = None) -> dict:
    """Retrain on the dataset, compare with the champion on the same test split, and
    promote the challenger only if the gate passes. Returns the run's summary."""
    logger = get_run_logger()
    params = load_params(params_path)
    if prefect_server_url():  # a shared server: it marks runs whose heartbeats stop
        crash_runs_whose_heartbeats_stop()
    for reported in report_unreported_crashes(params, "retrain"):
        logger.warning("An earlier run crashed and is now reported: %s", reported)
    data = Path(data_dir).resolve() if data_dir else params.data_dir
    experiment_id = use_experiment(params)

    with mlflow.start_run(experiment_id=experiment_id,
                          run_name=f"retrain-{flow_run.get_name() or 'local'}") as run, \
            tempfile.TemporaryDirectory(prefix="visionops-") as scratch, \
            contextlib.ExitStack() as cleanup:
        commit = git_commit(params.root)
        mlflow.set_tags({"git_commit": commit, "data_dir": str(data),
                         "prefect_flow_run_id": str(flow_run.get_id())})
        mlflow.log_params(params.loggable())
        return Retrain(params, data, bool(data_dir), Path(scratch), run.info.run_id,
                       experiment_id, commit).run(cleanup)
