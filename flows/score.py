"""The score flow: label every image of a folder or an S3 prefix with the champion into
a Parquet file, in one MLflow run of `<experiment>-scoring` linked to the version.

Before predicting, the images are compared with the champion's training data by the
retrain flow's drift measures (width, height, brightness); after, the predicted labels'
class distribution with the training labels'. Drift never stops scoring: a failing
measure is the run's `drift_warning` tag. Images the champion is unsure of (top
probability below feedback.confidence_threshold) are copied to the review area under
their predicted label: the feedback loop (visionops.io.feedback); the area remembers
what it was sent, so an image scored again is not sent again. A file that cannot be read
when predicted is skipped with its reason, a copy that fails is counted and named by the
run's `review_warning` tag: neither throws away the batch.

A failed or crashed run is reported like a retrain's (flows/hooks.py: reports/failures/,
notify.webhook_url); a run killed outright is reported, and its MLflow run ended, by the
next run, which also removes what it left on disk: Parquet temporaries and staging
folders."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.hooks import record_process, report_failure, report_unreported_crashes
from tasks.retry import TRANSIENT_RETRIES
from tasks.upload import upload_task
from visionops.core.config import DEFAULT_PARAMS, Params, load_params, may_carry_secret
from visionops.core.drift import FAIL, DriftReport, compare, write_drift
from visionops.core.images import IMAGE_SUFFIXES
from visionops.io.feedback import ReviewArea
from visionops.io.models import LoadedVersion, load_champion
from visionops.io.sources import STAGING_PREFIX, open_source
from visionops.jobs.scoring import (
    PredictionsFile,
    ScoredImages,
    champion_facts,
    input_facts,
    score_images,
    scoring_experiment,
    skip_reason,
)

MAX_PARQUET_ARTIFACT_BYTES = 50_000_000  # larger files stay where they are, named by a tag
LOGGED_SECTIONS = ("feedback", "scoring", "drift", "registry", "validation")
PREDICTED = "predicted class distribution"
DISABLED = "drift.enabled is false"

HOURS = 60 * 60
STALE_TEMPORARY_S = HOURS    # a Parquet temporary untouched this long: a killed run's
STALE_STAGING_S = 24 * HOURS  # a staging folder this old outlived any run (12 h at most)
PARQUET_TEMPORARY = re.compile(r"\..+\.parquet\.[0-9a-f]{8}\.tmp")  # PredictionsFile's

champion_task = task(name="Load the champion", cache_policy=NO_CACHE, timeout_seconds=HOURS / 2,
                     **TRANSIENT_RETRIES)(load_champion)
champion_facts_task = task(name="Read the champion's training facts", cache_policy=NO_CACHE,
                           timeout_seconds=HOURS / 2, **TRANSIENT_RETRIES)(champion_facts)
facts_task = task(name="Measure the images", cache_policy=NO_CACHE,
                  timeout_seconds=6 * HOURS)(input_facts)


@task(name="Score with the champion", cache_policy=NO_CACHE, timeout_seconds=6 * HOURS)
def score_task(champion: LoadedVersion, root: Path, files: list[str], images: list,
               formats: list, predictions: PredictionsFile, review_dir: str,
               threshold: float) -> ScoredImages:
    logger = get_run_logger()

    def progress(done: int, total: int, seconds: float) -> None:
        logger.info("%d of %d images scored (%.0f images/s)", done, total,
                    done / max(seconds, 1e-9))

    return score_images(champion, root, files, images, formats, predictions,
                        ReviewArea(review_dir), threshold, progress)


def _metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", text)


def _default_output(params: Params, version: str) -> Path:
    """<UTC time>-v<version>-<random>.parquet: two runs in one second keep both files."""
    return params.scoring_output_dir / (
        f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-v{version}-{secrets.token_hex(3)}.parquet")


def _remove_leftovers(output_folder: Path) -> list[str]:
    """What killed runs left: Parquet temporaries beside the output untouched for an hour,
    and this user's staging folders older than a day. Returns what was removed."""
    now, removed = time.time(), []
    for path in output_folder.glob(".*.tmp") if output_folder.is_dir() else []:
        if PARQUET_TEMPORARY.fullmatch(path.name) and \
                now - path.lstat().st_mtime > STALE_TEMPORARY_S:
            path.unlink(missing_ok=True)
            removed.append(str(path))
    for path in Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*"):
        found = path.lstat()
        if path.is_dir() and not path.is_symlink() and found.st_uid == os.getuid() and \
                now - found.st_mtime > STALE_STAGING_S:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def _end_runs_of(crashed: list[str], experiment_id: str, tracking_uri: str) -> None:
    """The MLflow runs of flow runs reported crashed: killed with them, never ended."""
    names = {f"score-{name}" for name in crashed}
    client = mlflow.MlflowClient(tracking_uri)
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
        if run.info.run_name in names:
            client.set_terminated(run.info.run_id, status="KILLED")


def _source_tag(location: str) -> str:
    return "(withheld: may carry a credential)" if may_carry_secret("scoring.source",
                                                                    location) else location


