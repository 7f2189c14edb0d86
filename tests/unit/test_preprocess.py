import hashlib

import pandas as pd
import pytest

from visionops.core.config import DataParams, SplitParams
from visionops.core.split import SPLITS, assign_splits, prepare_data, split_of
from visionops.io.validation import collect_facts

PARAMS = SplitParams(seed=42, val_fraction=0.15, test_fraction=0.15)


def fake_facts(n: int, labels=("a", "b", "c"), start: int = 0) -> pd.DataFrame:
    rows = []
    for i in range(start, start + n):
        label = labels[i % len(labels)]
        rows.append({"path": f"{label}/{i}.png", "label": label,
                     "sha256": hashlib.sha256(str(i).encode()).hexdigest()})
    return pd.DataFrame(rows)


def test_split_of_is_deterministic_and_a_known_split():
    sha = hashlib.sha256(b"image").hexdigest()
    assert split_of(sha, PARAMS) == split_of(sha, SplitParams(**PARAMS.model_dump()))
    assert split_of(sha, PARAMS) in SPLITS


def test_split_depends_on_the_seed():
    shas = fake_facts(200)["sha256"]
    other = SplitParams(seed=7, val_fraction=0.15, test_fraction=0.15)
    assert [split_of(s, PARAMS) for s in shas] != [split_of(s, other) for s in shas]


def test_growing_the_dataset_keeps_existing_splits():
    before = assign_splits(fake_facts(300), PARAMS)
    grown = pd.concat([fake_facts(50, start=1000), fake_facts(300), fake_facts(50, start=2000)])
    after = assign_splits(grown.sample(frac=1, random_state=0), PARAMS).set_index("path")
    assert (after.loc[before["path"], "split"].to_numpy() == before["split"].to_numpy()).all()


def test_split_fractions_match_params_on_1000_images():
    table = assign_splits(fake_facts(1000), PARAMS)
    shares = table["split"].value_counts(normalize=True)
    assert shares["test"] == pytest.approx(0.15, abs=0.03)
    assert shares["val"] == pytest.approx(0.15, abs=0.03)
    assert shares["train"] == pytest.approx(0.70, abs=0.03)


def test_other_fractions_are_respected():
    params = SplitParams(seed=1, val_fraction=0.3, test_fraction=0.1)
    shares = assign_splits(fake_facts(1000), params)["split"].value_counts(normalize=True)
    assert shares["val"] == pytest.approx(0.3, abs=0.03)
    assert shares["test"] == pytest.approx(0.1, abs=0.03)


def test_assign_splits_is_roughly_stratified():
    table = assign_splits(fake_facts(1500), PARAMS)
    shares = pd.crosstab(table["label"], table["split"], normalize="index")
    for label in ("a", "b", "c"):
        assert shares.loc[label, "train"] == pytest.approx(0.70, abs=0.05)
        assert shares.loc[label, "val"] == pytest.approx(0.15, abs=0.05)
        assert shares.loc[label, "test"] == pytest.approx(0.15, abs=0.05)


def test_assign_splits_keeps_columns_and_does_not_mutate_facts():
    facts = fake_facts(10).assign(decodable=True)
    table = assign_splits(facts, PARAMS)
    assert list(table.columns) == ["path", "label", "sha256", "split"]
    assert "split" not in facts.columns


@pytest.fixture
def split_digits(digits_folder, tmp_path):
    """Five digit classes; splits decided by content hash like the real pipeline."""
    data_dir = digits_folder(tmp_path / "data", per_class=20, keep=("3", "4", "5", "6", "7"))
    facts = collect_facts(data_dir)
    return data_dir, assign_splits(facts, PARAMS)


def test_prepare_data_shapes_and_labels(split_digits):
    data_dir, table = split_digits
    prepared = prepare_data(data_dir, table, DataParams(image_size=12, channels=1))
    assert prepared.class_names == ["3", "4", "5", "6", "7"]
    assert prepared.input_shape == (12, 12, 1)
    total = 0
    for split in SPLITS:
        part = getattr(prepared, split)
        rows = table[table["split"] == split]
        assert part.paths == list(rows["path"])
        assert prepared.files(split) == [data_dir / p for p in rows["path"]]
        expected = [prepared.class_names.index(label) for label in rows["label"]]
        assert part.y.tolist() == expected
        total += len(part.y)
    assert total == 100


def test_split_keeps_one_copy_of_a_duplicate_and_drops_conflicts():
    facts = pd.DataFrame({
        "path": ["a/2.png", "a/1.png", "b/1.png", "a/3.png", "b/3.png", "b/4.png"],
        "label": ["a", "a", "b", "a", "b", "b"],
        "sha256": ["same", "same", "other", "conflict", "conflict", "unreadable"],
        "excluded": ["", "", "", "", "", "undecodable"],
    })
    table = assign_splits(facts, PARAMS)
    assert sorted(table["path"]) == ["a/1.png", "b/1.png"]  # the first copy by path


def test_split_keeps_facts_without_an_excluded_column():
    facts = pd.DataFrame({"path": ["a/1.png", "b/1.png"], "label": ["a", "b"],
                          "sha256": ["x", "y"]})
    assert len(assign_splits(facts, PARAMS)) == 2


def test_prepare_data_three_channels(split_digits):
    data_dir, table = split_digits
    prepared = prepare_data(data_dir, table, DataParams(image_size=8, channels=3))
    assert prepared.input_shape == (8, 8, 3)


def test_class_indices_follow_sorted_names_not_first_appearance(split_digits):
    data_dir, table = split_digits
    reversed_table = table.iloc[::-1].reset_index(drop=True)
    prepared = prepare_data(data_dir, reversed_table, DataParams(image_size=8))
    assert prepared.class_names == ["3", "4", "5", "6", "7"]
    for path, y in zip(prepared.train.paths, prepared.train.y, strict=True):
        assert prepared.class_names[y] == path.split("/")[0]


@pytest.mark.parametrize("empty", ["val", "test", "train"])
def test_empty_split_is_named(split_digits, empty):
    data_dir, table = split_digits
    table = table.copy()
    table.loc[table["split"] == empty, "split"] = "train" if empty != "train" else "val"
    with pytest.raises(ValueError, match=f"the {empty} split is empty"):
        prepare_data(data_dir, table, DataParams(image_size=8))
