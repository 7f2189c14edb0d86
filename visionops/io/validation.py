"""Validate an image folder: a table of per-image facts checked by a
great-expectations suite. Every finding names the offending files; validation.severity
decides whether it fails the run (fail), is reported while the run goes on (warn: the
files are left out of training, or all copies but one) or is repaired (fix)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Collection
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import pairwise, repeat
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from visionops.core.config import SeverityParams, ValidationParams
from visionops.core.images import class_names, facts_table, image_file_chunks

MAX_FILES_IN_MESSAGE = 20
DOCS_SITE = "visionops"
CHUNK_SIZE = 2000  # files per worker task
PARALLEL_MIN_FILES = 20_000  # below this, starting worker processes costs more than it saves
FAIL, FIX = "fail", "fix"  # validation.severity values; the third, warn, needs no name here
LEFT_OUT = "left out of training"


@dataclass
class CheckFailure:
    """One check's findings and the policy (validation.severity) applied to them."""

    check: str
    offenders: list[str]  # "path: reason" for files, "label/: reason" for class folders
    severity: str = FAIL  # fail | warn | fix
    action: str = ""      # what warn or fix did, e.g. "kept one copy"

    @property
    def policy(self) -> str:
        return f"{self.severity}: {self.action}" if self.action else self.severity


@dataclass
class ValidationReport:
    data_dir: str
    n_images: int
    n_classes: int
    checks: list[str] = field(default_factory=list)
    failures: list[CheckFailure] = field(default_factory=list)  # findings of `fail` checks
    warnings: list[CheckFailure] = field(default_factory=list)  # of `warn` and `fix` checks
    excluded: dict[str, str] = field(default_factory=dict)  # path: why it is not trained on
    policies: dict[str, str] = field(default_factory=dict)  # check: fail | warn | fix
    data_docs: str | None = None  # great-expectations Data Docs index, when written

    @property
    def success(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"success": self.success, **asdict(self)}

    def describe(self) -> str:
        if self.success:
            warned = f", {len(self.warnings)} with warnings" if self.warnings else ""
            lines = [f"{self.data_dir}: {self.n_images} images in {self.n_classes} classes "
                     f"passed {len(self.checks)} checks{warned}"]
        else:
            lines = [f"{self.data_dir}: data validation failed"]
        for finding in self.failures + self.warnings:
            lines.append(f"  {finding.check} [{finding.policy}]:")
            lines += [f"    {item}" for item in finding.offenders[:MAX_FILES_IN_MESSAGE]]
            if len(finding.offenders) > MAX_FILES_IN_MESSAGE:
                lines.append(f"    ... and {len(finding.offenders) - MAX_FILES_IN_MESSAGE} more")
        return "\n".join(lines)


class DataValidationError(Exception):
    def __init__(self, report: ValidationReport, facts: pd.DataFrame):
        super().__init__(report.describe())
        self.report = report
        self.facts = facts


class Check(NamedTuple):
    """One expectation and what its findings mean."""

    name: str
    policy: str  # the validation.severity field that decides: fail, warn or fix
    warn_action: str  # what warn does with the offenders (the report says it)
    leaves_out: bool  # whether the offenders (files, or a class's files) are not trained on
    expectation: object
    reason: Callable[[pd.Series], str]


def collect_facts(data_dir: Path, max_side: int | None = None, workers: int | None = None
                  ) -> pd.DataFrame:
    """The per-image facts table. Files are read in chunks, spread over `workers`
    processes (default: one per core) when there are enough to pay for starting them;
    only the compact table is kept, never the images."""
    chunks = image_file_chunks(data_dir, CHUNK_SIZE)
    workers = workers or os.cpu_count() or 1
    if workers == 1 or sum(map(len, chunks)) < PARALLEL_MIN_FILES:
        parts = [facts_table(data_dir, chunk, max_side) for chunk in chunks]
    else:
        # spawn, not fork: the parent may hold TensorFlow's threads.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(facts_table, repeat(data_dir), chunks, repeat(max_side)))
    return pd.concat(parts, ignore_index=True)


def class_table(data_dir: Path, facts: pd.DataFrame, rules: ValidationParams) -> pd.DataFrame:
    """One row per class: folders found (even empty ones) and expected classes (even
    missing ones), with their image counts and imbalance against the largest class."""
    present = set(class_names(data_dir)) | set(facts["label"])
    labels = sorted(present | set(rules.expected_classes or []))
    images = facts.groupby("label").size().reindex(labels, fill_value=0)
    return pd.DataFrame({
        "label": labels,
        "images": images.to_numpy(),
        "has_folder": [label in present for label in labels],
        "expected": [rules.expected_classes is None or label in rules.expected_classes
                     for label in labels],
        "imbalance": [images.max() / n if n else float("inf") for n in images],
    })


