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
from visionops.core.images import load_images

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
    """The facts table's path, label and sha256 with a `split` column added."""
    table = facts[["path", "label", "sha256"]].copy()
    table["split"] = [split_of(sha, params) for sha in table["sha256"]]
    return table


@dataclass
class Arrays:
    """One split, preprocessed: images (N, size, size, channels) in [0, 1], integer labels."""

    x: np.ndarray
    y: np.ndarray
    paths: list[str]


@dataclass
class PreparedData:
    class_names: list[str]
    train: Arrays
    val: Arrays
    test: Arrays

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])


def class_names_of(table: pd.DataFrame) -> list[str]:
    return sorted(table["label"].unique())


def split_labels(table: pd.DataFrame, split: str, class_names: list[str]
                 ) -> tuple[list[str], np.ndarray]:
    """One split's paths and their labels as indices into `class_names`."""
    rows = table[table["split"] == split]
    index = {name: i for i, name in enumerate(class_names)}
    return list(rows["path"]), np.array([index[label] for label in rows["label"]],
                                        dtype=np.int64)


def load_split(data_dir: Path, table: pd.DataFrame, split: str, class_names: list[str],
               params: DataParams) -> Arrays:
    paths, y = split_labels(table, split, class_names)
    x = load_images((data_dir / p for p in paths), params.image_size, params.channels)
    return Arrays(x=x, y=y, paths=paths)


def prepare_data(data_dir: Path, table: pd.DataFrame, params: DataParams) -> PreparedData:
    class_names = class_names_of(table)
    arrays = {s: load_split(data_dir, table, s, class_names, params) for s in SPLITS}
    for split, part in arrays.items():
        if len(part.y) == 0:
            raise ValueError(f"{data_dir}: the {split} split is empty; add images or change "
                             "split.val_fraction / split.test_fraction in params.yaml")
    return PreparedData(class_names=class_names, **arrays)

