"""Validate an image folder: a table of per-image facts checked by a
great-expectations suite. Any failure names the offending files."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path

import pandas as pd

from visionops.core.config import ValidationParams
from visionops.core.images import class_names, facts_table, image_file_chunks

MAX_FILES_IN_MESSAGE = 20
DOCS_SITE = "visionops"
CHUNK_SIZE = 2000  # files per worker task
PARALLEL_MIN_FILES = 20_000  # below this, starting worker processes costs more than it saves


@dataclass
class CheckFailure:
    check: str
    offenders: list[str]  # "path: reason" for files, "label/: reason" for class folders


@dataclass
class ValidationReport:
    data_dir: str
    n_images: int
    n_classes: int
    checks: list[str] = field(default_factory=list)
    failures: list[CheckFailure] = field(default_factory=list)
    data_docs: str | None = None  # great-expectations Data Docs index, when written

    @property
    def success(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"success": self.success, **asdict(self)}

    def describe(self) -> str:
        if self.success:
            return (f"{self.data_dir}: {self.n_images} images in {self.n_classes} classes "
                    f"passed {len(self.checks)} checks")
        lines = [f"{self.data_dir}: data validation failed"]
        for failure in self.failures:
            lines.append(f"  {failure.check}:")
            lines += [f"    {item}" for item in failure.offenders[:MAX_FILES_IN_MESSAGE]]
            if len(failure.offenders) > MAX_FILES_IN_MESSAGE:
                lines.append(f"    ... and {len(failure.offenders) - MAX_FILES_IN_MESSAGE} more")
        return "\n".join(lines)


class DataValidationError(Exception):
    def __init__(self, report: ValidationReport, facts: pd.DataFrame):
        super().__init__(report.describe())
        self.report = report
        self.facts = facts


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


def _with_duplicate_counts(facts: pd.DataFrame) -> pd.DataFrame:
    """Add how many labels share each file's content, and how many copies its label has."""
    table = facts.copy()
    table["labels_with_content"] = table.groupby("sha256")["label"].transform("nunique")
    table["copies_in_label"] = table.groupby(["label", "sha256"])["path"].transform("size")
    return table


def _others(table: pd.DataFrame, row, same_label: bool) -> str:
    twins = table[(table["sha256"] == row["sha256"]) & (table["path"] != row["path"])]
    twins = twins[(twins["label"] == row["label"]) == same_label]
    return ", ".join(twins["path"])


def _image_suite(rules: ValidationParams, table: pd.DataFrame):
    import great_expectations as gx

    expect = gx.expectations
    modes = [*rules.allowed_modes, *rules.convert_modes]
    return [
        ("inside the dataset folder",
         expect.ExpectColumnValuesToBeInSet(column="inside_root", value_set=[True]),
         lambda row: row["error"]),
        ("decodable", expect.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True]),
         lambda row: f"not a decodable image ({row['error']})"),
        ("allowed format",
         expect.ExpectColumnValuesToBeInSet(column="format", value_set=rules.allowed_formats),
         lambda row: f"format {row['format']} is not one of {rules.allowed_formats}"),
        ("allowed mode", expect.ExpectColumnValuesToBeInSet(column="mode", value_set=modes),
         lambda row: (f"mode {row['mode']} is not one of {modes} (list it in "
                      "validation.convert_modes to convert it)")),
        *[(f"{side} within bounds",
           expect.ExpectColumnValuesToBeBetween(column=side, min_value=rules.min_side,
                                                max_value=rules.max_side),
           lambda row, side=side: (f"{side} {row[side]} px is outside "
                                   f"[{rules.min_side}, {rules.max_side}]"
                                   + (" (not decoded)" if row["decodable"] is None else "")))
          for side in ("width", "height")],
        ("not blank", expect.ExpectColumnValuesToBeInSet(column="constant", value_set=[False]),
         lambda row: "blank: every pixel has the same value"),
        ("one label per content",
         expect.ExpectColumnValuesToBeInSet(column="labels_with_content", value_set=[1]),
         lambda row: (f"label conflict: same content as {_others(table, row, False)}")),
        ("no duplicates within a label",
         expect.ExpectColumnValuesToBeInSet(column="copies_in_label", value_set=[1]),
         lambda row: f"duplicate of {_others(table, row, True)}"),
    ]


