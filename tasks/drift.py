"""The new data against the champion's (visionops.core.drift measures)."""

from __future__ import annotations

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from visionops.core.config import DriftParams
from visionops.core.drift import FAIL, DataDriftError, DriftReport, compare


@task(name="Check data drift against the champion's data", cache_policy=NO_CACHE,
      timeout_seconds=30 * 60)
def drift_task(reference: pd.DataFrame, current: pd.DataFrame, params: DriftParams,
               reference_name: str) -> DriftReport:
    """Stops the flow with DataDriftError when any measure reaches the fail threshold."""
    report = compare(reference, current, params, reference_name)
    if report.status == FAIL:
        raise DataDriftError(report)
    return report
