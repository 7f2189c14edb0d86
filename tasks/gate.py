"""The promotion gate: challenger against champion (visionops.core.gate decides)."""

from __future__ import annotations

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from visionops.core.config import GateParams
from visionops.core.gate import GateDecision, decide


@task(name="Gate: challenger vs champion", cache_policy=NO_CACHE, timeout_seconds=10 * 60)
def gate_task(challenger: dict[str, float], champion: dict[str, float] | None,
              params: GateParams, champion_version: str | None = None,
              class_recall: dict[str, float] | None = None,
              paired_correct: tuple[np.ndarray, np.ndarray] | None = None) -> GateDecision:
    return decide(challenger, champion, params, champion_version, class_recall,
                  paired_correct)