def _class_suite(rules: ValidationParams):
    import great_expectations as gx

    expect = gx.expectations
    checks = [
        ("minimum images per class",
         expect.ExpectColumnValuesToBeBetween(column="images",
                                              min_value=rules.min_images_per_class),
         lambda row: f"{row['images']} images, fewer than {rules.min_images_per_class}"),
    ]
    if rules.expected_classes is not None:
        checks += [
            ("expected classes present",
             expect.ExpectColumnValuesToBeInSet(column="has_folder", value_set=[True]),
             lambda row: "expected class has no folder"),
            ("only expected classes",
             expect.ExpectColumnValuesToBeInSet(column="expected", value_set=[True]),
             lambda row: f"not one of the expected classes {rules.expected_classes}"),
        ]
    if rules.max_class_imbalance is not None:
        checks.append((
            "class balance",
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


def _run_suite(context, name: str, table: pd.DataFrame, key: str, checks, fmt_key,
               with_docs: bool) -> list[CheckFailure]:
    import great_expectations as gx

    batch_definition = (context.data_sources.add_pandas(name).add_dataframe_asset(name)
                        .add_batch_definition_whole_dataframe(name))
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for _, expectation, _ in checks:
        suite.add_expectation(expectation)
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
    failures = []
    for (check, _, reason), outcome in zip(checks, result.results, strict=True):
        if outcome.success:
            continue
        keys = sorted({item[key] for item in outcome.result.get("unexpected_index_list") or []})
        failures.append(CheckFailure(check, [f"{fmt_key(k)}: {reason(by_key.loc[k])}"
                                             for k in keys]))
    return failures


def validate_facts(data_dir: Path, facts: pd.DataFrame, rules: ValidationParams,
                   docs_dir: Path | None = None) -> ValidationReport:
    """Run the suites; with `docs_dir`, also write their Data Docs (HTML) there."""
    classes = class_table(data_dir, facts, rules)
    images = _with_duplicate_counts(facts)
    report = ValidationReport(data_dir=str(data_dir), n_images=len(facts),
                              n_classes=int(classes["has_folder"].sum()))
    image_checks, class_checks = _image_suite(rules, images), _class_suite(rules)
    report.checks = [name for name, _, _ in image_checks + class_checks]
    if classes.empty or facts.empty:
        report.failures.append(CheckFailure(
            "images present", [f"{data_dir}: no images found in <label>/<image> folders"]))
        return report
    context = _context(docs_dir)
    with_docs = docs_dir is not None
    report.failures += _run_suite(context, "images", images, "path", image_checks, str,
                                  with_docs)
    report.failures += _run_suite(context, "classes", classes, "label", class_checks,
                                  lambda k: f"{k}/", with_docs)
    if with_docs:
        report.data_docs = str(docs_dir / "index.html")
    return report


def validate_dataset(data_dir: Path, rules: ValidationParams, docs_dir: Path | None = None,
                     facts: pd.DataFrame | None = None) -> tuple[ValidationReport, pd.DataFrame]:
    """Validate a folder; `facts` when its facts table was already computed elsewhere
    (on Dask, see flows/facts.py)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: dataset folder not found")
    if facts is None:
        facts = collect_facts(data_dir, rules.max_side)
    return validate_facts(data_dir, facts, rules, docs_dir), facts


def write_report(report: ValidationReport, facts: pd.DataFrame, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path, facts_path = out_dir / "validation.json", out_dir / "image_facts.csv"
    report_path.write_text(json.dumps(report.to_dict(), indent=2))
    facts.to_csv(facts_path, index=False)
    return [report_path, facts_path]

