"""Validation's per-image work on Dask (prefect-dask's DaskTaskRunner on a LocalCluster
of worker processes) gives exactly the single-process result."""

from __future__ import annotations

import shutil

from projects import make_project, write_params

from flows.facts import dask_facts
from flows.retrain import retrain
from visionops.core.config import ComputeParams, ValidationParams
from visionops.io.validation import collect_facts, validate_dataset

DASK = ComputeParams(runner="dask", dask_workers=2, dask_processes=True)


def test_dask_facts_and_report_equal_the_single_process_ones(tmp_path, prefect_server):
    root = make_project(tmp_path / "project", per_class=30)
    data = root / "data"
    (data / "1" / "broken.png").write_bytes(next((data / "1").iterdir()).read_bytes()[:50])
    shutil.copy(next((data / "0").iterdir()), data / "3" / "mislabelled.png")
    rules = ValidationParams()

    on_dask = dask_facts(data, rules.max_side, DASK)
    local = collect_facts(data, rules.max_side, workers=1)

    assert len(local) == 122 and on_dask.equals(local)
    dask_report, _ = validate_dataset(data, rules, facts=on_dask)
    local_report, _ = validate_dataset(data, rules)
    assert dask_report.to_dict() == local_report.to_dict()
    assert not dask_report.success


def test_retrain_with_the_dask_runner(tmp_path, prefect_server):
    root = make_project(tmp_path / "project")
    params = write_params(root, {"compute": {"runner": "dask", "dask_workers": 2}})

    summary = retrain(params_path=str(params))

    assert summary["decision"] == "first_champion"
