"""Score a model on the test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from visionops.core.metrics import Evaluation, evaluate_model
from visionops.core.pipeline import PIXELS


@task(name="Evaluate on test split", cache_policy=NO_CACHE, timeout_seconds=60 * 60)
def evaluate_task(model, data_dir: Path, test_paths: list[str], y_test: np.ndarray,
                  class_names: list[str], model_class_names: list[str] | None = None,
                  contract: str = PIXELS) -> Evaluation:
    return evaluate_model(model, data_dir, test_paths, y_test, class_names, model_class_names,
                          contract)