def _record_drift(report: DriftReport | None, why_not: str) -> str:
    """Tags and metrics of the drift report (None: not measured, `why_not`); its status.
    A failing measure is a warning: scoring goes on."""
    if report is None:
        status = "disabled" if why_not == DISABLED else "skipped"
        mlflow.set_tag("drift_status", status)
        if status == "skipped":
            mlflow.set_tag("drift_warning", f"drift check skipped: {why_not}")
        return status
    mlflow.set_tag("drift_status", report.status)
    if report.status == FAIL:
        mlflow.set_tag("drift_warning", report.describe()[:5000])
    mlflow.log_metrics({"drift_" + _metric_name(m.name.replace(" ", "_")): m.statistic
                        for m in report.measures})
    return report.status


def _with_predicted_classes(report: DriftReport) -> DriftReport:
    """The report with its class distribution named for what it is here: predicted."""
    measures = [replace(m, name=PREDICTED) if m.name == "class distribution" else m
                for m in report.measures]
    return replace(report, measures=measures)


def _summary_markdown(summary: dict) -> str:
    rows = [f"| {label} | {count} |" for label, count in sorted(summary["labels"].items())]
    return "\n".join([
        f"# Batch scoring by champion v{summary['model_version']}", "",
        f"**Source:** `{summary['source']}`  ", f"**Predictions:** `{summary['output']}`  ",
        f"**Images scored:** {summary['images']} ({summary['skipped']} skipped), "
        f"{summary['images_per_second']:.0f} images/s  ",
        f"**Drift:** `{summary['drift_status']}`  ",
        f"**Sent for review:** {summary['sent_for_review']} (top probability below "
        f"{summary['confidence_threshold']}) to `{summary['review_dir']}`; "
        f"{summary['already_sent']} sent before, {summary['review_failed']} failed", "",
        "| predicted label | images |", "|---|---|", *rows])


def _listed(images_at, max_bytes: int) -> tuple[list, list[tuple[str, str]]]:
    """(the images of the source to read, (location, why) of those refused unread)."""
    listed = images_at.list()
    if not listed:
        raise ValueError(f"{_source_tag(images_at.url)}: no images "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))}) to score")
    skipped = [(image.location, f"{image.size} bytes, over validation.max_bytes {max_bytes}")
               for image in listed if image.size > max_bytes]
    if len(skipped) == len(listed):
        raise ValueError(f"{_source_tag(images_at.url)}: no image to score; "
                         f"{skipped[0][0]}: {skipped[0][1]}")
    return [image for image in listed if image.size <= max_bytes], skipped


def _drift_before_predicting(reference, scored, params: Params, name: str) -> None:
    """Sizes and brightness: known before predicting, and a warning tag at once."""
    before = compare(reference, scored, params.drift, name)
    mlflow.set_tag("drift_status", before.status)
    if before.status == FAIL:
        mlflow.set_tag("drift_warning", before.describe()[:5000])
    (get_run_logger().warning if before.status == FAIL else get_run_logger().info)(
        "Before predicting: %s", before.describe())


def _drift_after_predicting(reference, scored, params: Params, name: str, out: Path
                            ) -> DriftReport:
    """The whole report, the predicted labels' class distribution with it, uploaded."""
    report = _with_predicted_classes(compare(reference, scored, params.drift, name))
    upload_task([(path, "drift") for path in write_drift(
        report, reference, scored, out / "drift", current_name="scored (predicted)")])
    (get_run_logger().warning if report.status == FAIL else get_run_logger().info)(
        report.describe())
    return report


def _warn_review(result: ScoredImages, review_dir: str) -> None:
    """A review area that refuses copies is a warning: the predictions are kept."""
    warning = (f"{result.review_failed} of {result.low_confidence} low-confidence images "
               f"could not be copied to {review_dir}; the first: {result.review_problem}")
    mlflow.set_tag("review_warning", warning[:5000])
    get_run_logger().warning(warning)


def _log_results(summary: dict, result: ScoredImages, skipped: list, target: Path,
                 out: Path) -> None:
    total = summary["images"]
    mlflow.log_metrics({
        "images": total, "skipped_images": len(skipped),
        "images_per_second": summary["images_per_second"],
        "low_confidence_share": summary["low_confidence_share"],
        "sent_for_review": len(result.review_copies), "already_sent": result.already_sent,
        "review_failed": result.review_failed,
        **{_metric_name(f"predicted_share_{label}"): count / max(total, 1)
           for label, count in summary["labels"].items()}})
    details = out / "predictions_summary.json"
    details.write_text(json.dumps({**summary, "skipped_images": [
        {"path": where, "reason": why} for where, why in skipped[:1000]],
        "review_copies": result.review_copies[:1000]}, indent=2))
    upload_task([(details, "predictions")])
    if target.stat().st_size < MAX_PARQUET_ARTIFACT_BYTES:
        upload_task([(target, "predictions")])
    else:
        mlflow.set_tag("predictions_path", str(target))
    create_markdown_artifact(key="scoring-summary", markdown=_summary_markdown(summary),
                             description=f"Batch scoring by champion v{summary['model_version']}")