def duplicate_of(facts: pd.DataFrame, links: Collection[str] = ()) -> pd.Series:
    """For each extra copy of a file within its label (same label and sha256): the path
    of the copy kept, the first in path order (paths in `links` last); None elsewhere."""
    ordered = (facts.assign(is_link=facts["path"].isin(set(links)))
               .sort_values(["is_link", "path"], kind="stable"))
    kept = ordered.groupby(["label", "sha256"])["path"].transform("first")
    extra = kept.where(kept != ordered["path"]).reindex(facts.index).astype(object)
    return extra.where(extra.notna(), None)


def _hash_values(phashes: pd.Series) -> np.ndarray:
    return np.frombuffer(bytes.fromhex("".join(phashes)), dtype=">u8").astype(np.uint64)


def _run_ends(starts: np.ndarray) -> np.ndarray:
    """For each position of a sorted array, where the run of equal values it is in ends,
    given where runs start (a boolean per position)."""
    ends = np.append(np.flatnonzero(starts)[1:], len(starts))
    return ends[np.cumsum(starts) - 1]


def _banded_pairs(hashes: np.ndarray, groups: np.ndarray, max_distance: int) -> np.ndarray:
    """Pigeonhole: cut the 64 bits into max_distance + 1 bands; two hashes at most
    max_distance bits apart agree on a whole band. So, band by band, hashes are sorted by
    the band's value and then group, and each is compared only with the hashes of later
    groups sharing its value: the 1st, 2nd, ... after its group's run, while there are."""
    edges = np.linspace(0, 64, max_distance + 2).astype(int)
    found = []
    for low, high in pairwise(edges):
        band = (hashes >> np.uint64(low)) & np.uint64((1 << int(high - low)) - 1)
        order = np.lexsort((groups, band))
        band, group = band[order], groups[order]
        new_band = np.append(True, band[1:] != band[:-1])
        band_end = _run_ends(new_band)
        group_end = _run_ends(new_band | np.append(True, group[1:] != group[:-1]))
        step, active = 0, np.flatnonzero(group_end < band_end)
        while active.size:
            first, second = order[active], order[group_end[active] + step]
            near = np.bitwise_count(hashes[first] ^ hashes[second]) <= max_distance
            found.append(np.sort(np.stack([first[near], second[near]], axis=1), axis=1))
            step += 1
            active = active[group_end[active] + step < band_end[active]]
    return np.unique(np.concatenate(found or [np.empty((0, 2), np.int64)]), axis=0)


