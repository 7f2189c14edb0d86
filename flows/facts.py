"""The per-image work of validation as a Prefect subflow whose chunks can run on Dask:
a LocalCluster by default, or any Dask scheduler (`compute.dask_address`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from visionops.core.config import ComputeParams
from visionops.core.images import facts_table, image_file_chunks

CHUNK_SIZE = 500


@task(name="Read image facts (chunk)", cache_policy=NO_CACHE, timeout_seconds=60 * 60)
def facts_chunk(root: Path, files: list[tuple[str, str]], max_side: int | None
                ) -> pd.DataFrame:
    return facts_table(root, files, max_side)


@flow(name="image-facts", timeout_seconds=60 * 60)
def image_facts_flow(data_dir: Path, max_side: int | None = None) -> pd.DataFrame:
    futures = facts_chunk.map(data_dir, image_file_chunks(data_dir, CHUNK_SIZE), max_side)
    return pd.concat([future.result() for future in futures], ignore_index=True)


def dask_facts(data_dir: Path, max_side: int | None, compute: ComputeParams) -> pd.DataFrame:
    """The same table as `visionops.io.validation.collect_facts`, computed on Dask."""
    from prefect_dask import DaskTaskRunner

    runner = (DaskTaskRunner(address=compute.dask_address) if compute.dask_address else
              DaskTaskRunner(cluster_kwargs={"n_workers": compute.dask_workers,
                                             "processes": compute.dask_processes,
                                             "threads_per_worker": 1}))
    return image_facts_flow.with_options(task_runner=runner)(data_dir, max_side)