@flow(name="score", log_prints=True, timeout_seconds=12 * HOURS,
      on_failure=[report_failure], on_crashed=[report_failure], on_running=[record_process])
def score(source: str | None = None, params_path: str = DEFAULT_PARAMS,
          output: str | None = None) -> dict:
    """Score the images of `source` (a folder or s3://bucket/prefix; default
    scoring.source) with the champion into `output` (default
    scoring.output_dir/<UTC time>-v<version>-<random>.parquet). Returns the run's summary."""
    logger = get_run_logger()
    params = load_params(params_path)
    crashed = report_unreported_crashes(params, "score")
    for name in crashed:
        logger.warning("An earlier run crashed and is now reported: %s", name)
    location = source or params.scoring_source
    if location is None:
        raise ValueError("nothing to score: give a folder or s3:// prefix, or set "
                         "scoring.source in params.yaml")
    images_at = open_source(location)
    shown = _source_tag(images_at.url)
    listed, skipped = _listed(images_at, params.validation.max_bytes)
    champion = champion_task(params)
    target = Path(output).absolute() if output else _default_output(params, champion.version)
    for leftover in _remove_leftovers(target.parent):
        logger.warning("Removed %s, left by a killed run", leftover)
    model_name = params.registry.model_name
    experiment_id = scoring_experiment(params)
    if crashed:
        _end_runs_of(crashed, experiment_id, params.tracking_uri)
    logger.info("Scoring %d images of %s with %s v%s", len(listed), shown, model_name,
                champion.version)

    with mlflow.start_run(experiment_id=experiment_id,
                          run_name=f"score-{flow_run.get_name() or 'local'}") as run, \
            tempfile.TemporaryDirectory(prefix=STAGING_PREFIX) as scratch, \
            images_at.stage(listed) as staged:
        out = Path(scratch)
        mlflow.set_tags({"model_name": model_name, "model_version": champion.version,
                         "model_uri": f"models:/{model_name}/{champion.version}",
                         "data_version": champion.data_version, "champion_run_id": champion.run_id,
                         "source": shown, "prefect_flow_run_id": str(flow_run.get_id())})
        mlflow.log_params({key: value for key, value in params.loggable().items()
                           if key.split(".")[0] in LOGGED_SECTIONS})

        facts = facts_task(staged.root, staged.files, params.validation.max_side)
        reasons = [staged.gone.get(name) or skip_reason(row)
                   for name, row in zip(staged.files, facts.to_dict("records"), strict=True)]
        skipped += [(image.location, reason)
                    for image, reason in zip(listed, reasons, strict=True) if reason]
        keep = [reason is None for reason in reasons]
        if not any(keep):
            raise ValueError(f"{shown}: none of its {len(listed)} images can be read; "
                             f"{listed[0].location}: {reasons[0]}")
        scored = facts[keep].reset_index(drop=True)
        images = [image for image, kept in zip(listed, keep, strict=True) if kept]
        reference, why_not = (champion_facts_task(champion, params, out) if params.drift.enabled
                              else (None, DISABLED))
        name = f"the training data of champion v{champion.version}"
        if reference is not None:
            _drift_before_predicting(reference, scored, params, name)

        predictions = PredictionsFile(target, champion.class_names, model_name,
                                      champion.version)
        try:
            result = score_task(champion, staged.root, list(scored["path"]), images,
                                list(scored["format"]), predictions, params.review_dir,
                                params.feedback.confidence_threshold)
            if not result.labels:
                raise ValueError(f"{shown}: none of its {len(listed)} images could be "
                                 f"predicted; {images[0].location}: {result.skipped[0]}")
            predictions.close()
        except BaseException:
            predictions.discard()
            raise
        skipped += [(images[index].location, why) for index, why in result.skipped.items()]
        scored = scored.drop(index=list(result.skipped)).reset_index(drop=True)
        if result.review_failed:
            _warn_review(result, params.review_dir)

        report = None
        if reference is not None:
            scored["label"] = result.labels
            report = _drift_after_predicting(reference, scored, params, name, out)
        elif why_not != DISABLED:
            logger.warning("Drift check skipped: %s", why_not)
        total, found = len(result.labels), Counter(result.labels)
        summary = {
            "source": shown, "images": total, "skipped": len(skipped),
            "model_name": model_name, "model_version": champion.version,
            "data_version": champion.data_version, "output": str(target),
            "drift_status": _record_drift(report, why_not),
            "sent_for_review": len(result.review_copies), "already_sent": result.already_sent,
            "review_failed": result.review_failed, "review_dir": params.review_dir,
            "confidence_threshold": params.feedback.confidence_threshold,
            "low_confidence_share": result.low_confidence / max(total, 1),
            "images_per_second": total / max(result.seconds, 1e-9),
            "labels": {label: found[label] for label in champion.class_names},
            "run_id": run.info.run_id, "experiment_id": experiment_id,
        }
        _log_results(summary, result, skipped, target, out)
        logger.info("%d images scored into %s (drift: %s); %d sent for review to %s (%d sent "
                    "before)", total, target, summary["drift_status"],
                    summary["sent_for_review"], params.review_dir, result.already_sent)
        return summary