def _all_pairs(hashes: np.ndarray, groups: np.ndarray, max_distance: int) -> np.ndarray:
    """Every pair compared, a block of rows at a time (bounded memory)."""
    block = max(1, 4_000_000 // max(len(hashes), 1))
    found = []
    for start in range(0, len(hashes), block):
        rows = np.arange(start, min(start + block, len(hashes)))
        later = rows[:, None] < np.arange(len(hashes))
        near = ((np.bitwise_count(hashes[rows, None] ^ hashes[None, :]) <= max_distance)
                & (groups[rows, None] != groups[None, :]) & later)
        first, second = np.nonzero(near)
        found.append(np.stack([rows[first], second], axis=1))
    return np.concatenate(found or [np.empty((0, 2), np.int64)])


def near_pairs(hashes: np.ndarray, groups: np.ndarray, max_distance: int) -> np.ndarray:
    """Index pairs (i < j, sorted) of 64-bit hashes at most `max_distance` bits apart
    whose `groups` differ. Banding unless the bands get too narrow to narrow anything."""
    hashes, groups = np.asarray(hashes, dtype=np.uint64), np.asarray(groups)
    bands = max_distance + 1
    if bands / 2 ** (64 // bands) < 0.25:
        return _banded_pairs(hashes, groups, max_distance)
    return _all_pairs(hashes, groups, max_distance)


def near_duplicates(facts: pd.DataFrame, max_distance: int) -> pd.Series:
    """For each image that looks like an image under another label without being the
    same file (perceptual hashes at most `max_distance` bits apart, different sha256):
    the nearest, e.g. "2/b.png (3 bits apart) and 1 more"; None for the others. Blank
    images are left to their own check; facts without `phash` (older tables) find none."""
    found = pd.Series(None, index=facts.index, dtype=object)
    if "phash" not in facts.columns:
        return found
    usable = facts[facts["phash"].notna() & ~facts["constant"].eq(True)]
    # One entry per content and label: copies within a label are another check's.
    entries = (usable.sort_values("path", kind="stable")
               .drop_duplicates(["phash", "label", "sha256"]).reset_index(drop=True))
    if len(entries) < 2:
        return found
    hashes = _hash_values(entries["phash"])
    pairs = near_pairs(hashes, pd.factorize(entries["label"])[0], max_distance)
    shas = entries["sha256"].to_numpy()
    pairs = pairs[shas[pairs[:, 0]] != shas[pairs[:, 1]]]  # same bytes: a label conflict
    if not len(pairs):
        return found
    bits = np.bitwise_count(hashes[pairs[:, 0]] ^ hashes[pairs[:, 1]])
    links = pd.DataFrame({
        "entry": np.concatenate([pairs[:, 0], pairs[:, 1]]),
        "other": entries["path"].to_numpy()[np.concatenate([pairs[:, 1], pairs[:, 0]])],
        "bits": np.concatenate([bits, bits])}).sort_values(["entry", "bits", "other"])
    nearest = links.groupby("entry").agg(other=("other", "first"), bits=("bits", "first"),
                                         count=("other", "size"))
    texts = [f"{other} ({bits} bits apart)" + (f" and {count - 1} more" if count > 1 else "")
             for other, bits, count in nearest.itertuples(index=False)]
    key = ["phash", "label", "sha256"]
    by_entry = pd.Series(texts, index=pd.MultiIndex.from_frame(entries.loc[nearest.index, key]))
    found.loc[usable.index] = by_entry.reindex(
        pd.MultiIndex.from_frame(usable[key])).to_numpy()
    return found.where(found.notna(), None)


def _with_finding_columns(facts: pd.DataFrame, rules: ValidationParams) -> pd.DataFrame:
    """Add how many labels share each file's content, the copy each extra copy within a
    label duplicates, and the image under another label each image looks like."""
    table = facts.copy()
    table["labels_with_content"] = table.groupby("sha256")["label"].transform("nunique")
    table["duplicate_of"] = duplicate_of(table)
    table["near_duplicate_of"] = near_duplicates(table, rules.near_duplicate_distance)
    return table


def _others(table: pd.DataFrame, row) -> str:
    twins = table[(table["sha256"] == row["sha256"]) & (table["label"] != row["label"])]
    return ", ".join(twins["path"])


def _image_suite(rules: ValidationParams, table: pd.DataFrame) -> list[Check]:
    import great_expectations as gx

    expect = gx.expectations
    modes = [*rules.allowed_modes, *rules.convert_modes]
    return [
        Check("inside the dataset folder", "outside_dataset", LEFT_OUT, True,
              expect.ExpectColumnValuesToBeInSet(column="inside_root", value_set=[True]),
              lambda row: row["error"]),
        Check("decodable", "undecodable", LEFT_OUT, True,
              expect.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True]),
              lambda row: f"not a decodable image ({row['error']})"),
        Check("allowed format", "format", LEFT_OUT, True,
              expect.ExpectColumnValuesToBeInSet(column="format", value_set=rules.allowed_formats),
              lambda row: f"format {row['format']} is not one of {rules.allowed_formats}"),
        Check("allowed mode", "mode", LEFT_OUT, True,
              expect.ExpectColumnValuesToBeInSet(column="mode", value_set=modes),
              lambda row: (f"mode {row['mode']} is not one of {modes} (list it in "
                           "validation.convert_modes to convert it)")),
        *[Check(f"{side} within bounds", "size", LEFT_OUT, True,
                expect.ExpectColumnValuesToBeBetween(column=side, min_value=rules.min_side,
                                                     max_value=rules.max_side),
                lambda row, side=side: (f"{side} {row[side]} px is outside "
                                        f"[{rules.min_side}, {rules.max_side}]"
                                        + (" (not decoded)" if row["decodable"] is None else "")))
          for side in ("width", "height")],
        Check("not blank", "blank", LEFT_OUT, True,
              expect.ExpectColumnValuesToBeInSet(column="constant", value_set=[False]),
              lambda row: "blank: every pixel has the same value"),
        Check("one label per content", "label_conflict", "content left out of training", True,
              expect.ExpectColumnValuesToBeInSet(column="labels_with_content", value_set=[1]),
              lambda row: f"label conflict: same content as {_others(table, row)}"),
        Check("no duplicates within a label", "duplicate_in_label", "kept one copy", True,
              expect.ExpectColumnValuesToBeNull(column="duplicate_of"),
              lambda row: f"duplicate of {row['duplicate_of']}"),
        Check("no near-duplicates across labels", "near_duplicate_across_labels",
              "kept in training", False,
              expect.ExpectColumnValuesToBeNull(column="near_duplicate_of"),
              lambda row: f"near-duplicate of {row['near_duplicate_of']}"),
    ]


