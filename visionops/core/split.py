"""Split and preprocess. The split is keyed on each image's content hash, so an
image keeps its split when the dataset grows; bucketing every class the same way
makes it stratified (each class is split in the configured proportions)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from visionops.core.config import DataParams, SplitParams

SPLITS = ("train", "val", "test")


def split_of(sha256: str, params: SplitParams) -> str:
    bucket = int(hashlib.sha256(f"{params.seed}:{sha256}".encode()).hexdigest()[:13], 16)
    position = bucket / 16**13
    if position < params.test_fraction:
        return "test"
    if position < params.test_fraction + params.val_fraction:
        return "val"
    return "train"


def assign_splits(facts: pd.DataFrame, params: SplitParams) -> pd.DataFrame:
    """The images training may use, with a `split` column: path, label, sha256, split.

    Left out: content under more than one label (a conflict validation reported, when
    its policy is `warn`), all copies but the first of a file repeated within a label,
    and files validation excluded (an `excluded` reason in the facts, when present)."""
    table = facts
    if "excluded" in table.columns:
        table = table[table["excluded"].fillna("").astype(str) == ""]
    table = table.sort_values("path", kind="stable")
    conflicting = table.groupby("sha256")["label"].transform("nunique") > 1
    table = table[~conflicting].drop_duplicates(["label", "sha256"], keep="first")
    table = table.sort_index()[["path", "label", "sha256"]].copy()
    table["split"] = [split_of(sha, params) for sha in table["sha256"]]
    return table


@dataclass
class SplitFiles:
    """One split: image paths relative to the dataset folder and integer labels."""

    paths: list[str]
    y: np.ndarray


@dataclass
class PreparedData:
    """The splits as files, read through visionops.core.pipeline at `image_size`."""

    data_dir: Path
    class_names: list[str]
    train: SplitFiles
    val: SplitFiles
    test: SplitFiles
    image_size: int
    channels: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    def files(self, split: str) -> list[Path]:
        return [self.data_dir / p for p in getattr(self, split).paths]


def class_names_of(table: pd.DataFrame) -> list[str]:
    return sorted(table["label"].unique())


def split_labels(table: pd.DataFrame, split: str, class_names: list[str]
                 ) -> tuple[list[str], np.ndarray]:
    """One split's paths and their labels as indices into `class_names`."""
    rows = table[table["split"] == split]
    index = {name: i for i, name in enumerate(class_names)}
    return list(rows["path"]), np.array([index[label] for label in rows["label"]],
                                        dtype=np.int64)


def prepare_data(data_dir: Path, table: pd.DataFrame, params: DataParams) -> PreparedData:
    """The splits of `table` (see `assign_splits`); no image is read here."""
    class_names = class_names_of(table)
    splits = {s: SplitFiles(*split_labels(table, s, class_names)) for s in SPLITS}
    for split, part in splits.items():
        if len(part.y) == 0:
            raise ValueError(f"{data_dir}: the {split} split is empty; add images or change "
                             "split.val_fraction / split.test_fraction in params.yaml")
    return PreparedData(data_dir=Path(data_dir), class_names=class_names, **splits,
                        image_size=params.image_size, channels=params.channels)
