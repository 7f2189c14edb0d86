"""Ingest new labelled images from a landing area into the dataset.

Every landing file ends in exactly one state (`landing_states`):
- accepted: copied into `data/<label>/` under a content-addressed name (or already
  there with the same content and label), in the dataset version DVC records, and
  marked so in the landing area;
- quarantined: refused for a reason of its own (a defect validation finds, a symbolic
  link, a key that is not a plain `<label>/<file>`, a file over `validation.max_bytes`),
  kept with a reason file in `quarantine/<batch>/` (content only when it was safe to
  read) and marked with its reasons, so it never blocks a later batch;
- pending: not marked, so a later ingest takes it again. That is a file of a class that
  is still too small (it waits for more images of its class), a file of a batch rejected
  because of other files, or a file that changed while it was read.

A batch with any quarantined file adds nothing to the dataset. Otherwise every file not
left pending is copied, `data/` is re-versioned with DVC and pushed, and only then are
the files that are really in `data/` marked accepted. Ingests into one project are
serialised by a lock file, `.visionops/ingest.lock`, and ingests from one landing area
by `landing_lock` (across machines with a Prefect server, and on this machine by a lock
file in ~/.cache/visionops); each stages in its own `.visionops/staging/<batch>`, and what
dead ingests left is removed only under the lock. A file whose quarantine copy, reason
file or marker cannot be written never blocks the others: it is quarantined with that
error among its reasons, or left pending with it.
Every step can be interrupted and run again: copies are atomic and content-addressed,
so nothing is lost and nothing is counted twice.
No symbolic link is followed on either side: in the landing area a link is a refused
entry (quarantined unread); in the project a linked `.visionops/`, staging folder, data
folder, class folder or quarantine folder stops the ingest (`ProjectFolderError`)
before anything is read or written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from visionops.core.config import Params
from visionops.io.dataset import DataVersion, record_dataset, recorded_files, version_dataset
from visionops.io.landing import (
    REFUSED,
    FileChanged,
    FileRefused,
    LandingError,
    LandingFile,
    encoded,
    fits,
    key_digest,
    key_problem,
    open_landing,
    suffix_problem,
)
from visionops.io.locks import LockTimeout, exclusive, file_lock
from visionops.io.validation import collect_facts, validate_facts

WORK = Path(".visionops")
PARTIAL_SUFFIX = ".partial"
LANDING_PREFIX = "landing:"  # marks the batch's files among the dataset's in reports
LOCK_TIMEOUT_S = 3600.0
# Class-level checks that more images of the class can pass: its files wait, pending.
WAITING_CHECKS = frozenset({"minimum images per class", "class balance"})
ACCEPTED, QUARANTINED, PENDING, LOST = "accepted", "quarantined", "pending", "lost"
LOGGER = logging.getLogger("visionops.ingest")


class ProjectFolderError(LandingError):
    """A folder of the project the ingest reads or writes (`.visionops/`, its staging,
    the data folder and its class folders, the quarantine) is a symbolic link or not a
    folder: it is never followed. (A LandingError, so whoever reports those reports it.)"""


class IngestBusy(RuntimeError):
    """Another ingest into this project, or from this landing area, held its lock for
    longer than the timeout."""


@dataclass
class IngestResult:
    source: str
    accepted: list[str] = field(default_factory=list)         # landing keys added
    already_present: list[str] = field(default_factory=list)  # same content, same label
    quarantined: dict[str, list[str]] = field(default_factory=dict)  # key -> reasons
    pending: dict[str, str] = field(default_factory=dict)  # key -> why a later run takes it
    quarantine_dir: str | None = None
    data_version: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        lines = [f"ingest from {self.source}: {len(self.accepted)} accepted, "
                 f"{len(self.already_present)} already in the dataset, "
                 f"{len(self.quarantined)} quarantined, {len(self.pending)} pending"]
        if self.quarantined:
            lines.append(f"  quarantined in {self.quarantine_dir}:")
            for key, reasons in self.quarantined.items():
                lines += [f"    {key}: {reason}" for reason in reasons]
        if self.pending:
            lines.append("  pending, taken again by a later ingest:")
            lines += [f"    {key}: {reason}" for key, reason in self.pending.items()]
        if self.data_version:
            lines.append(f"  data version (DVC md5): {self.data_version}")
        return "\n".join(lines)




def ingest(source: str, params: Params, push: bool = True,
           lock_timeout: float = LOCK_TIMEOUT_S) -> IngestResult:
    landing = open_landing(source)
    work = _real_folder(params.root / WORK, create=0o777)  # the umask narrows it
    if (work / "ingest.lock").is_symlink():
        raise ProjectFolderError(f"{work / 'ingest.lock'}: is a symbolic link; the ingest "
                                 "lock is never taken through one")
    with ingest_lock(work / "ingest.lock", lock_timeout), \
            landing_lock(landing.url, lock_timeout):
        _check_project_folders(params)
        _clean_dead_ingests(params)
        batch = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
        staging = _real_folder(work / "staging", create=0o700) / batch
        try:
            return _ingest_batch(landing, str(source), params, batch, staging, push)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _ingest_batch(landing, source: str, params: Params, batch: str, staging: Path,
                  push: bool) -> IngestResult:
    result = IngestResult(source=source)
    handled = landing.handled()
    files = {f.key: f for f in landing.list() if (f.key, f.fingerprint) not in handled}
    if not files:
        return result
    max_bytes = params.validation.max_bytes
    refused = {key: [reason] for key, file in files.items()
               if (reason := refusal(file, max_bytes))}
    _private_folder(staging)
    for key in sorted(set(files) - set(refused)):
        _private_folder(staging / files[key].label)
        try:
            landing.fetch(files[key], staging / key, max_bytes)
        except FileRefused as exc:
            refused[key] = [str(exc)]
        except FileChanged as exc:
            result.pending[key] = f"{exc}; taken by the next run"
    staged = collect_facts(staging, params.validation.max_side)
    existing = (collect_facts(params.data_dir, params.validation.max_side)
                if params.data_dir.is_dir() else staged.iloc[0:0])
    plan = plan_batch(staged, existing, lambda new: _judge(params, new, existing))
    result.pending.update(plan.waiting)

    defects = {**refused}
    for key, reasons in plan.defects.items():
        defects.setdefault(key, []).extend(reasons)
    if defects:
        folder, unmarked = _quarantine(params, batch, staging, landing,
                                       [files[key] for key in defects], defects)
        result.quarantine_dir = str(folder)
        result.quarantined = {key: reasons for key, reasons in sorted(defects.items())
                              if key not in unmarked}
        result.pending.update(unmarked)
        others = ", ".join(sorted(defects))
        for key in sorted(staged["path"]):
            if key not in defects:
                result.pending[key] = f"batch rejected because of other files: {others}"
        return result

    _accept(landing, params, batch, staging, plan,
            {key: files[key] for key in staged["path"]}, result, push)
    return result


def refusal(file: LandingFile, max_bytes: int) -> str | None:
    """Why a listed file is refused before it is read, or None."""
    return (file.problem or key_problem(file.key) or suffix_problem(file.key)
            or (f"{file.size} bytes, more than validation.max_bytes {max_bytes}"
                if file.size > max_bytes else None))


def _accept(landing, params: Params, batch: str, staging: Path, plan: BatchPlan,
            files: dict[str, LandingFile], result: IngestResult, push: bool) -> None:
    """Copy the batch into data/, version it, then mark each file that really is there."""
    where = dict(plan.in_dataset)  # (label, sha256) -> path relative to data/
    for row in plan.copy.itertuples():
        name = f"{row.label}/{content_name(row.sha256, row.path)}"
        if not (params.data_dir / name).exists():
            _copy_atomically(staging / row.path, params.data_dir / name)
        where[(row.label, row.sha256)] = name
    if not plan.accept:
        return
    version: DataVersion = version_dataset(params.data_dir, push=push)
    result.data_version = version.md5
    if push:  # where a fresh worker finds it, before any landing file says "accepted"
        record_dataset(params.data_dir, params.ingest.git_remote, params.ingest.git_branch)
    copied = set(plan.copy["path"])
    for key, (label, sha256) in sorted(plan.accept.items()):
        name = where.get((label, sha256))
        if name is None or _sha256(params.data_dir / name) != sha256:
            result.pending[key] = "not found in data/ after the copy; taken by the next run"
            continue
        try:
            landing.mark(files[key], {"status": ACCEPTED, "batch": batch,
                                      "data_version": version.md5, "label": label,
                                      "sha256": sha256, "path": name})
        except (OSError, LandingError) as exc:
            result.pending[key] = (f"in data/ as {name}, but its marker could not be "
                                   f"written: {exc}; taken by the next run")
            LOGGER.warning("%s: %s", landing.describe(files[key]), result.pending[key])
            continue
        (result.accepted if key in copied else result.already_present).append(key)


def landing_states(source: str, params: Params) -> dict[str, str]:
    """The state of every file in the landing area: accepted (its marker names a file
    in the dataset version `data.dvc` records), quarantined (with reasons), pending (no
    marker yet), or lost (any other marker: the file is in no state it should be)."""
    landing = open_landing(source)
    markers = landing.markers()
    in_version = dataset_files(params.data_dir)
    return {file.key: file_state(markers.get((file.key, file.fingerprint)), in_version)
            for file in landing.list()}


# --- adapters: the lock, the project's folders, DVC's listing ---------------------------

@contextlib.contextmanager
def ingest_lock(path: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold this project's ingest lock on `path` (waiting up to `timeout` seconds); the
    kernel releases it when the holder dies, even by SIGKILL."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(path, timeout))
        except LockTimeout as busy:
            raise IngestBusy(f"{path}: another ingest ({busy.holder or 'unknown'}) still "
                             f"holds the lock after {timeout:.0f} s") from None
        yield


@contextlib.contextmanager
def landing_lock(url: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[list[str]]:
    """Hold the lock of the landing area `url` (`open_landing(...).url`), so that two
    ingests from it never run at once: with a Prefect server a global concurrency limit
    (every machine), and always a lock file of this machine (two clones here, server or
    not). Yields where it is held; raises IngestBusy after waiting `timeout` seconds."""
    with contextlib.ExitStack() as held:
        try:
            where = held.enter_context(
                exclusive(landing_lock_name(url), landing_lock_path(url), timeout))
        except LockTimeout as busy:
            raise IngestBusy(f"{url}: another ingest from this landing area still holds "
                             f"{busy.where} after {timeout:.0f} s") from None
        yield where


def landing_lock_path(url: str) -> Path:
    return Path.home() / ".cache" / "visionops" / f"ingest-{key_digest(url)[:16]}.lock"


def _real_folder(path: Path, create: int | None = None) -> Path:
    """`path`, refused when it is a symbolic link or not a folder (it is never followed);
    with `create`, made with that mode when missing (its parent must exist) and set to
    it when it is private (0o700). Missing and not to be created: returned unchecked."""
    if create is not None:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=create)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        if create is None:
            return path
        raise
    except OSError as exc:
        if path.is_symlink():
            raise ProjectFolderError(f"{path}: is a symbolic link (to {os.readlink(path)}); "
                                     "the ingest never reads or writes through one") from exc
        if path.exists() and not path.is_dir():
            raise ProjectFolderError(f"{path}: is not a folder") from exc
        raise
    try:
        if create == 0o700:
            os.fchmod(fd, create)
    finally:
        os.close(fd)
    return path


def _configured_folder(root: Path, configured: Path) -> list[Path]:
    """The levels of a folder params name that the project owns: every level below the
    project for a relative path, the folder itself for an absolute one."""
    if configured.is_absolute():
        return [configured]
    return [root.joinpath(*configured.parts[:depth])
            for depth in range(1, len(configured.parts) + 1)]


def _check_project_folders(params: Params) -> None:
    """Refuse, before anything is read or written, a data folder, class folder or
    quarantine folder that is a symbolic link: the ingest would write through it."""
    for level in [*_configured_folder(params.root, params.data.path),
                  *_configured_folder(params.root, params.ingest.quarantine_dir)]:
        _real_folder(level)
    data = params.root / params.data.path
    if data.is_dir():
        for entry in os.scandir(data):
            if entry.is_symlink():
                _real_folder(Path(entry.path))


def _clean_dead_ingests(params: Params) -> None:
    """Under the lock no other ingest runs: every staging folder and partial copy left
    is from a dead one."""
    shutil.rmtree(_real_folder(params.root / WORK / "staging"), ignore_errors=True)
    if params.data_dir.is_dir():
        for partial in params.data_dir.glob(f"*/*{PARTIAL_SUFFIX}"):
            partial.unlink()


def _private_folder(path: Path) -> Path:
    """`path` as a folder only its owner reads, created when missing; never a link."""
    return _real_folder(path, create=0o700)


def _copy_atomically(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
    shutil.copyfile(source, partial)
    os.replace(partial, target)


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _quarantine(params: Params, batch: str, staging: Path, landing,
                files: list[LandingFile], reasons: dict[str, list[str]]
                ) -> tuple[Path, dict[str, str]]:
    """Keep each file (when it was read) with its reasons, readable by the owner only,
    and mark it. A file never read (a link, too big, an odd key) gets its reasons only.
    One file's error never stops the others: a copy or reason file that cannot be written
    adds the error to its reasons; a marker that cannot be written leaves the file
    pending. Returns the folder and the files left pending (key -> why)."""
    quarantine = params.root / params.ingest.quarantine_dir
    quarantine.parent.mkdir(parents=True, exist_ok=True)
    folder = _private_folder(_private_folder(quarantine) / batch)
    unmarked: dict[str, str] = {}
    for file in files:
        try:
            _keep(folder, staging, file.key, reasons[file.key])
        except (OSError, LandingError) as exc:
            reasons[file.key].append(f"its copy or reason file could not be written in "
                                     f"{folder}: {exc}")
            LOGGER.warning("%s: %s", landing.describe(file), reasons[file.key][-1])
        try:
            landing.mark(file, {"status": QUARANTINED, "batch": batch,
                                "reasons": reasons[file.key]})
        except (OSError, LandingError) as exc:
            unmarked[file.key] = (f"quarantined ({'; '.join(reasons[file.key])}), but its "
                                  f"marker could not be written: {exc}; taken by the next run")
            LOGGER.warning("%s: %s", landing.describe(file), unmarked[file.key])
    return folder, unmarked


def _keep(folder: Path, staging: Path, key: str, reasons: list[str]) -> None:
    copy, reason = quarantine_names(key)
    if copy is not None and (staging / copy).is_file():
        _private_folder((folder / copy).parent)
        fd = os.open(folder / copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                     0o600)
        with open(staging / copy, "rb") as staged, os.fdopen(fd, "wb") as kept:
            shutil.copyfileobj(staged, kept)
    reason_file = folder / reason
    _private_folder(reason_file.parent)
    fd = os.open(reason_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as out:
        out.write(f"landing key: {json.dumps(key)}\n" + "\n".join(reasons) + "\n")


def dataset_files(data_dir: Path) -> set[str]:
    """Paths (relative to `data_dir`) in the dataset version `<data>.dvc` records, as DVC
    lists it; the files in `data_dir` when it has no `.dvc` file or the local cache lacks
    that version's listing."""
    recorded = recorded_files(data_dir)
    if recorded is not None:
        return recorded
    if not data_dir.is_dir():
        return set()
    return {p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*") if p.is_file()}


# --- pure logic ------------------------------------------------------------------------

def landing_lock_name(url: str) -> str:
    name = f"ingest-{url}"
    return name if len(name) <= 100 else f"ingest-{key_digest(url)[:16]}"


def quarantine_names(key: str) -> tuple[str | None, str]:
    """Where a quarantined file's copy (None: a key not read as `<label>/<file>` is never
    kept) and its reason file go, relative to the batch's quarantine folder. A reason file
    whose name would be too long is named by the key's sha256; it names the key inside."""
    if key_problem(key) is None:
        folder, name = key.split("/")
        copy: str | None = key
    else:
        folder, name, copy = REFUSED, encoded(key), None
    reason = f"{name}.reason.txt"
    return copy, f"{folder}/{reason if fits(reason) else key_digest(key) + '.reason.txt'}"


def content_name(sha256: str, name: str) -> str:
    return f"{sha256[:20]}{Path(name).suffix.lower()}"


@dataclass
class BatchPlan:
    copy: pd.DataFrame               # staged rows to copy into data/ (first of each content)
    accept: dict[str, tuple[str, str]]   # key -> (label, sha256): marked accepted once there
    in_dataset: dict[tuple[str, str], str]  # (label, sha256) already in data/ -> its path
    defects: dict[str, list[str]]    # key -> reasons: quarantined
    waiting: dict[str, str]          # key -> reason: pending, its class is not ready


def plan_batch(staged: pd.DataFrame, existing: pd.DataFrame, judge) -> BatchPlan:
    """Sort the staged files. `judge(new)` validates the dataset as it would be with the
    rows `new` and returns (per-file defects, {label: [(check, reason)]} for its labels).
    A class failing only checks that more images can pass (`WAITING_CHECKS`) is held
    back, pending, and the rest judged again without it."""
    in_dataset = {(label, sha): path for label, sha, path
                  in zip(existing["label"], existing["sha256"], existing["path"], strict=True)
                  if isinstance(sha, str)}
    present = [(label, sha) in in_dataset
               for label, sha in zip(staged["label"], staged["sha256"], strict=True)]
    first_copy = ~staged.duplicated(["label", "sha256"]) & ~pd.Series(present, dtype=bool,
                                                                      index=staged.index)
    new = staged[first_copy]
    defects: dict[str, list[str]] = {}
    waiting: dict[str, str] = {}
    held: set[str] = set()
    candidates = new
    while len(candidates):
        file_defects, class_failures = judge(candidates)
        for key, reasons in file_defects.items():
            defects.setdefault(key, []).extend(reasons)
        keys_by_label = candidates.groupby("label")["path"].apply(list).to_dict()
        newly_held = set()
        for label, failures in class_failures.items():
            final = [reason for check, reason in failures if check not in WAITING_CHECKS]
            for key in keys_by_label.get(label, []):
                if final:
                    defects.setdefault(key, []).extend(final)
                else:
                    waiting[key] = ("; ".join(reason for _, reason in failures)
                                    + ": pending until more images of the class arrive")
            if not final:
                newly_held.add(label)
        if defects or not newly_held:
            break
        held |= newly_held
        candidates = candidates[~candidates["label"].isin(held)]
    copy = candidates if not defects else new.iloc[0:0]
    accept: dict[str, tuple[str, str]] = {}
    if not defects:
        for key, label, sha in zip(staged["path"], staged["label"], staged["sha256"],
                                   strict=True):
            if label in held and (label, sha) not in in_dataset:
                waiting.setdefault(key, f"its class {label}/ is pending")
            else:
                accept[key] = (label, sha)
    else:
        waiting = {}
    return BatchPlan(copy=copy, accept=accept, in_dataset=in_dataset, defects=defects,
                     waiting=waiting)


def _judge(params: Params, new: pd.DataFrame, existing: pd.DataFrame
           ) -> tuple[dict[str, list[str]], dict[str, list[tuple[str, str]]]]:
    """Validate the dataset as it would be with `new`: reasons per new file, and the
    class-level failures of the classes `new` adds to."""
    incoming = new.assign(path=LANDING_PREFIX + new["path"])
    combined = pd.concat([existing, incoming], ignore_index=True)
    report = validate_facts(params.data_dir, combined, params.validation)
    labels = set(new["label"])
    files: dict[str, list[str]] = {}
    classes: dict[str, list[tuple[str, str]]] = {}
    for failure in report.failures:
        for offender in failure.offenders:
            subject, _, reason = offender.partition(": ")
            if subject.startswith(LANDING_PREFIX):
                key = subject.removeprefix(LANDING_PREFIX)
                files.setdefault(key, []).append(f"{failure.check}: {reason}")
            elif subject.endswith("/") and subject[:-1] in labels:
                classes.setdefault(subject[:-1], []).append(
                    (failure.check, f"{failure.check}: class {subject} {reason}"))
    return files, classes


def file_state(marker: dict | None, in_version: set[str]) -> str:
    if marker is None:
        return PENDING
    if marker.get("status") == QUARANTINED:
        return QUARANTINED if marker.get("reasons") else LOST
    if marker.get("status") == ACCEPTED:
        path = marker.get("path")  # markers written before paths were recorded name none
        return ACCEPTED if path is None or path in in_version else LOST
    return LOST