def _class_suite(rules: ValidationParams) -> list[Check]:
    import great_expectations as gx

    expect = gx.expectations
    checks = [
        Check("minimum images per class", "min_images_per_class", "class kept", False,
              expect.ExpectColumnValuesToBeBetween(column="images",
                                                   min_value=rules.min_images_per_class),
              lambda row: f"{row['images']} images, fewer than {rules.min_images_per_class}"),
    ]
    if rules.expected_classes is not None:
        checks += [
            Check("expected classes present", "expected_classes", "reported", False,
                  expect.ExpectColumnValuesToBeInSet(column="has_folder", value_set=[True]),
                  lambda row: "expected class has no folder"),
            Check("only expected classes", "expected_classes", "class left out of training", True,
                  expect.ExpectColumnValuesToBeInSet(column="expected", value_set=[True]),
                  lambda row: f"not one of the expected classes {rules.expected_classes}"),
        ]
    if rules.max_class_imbalance is not None:
        checks.append(Check(
            "class balance", "class_balance", "classes kept", False,
            expect.ExpectColumnValuesToBeBetween(column="imbalance",
                                                 max_value=rules.max_class_imbalance),
            lambda row: (f"{row['images']} images: the largest class is {row['imbalance']:.1f}x "
                         f"bigger, more than max_class_imbalance {rules.max_class_imbalance}")))
    return checks


