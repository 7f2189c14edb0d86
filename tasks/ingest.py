"""Ingest new labelled images from a landing area into the dataset.

New files are fetched into a staging folder and validated together with the accepted
dataset. A batch with any defect is quarantined whole (each file kept with a reason
file beside it) and the dataset is left as it was. An accepted batch is copied into
`data/<label>/` under content-addressed names, `data/` is re-versioned with DVC and
pushed, and only then are the landing files marked handled. Every step can be
interrupted and run again: copies are atomic and content-addressed, so nothing is
lost and nothing is counted twice.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from prefect import task

from tasks.retry import TRANSIENT_RETRIES
from tasks.validate import collect_facts, validate_facts
from tasks.version import DataVersion, version_dataset
from visionops.config import Params
from visionops.landing import LandingFile, open_landing

WORK = Path(".visionops")
PARTIAL_SUFFIX = ".partial"
LANDING_PREFIX = "landing:"  # marks the batch's files among the dataset's in reports


@dataclass
class IngestResult:
    source: str
    accepted: list[str] = field(default_factory=list)         # landing keys added
    already_present: list[str] = field(default_factory=list)  # same content, same label
    quarantined: dict[str, list[str]] = field(default_factory=dict)  # key -> reasons
    quarantine_dir: str | None = None
    data_version: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        lines = [f"ingest from {self.source}: {len(self.accepted)} accepted, "
                 f"{len(self.already_present)} already in the dataset, "
                 f"{len(self.quarantined)} quarantined"]
        if self.quarantined:
            lines.append(f"  batch quarantined in {self.quarantine_dir}:")
            for key, reasons in self.quarantined.items():
                lines += [f"    {key}: {reason}" for reason in reasons]
        if self.data_version:
            lines.append(f"  data version (DVC md5): {self.data_version}")
        return "\n".join(lines)


def content_name(sha256: str, name: str) -> str:
    return f"{sha256[:20]}{Path(name).suffix.lower()}"


def _clean_interrupted(params: Params) -> None:
    """Remove what an interrupted run left: staging folders and partial copies."""
    shutil.rmtree(params.root / WORK / "staging", ignore_errors=True)
    if params.data_dir.is_dir():
        for partial in params.data_dir.glob(f"*/*{PARTIAL_SUFFIX}"):
            partial.unlink()


def _copy_atomically(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
    shutil.copyfile(source, partial)
    os.replace(partial, target)


def _batch_defects(params: Params, staged: pd.DataFrame, existing: pd.DataFrame
                   ) -> dict[str, list[str]]:
    """Reasons per staged file, from validating the dataset as it would be with the batch."""
    incoming = staged.assign(path=LANDING_PREFIX + staged["path"])
    combined = pd.concat([existing, incoming], ignore_index=True)
    report = validate_facts(params.data_dir, combined, params.validation)
    labels = dict(zip(staged["path"], staged["label"], strict=True))
    reasons: dict[str, list[str]] = {}
    for failure in report.failures:
        for offender in failure.offenders:
            subject, _, reason = offender.partition(": ")
            if subject.startswith(LANDING_PREFIX):
                key = subject.removeprefix(LANDING_PREFIX)
                reasons.setdefault(key, []).append(f"{failure.check}: {reason}")
            elif subject.endswith("/"):  # a class folder the batch adds to
                for key, label in labels.items():
                    if label == subject[:-1]:
                        reasons.setdefault(key, []).append(
                            f"{failure.check}: class {subject} {reason}")
    return reasons


def _quarantine(params: Params, batch: str, staging: Path, files: list[LandingFile],
                reasons: dict[str, list[str]]) -> Path:
    folder = params.root / params.ingest.quarantine_dir / batch
    others = sorted(reasons)
    for file in files:
        target = folder / file.key
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(staging / file.key, target)
        own = reasons.get(file.key) or [f"batch rejected because of other files: "
                                        f"{', '.join(others)}"]
        target.with_name(target.name + ".reason.txt").write_text("\n".join(own) + "\n")
    return folder


def ingest(source: str, params: Params, push: bool = True) -> IngestResult:
    landing = open_landing(source)
    result = IngestResult(source=str(source))
    _clean_interrupted(params)
    handled = landing.handled()
    pending = [f for f in landing.list() if (f.key, f.fingerprint) not in handled]
    if not pending:
        return result

    batch = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    staging = params.root / WORK / "staging" / batch
    for file in pending:
        (staging / file.label).mkdir(parents=True, exist_ok=True)
        landing.fetch(file, staging / file.key)
    staged = collect_facts(staging, params.validation.max_side)
    existing = (collect_facts(params.data_dir, params.validation.max_side)
                if params.data_dir.is_dir() else staged.iloc[0:0])

    known = set(zip(existing["label"], existing["sha256"], strict=True))
    present = [(lbl, sha) in known for lbl, sha in zip(staged["label"], staged["sha256"],
                                                       strict=True)]
    first_copy = ~staged.duplicated(["label", "sha256"]) & ~pd.Series(present)
    new = staged[first_copy]
    result.already_present = sorted(set(staged["path"]) - set(new["path"]))

    reasons = _batch_defects(params, new, existing) if len(new) else {}
    if reasons:
        # The whole batch is kept in quarantine; only the defective files are marked
        # handled, so the others are taken by the next run once the defects are gone.
        folder = _quarantine(params, batch, staging, pending, reasons)
        result.quarantine_dir = str(folder)
        for file in pending:
            result.quarantined[file.key] = reasons.get(file.key, ["batch rejected"])
            if file.key in reasons:
                landing.mark(file, {"status": "quarantined", "batch": batch,
                                    "reasons": reasons[file.key]})
        shutil.rmtree(staging, ignore_errors=True)
        return result

    for row in new.itertuples():
        target = params.data_dir / row.label / content_name(row.sha256, row.path)
        if not target.exists():
            _copy_atomically(staging / row.path, target)
    version: DataVersion = version_dataset(params.data_dir, push=push)
    result.accepted = sorted(new["path"])
    result.data_version = version.md5
    for file in pending:  # only now, after the new version is pushed
        landing.mark(file, {"status": "accepted", "batch": batch,
                            "data_version": version.md5})
    shutil.rmtree(staging, ignore_errors=True)
    return result


@task(name="Ingest from landing area", **TRANSIENT_RETRIES)
def ingest_task(source: str, params: Params) -> IngestResult:
    return ingest(source, params)
