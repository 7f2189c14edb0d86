"""Split the validated images into the file lists training reads."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from visionops.core.config import DataParams, SplitParams
from visionops.core.split import PreparedData, assign_splits, prepare_data


@task(name="Split and preprocess", cache_policy=NO_CACHE, timeout_seconds=60 * 60)
def preprocess_task(data_dir: Path, facts: pd.DataFrame, data: DataParams, split: SplitParams
                    ) -> tuple[pd.DataFrame, PreparedData]:
    table = assign_splits(facts, split)
    return table, prepare_data(data_dir, table, data)