def _context(docs_dir: Path | None):
    """An in-memory great-expectations context without progress bars; with `docs_dir`,
    its Data Docs site."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
    )

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    # What `gx.get_context(mode="ephemeral")` builds, plus great_expectations.yml's
    # `progress_bars` section (GE keeps it as this mapping when it reads the YAML).
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=True),
        progress_bars={"globally": False})
    context = gx.get_context(mode="ephemeral", project_config=config)
    if docs_dir is not None:
        context.add_data_docs_site(site_name=DOCS_SITE, site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    return context


def _run_suite(context, name: str, table: pd.DataFrame, key: str, checks: list[Check],
               fmt_key, with_docs: bool, severity: SeverityParams
               ) -> tuple[list[CheckFailure], dict[str, str]]:
    """The findings of `checks` on `table`, and the reasons of those whose subjects (paths
    or labels) are not trained on, by subject."""
    import great_expectations as gx

    batch_definition = (context.data_sources.add_pandas(name).add_dataframe_asset(name)
                        .add_batch_definition_whole_dataframe(name))
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    policies = [getattr(severity, check.policy) for check in checks]
    for check, policy in zip(checks, policies, strict=True):
        check.expectation.severity = "critical" if policy == FAIL else "warning"
        check.expectation.notes = f"validation.severity.{check.policy}: {policy}"
        suite.add_expectation(check.expectation)
    result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": [key]}
    if with_docs:
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch_definition, suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=name, validation_definitions=[validation], result_format=result_format,
            actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=[DOCS_SITE])]))
        run = checkpoint.run(batch_parameters={"dataframe": table})
        (result,) = run.run_results.values()
    else:
        result = batch_definition.get_batch(batch_parameters={"dataframe": table}).validate(
            suite, result_format=result_format)
    by_key = table.set_index(key, drop=False)
    findings, left_out = [], {}
    for check, policy, outcome in zip(checks, policies, result.results, strict=True):
        if outcome.success:
            continue
        keys = sorted({item[key] for item in outcome.result.get("unexpected_index_list") or []})
        reasons = [check.reason(by_key.loc[k]) for k in keys]
        offenders = [f"{fmt_key(k)}: {reason}" for k, reason in zip(keys, reasons, strict=True)]
        findings.append(CheckFailure(check.name, offenders, policy,
                                     "" if policy == FAIL else check.warn_action))
        if check.leaves_out:
            for k, reason in zip(keys, reasons, strict=True):
                left_out[k] = f"{left_out[k]}; {reason}" if k in left_out else reason
    return findings, left_out


def _exclusions(facts: pd.DataFrame, files: dict[str, str], classes: dict[str, str]
                ) -> dict[str, str]:
    """Why each file that must not be trained on is left out, in facts order."""
    reasons = dict(files)
    for path, label in zip(facts["path"], facts["label"], strict=True):
        if label in classes:
            reason = f"class {label}/: {classes[label]}"
            reasons[path] = f"{reasons[path]}; {reason}" if path in reasons else reason
    not_decoded = facts.loc[facts["decodable"].astype(str) != "True", "path"]
    for path in not_decoded:
        reasons.setdefault(path, "not decoded")
    return {path: reasons[path] for path in facts["path"] if path in reasons}


def validate_facts(data_dir: Path, facts: pd.DataFrame, rules: ValidationParams,
                   docs_dir: Path | None = None) -> ValidationReport:
    """Run the suites; with `docs_dir`, also write their Data Docs (HTML) there. Each
    finding goes to `failures` or `warnings` by its check's validation.severity; the
    files not to train on go to `excluded`. Nothing is changed on disk."""
    classes = class_table(data_dir, facts, rules)
    images = _with_finding_columns(facts, rules)
    report = ValidationReport(data_dir=str(data_dir), n_images=len(facts),
                              n_classes=int(classes["has_folder"].sum()))
    image_checks, class_checks = _image_suite(rules, images), _class_suite(rules)
    report.checks = [check.name for check in image_checks + class_checks]
    report.policies = {check.name: getattr(rules.severity, check.policy)
                       for check in image_checks + class_checks}
    if classes.empty or facts.empty:
        report.failures.append(CheckFailure(
            "images present", [f"{data_dir}: no images found in <label>/<image> folders"]))
        return report
    context = _context(docs_dir)
    with_docs = docs_dir is not None
    image_findings, files = _run_suite(context, "images", images, "path", image_checks, str,
                                       with_docs, rules.severity)
    class_findings, labels = _run_suite(context, "classes", classes, "label", class_checks,
                                        lambda k: f"{k}/", with_docs, rules.severity)
    for finding in image_findings + class_findings:
        (report.failures if finding.severity == FAIL else report.warnings).append(finding)
    report.excluded = _exclusions(facts, files, labels)
    if with_docs:
        report.data_docs = str(docs_dir / "index.html")
    return report


def delete_extra_copies(data_dir: Path, facts: pd.DataFrame
                        ) -> tuple[pd.DataFrame, CheckFailure | None]:
    """validation.severity.duplicate_in_label `fix`: delete all copies of a file within
    its label but one (the first in path order; a real file before a link, so no link is
    left pointing at a deleted file). The facts without the deleted files, and what was
    done (None when there were no copies)."""
    copies = facts[facts["sha256"].notna() & facts.duplicated(["label", "sha256"], keep=False)]
    if copies.empty:
        return facts, None
    links = [path for path in copies["path"] if (data_dir / path).is_symlink()]
    extra = duplicate_of(copies, links).dropna()
    deleted, offenders = [], []
    for index, kept in extra.items():
        path = facts.at[index, "path"]
        try:
            (data_dir / path).unlink()  # a link itself, never what it points at
        except OSError as exc:
            offenders.append(f"{path}: duplicate of {kept}, not deleted "
                             f"({type(exc).__name__}: {exc})")
            continue
        deleted.append(index)
        offenders.append(f"{path}: deleted, a duplicate of {kept}")
    finding = CheckFailure("no duplicates within a label", offenders, FIX,
                           f"deleted {len(deleted)} extra cop{'y' if len(deleted) == 1 else 'ies'}")
    return facts.drop(index=deleted).reset_index(drop=True), finding


def validate_dataset(data_dir: Path, rules: ValidationParams, docs_dir: Path | None = None,
                     facts: pd.DataFrame | None = None) -> tuple[ValidationReport, pd.DataFrame]:
    """Validate a folder; `facts` when its facts table was already computed elsewhere
    (on Dask, see flows/facts.py). With duplicate_in_label `fix`, extra copies are deleted
    from the folder first. The facts come back with `excluded`: why a file must not be
    trained on, "" for the files training may use."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: dataset folder not found")
    if facts is None:
        facts = collect_facts(data_dir, rules.max_side)
    fixed = None
    if rules.severity.duplicate_in_label == FIX:
        facts, fixed = delete_extra_copies(data_dir, facts)
    report = validate_facts(data_dir, facts, rules, docs_dir)
    if fixed is not None:
        report.warnings.insert(0, fixed)
    return report, facts.assign(excluded=facts["path"].map(report.excluded).fillna(""))


def write_report(report: ValidationReport, facts: pd.DataFrame, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path, facts_path = out_dir / "validation.json", out_dir / "image_facts.csv"
    report_path.write_text(json.dumps(report.to_dict(), indent=2))
    facts.to_csv(facts_path, index=False)
    return [report_path, facts_path]
