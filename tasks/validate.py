"""Validate the images before anything is trained (visionops.io.validation)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task

from visionops.core.config import ValidationParams
from visionops.io.validation import DataValidationError, ValidationReport, validate_dataset


@task(name="Validate images", timeout_seconds=60 * 60)
def validate_task(data_dir: Path, rules: ValidationParams, docs_dir: Path | None = None,
                  facts: pd.DataFrame | None = None) -> tuple[ValidationReport, pd.DataFrame]:
    """Stops the flow with DataValidationError before anything is trained."""
    report, facts = validate_dataset(data_dir, rules, docs_dir, facts)
    if not report.success:
        raise DataValidationError(report, facts)
    return report, facts
