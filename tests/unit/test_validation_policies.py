"""validation.severity: what each finding does (fail, warn or fix), shown in the report,
and which files are left out of training (the facts' `excluded` column)."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from tasks.validate import validate_task
from visionops.core.config import DriftParams, SeverityParams, ValidationParams
from visionops.core.drift import compare
from visionops.core.images import FACT_COLUMNS, FACT_DTYPES
from visionops.io.validation import (
    DataValidationError,
    collect_facts,
    near_duplicates,
    near_pairs,
    validate_dataset,
    validate_facts,
    write_report,
)

RULES = ValidationParams(min_images_per_class=3)


def with_severity(**policies) -> ValidationParams:
    return RULES.model_copy(update={"severity": SeverityParams(**policies)})


def findings(findings_list) -> dict[str, tuple[str, list[str]]]:
    return {f.check: (f.policy, f.offenders) for f in findings_list}


def first_digit(data_dir, label):
    return sorted((data_dir / label).iterdir())[0]


def excluded(facts) -> dict[str, str]:
    return {p: r for p, r in zip(facts["path"], facts["excluded"], strict=True) if r}


def write_photo(path, seed=0, size=(96, 64)):
    """A smooth, photo-like RGB image (a blown-up random 8 x 6 colour grid)."""
    grid = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize(size, Image.Resampling.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return image


def test_duplicate_within_a_label_is_a_warning_by_default(tiny_digits):
    original = first_digit(tiny_digits, "1")
    shutil.copy(original, tiny_digits / "1" / "x_copy.png")
    report, facts = validate_task.fn(tiny_digits, RULES)  # does not raise
    assert report.success
    assert report.failures == []
    assert findings(report.warnings) == {"no duplicates within a label": (
        "warn: kept one copy", [f"1/x_copy.png: duplicate of 1/{original.name}"])}
    assert excluded(facts) == {"1/x_copy.png": f"duplicate of 1/{original.name}"}
    assert (tiny_digits / "1" / "x_copy.png").exists()
    text = report.describe()
    assert "19 images in 3 classes passed" in text and "1 with warnings" in text
    assert "no duplicates within a label [warn: kept one copy]:" in text
    assert f"1/x_copy.png: duplicate of 1/{original.name}" in text


def test_duplicate_within_a_label_fix_deletes_the_extra_copies(tiny_digits):
    original = first_digit(tiny_digits, "1")
    for name in ("x_copy.png", "y_copy.png"):
        shutil.copy(original, tiny_digits / "1" / name)
    report, facts = validate_dataset(tiny_digits, with_severity(duplicate_in_label="fix"))
    assert report.success, report.describe()
    assert findings(report.warnings) == {"no duplicates within a label": (
        "fix: deleted 2 extra copies",
        [f"1/x_copy.png: deleted, a duplicate of 1/{original.name}",
         f"1/y_copy.png: deleted, a duplicate of 1/{original.name}"])}
    assert original.exists()
    assert not (tiny_digits / "1" / "x_copy.png").exists()
    assert not (tiny_digits / "1" / "y_copy.png").exists()
    assert len(facts) == report.n_images == 18
    assert {"1/x_copy.png", "1/y_copy.png"}.isdisjoint(facts["path"])
    assert excluded(facts) == {}
    assert "[fix: deleted 2 extra copies]" in report.describe()
    again, _ = validate_dataset(tiny_digits, with_severity(duplicate_in_label="fix"))
    assert again.success and again.warnings == []


def test_fix_keeps_the_real_file_rather_than_a_link_to_it(tiny_digits):
    original = first_digit(tiny_digits, "1")
    link = tiny_digits / "1" / "a_link.png"  # sorts before the file it points at
    link.symlink_to(original)
    report, facts = validate_dataset(tiny_digits, with_severity(duplicate_in_label="fix"))
    assert report.success, report.describe()
    assert not link.is_symlink() and original.is_file()
    assert "1/a_link.png" not in set(facts["path"])


def test_duplicate_within_a_label_fail_stops_the_flow(tiny_digits):
    shutil.copy(first_digit(tiny_digits, "1"), tiny_digits / "1" / "x_copy.png")
    with pytest.raises(DataValidationError) as error:
        validate_task.fn(tiny_digits, with_severity(duplicate_in_label="fail"))
    assert "no duplicates within a label [fail]:" in str(error.value)
    assert (tiny_digits / "1" / "x_copy.png").exists()


def test_label_conflict_fails_by_default_and_warns_when_asked(tiny_digits):
    original = first_digit(tiny_digits, "0")
    shutil.copy(original, tiny_digits / "2" / "mislabelled.png")
    report, _ = validate_dataset(tiny_digits, RULES)
    assert [f.check for f in report.failures] == ["one label per content"]
    assert "one label per content [fail]:" in report.describe()

    report, facts = validate_dataset(tiny_digits, with_severity(label_conflict="warn"))
    assert report.success
    policy, offenders = findings(report.warnings)["one label per content"]
    assert policy == "warn: content left out of training"
    assert offenders == [
        f"0/{original.name}: label conflict: same content as 2/mislabelled.png",
        f"2/mislabelled.png: label conflict: same content as 0/{original.name}"]
    assert set(excluded(facts)) == {f"0/{original.name}", "2/mislabelled.png"}
    # The same bytes are a conflict, not a near-duplicate.
    assert "no near-duplicates across labels" not in findings(report.warnings)


def test_near_duplicate_across_labels_names_both_files_and_the_distance(tiny_digits):
    photo = write_photo(tiny_digits / "0" / "photo.png")
    brighter = ImageEnhance.Brightness(photo).enhance(1.1)
    brighter.save(tiny_digits / "2" / "photo_again.jpg", quality=80)
    report, facts = validate_dataset(tiny_digits, RULES)
    assert report.success, report.describe()
    policy, offenders = findings(report.warnings)["no near-duplicates across labels"]
    assert policy == "warn: kept in training"
    assert [o.split(" (")[0] for o in offenders] == [
        "0/photo.png: near-duplicate of 2/photo_again.jpg",
        "2/photo_again.jpg: near-duplicate of 0/photo.png"]
    assert all(o.endswith("bits apart)") for o in offenders)
    assert excluded(facts) == {}  # both stay in training
    assert "no near-duplicates across labels [warn: kept in training]" in report.describe()

    failing, _ = validate_dataset(tiny_digits, with_severity(near_duplicate_across_labels="fail"))
    assert [f.check for f in failing.failures] == ["no near-duplicates across labels"]


def test_near_duplicate_distance_is_the_limit(tiny_digits):
    photo = write_photo(tiny_digits / "0" / "photo.png")
    ImageEnhance.Brightness(photo).enhance(1.1).save(tiny_digits / "2" / "again.jpg",
                                                      quality=80)
    facts = collect_facts(tiny_digits)
    bits = bin(int(facts.set_index("path").loc["0/photo.png", "phash"], 16)
               ^ int(facts.set_index("path").loc["2/again.jpg", "phash"], 16)).count("1")
    assert bits <= 4
    assert near_duplicates(facts, bits).notna().sum() == 2
    if bits:
        assert near_duplicates(facts, bits - 1).notna().sum() == 0


def test_different_images_under_different_labels_are_not_near_duplicates(tmp_path):
    for seed in range(12):
        write_photo(tmp_path / "data" / str(seed % 3) / f"p{seed}.png", seed=seed)
    facts = collect_facts(tmp_path / "data")
    assert near_duplicates(facts, 4).isna().all()


def noise(size=(16, 16)):
    return Image.fromarray(np.random.default_rng(5).integers(0, 256, size[::-1], np.uint8))


@pytest.mark.parametrize(("policy", "make", "reason"), [
    ("undecodable", lambda d: (d / "bad.png").write_bytes(b"not a png"), "not a decodable image"),
    ("blank", lambda d: Image.new("L", (16, 16), 255).save(d / "bad.png"),
     "blank: every pixel has the same value"),
    ("size", lambda d: noise((4, 40)).save(d / "bad.png"), "width 4 px is outside [8, 8192]"),
    ("mode", lambda d: noise().convert("CMYK").save(d / "bad.jpg"), "mode CMYK is not one of"),
    ("format", lambda d: noise().save(d / "bad.png", format="GIF"), "format GIF is not one of"),
])
def test_warned_files_are_left_out_of_training(tiny_digits, policy, make, reason):
    make(tiny_digits / "1")
    report, facts = validate_dataset(tiny_digits, RULES)
    assert not report.success  # fail by default

    report, facts = validate_dataset(tiny_digits, with_severity(**{policy: "warn"}))
    assert report.success, report.describe()
    assert all(f.policy == "warn: left out of training" for f in report.warnings)
    (path, why), = excluded(facts).items()
    assert path.startswith("1/bad.") and reason in why
    assert report.excluded == {path: why}


def test_undecoded_files_are_always_left_out(tiny_digits):
    Image.new("L", (300, 20)).save(tiny_digits / "0" / "wide.png")
    rules = RULES.model_copy(update={"max_side": 256, "severity": SeverityParams(size="warn")})
    report, facts = validate_dataset(tiny_digits, rules)
    assert report.success
    assert excluded(facts) == {"0/wide.png": "width 300 px is outside [8, 256] (not decoded)"}


def test_unexpected_class_warned_is_left_out_of_training(tiny_digits):
    rules = RULES.model_copy(update={"expected_classes": ["0", "1"],
                                     "severity": SeverityParams(expected_classes="warn")})
    report, facts = validate_dataset(tiny_digits, rules)
    assert report.success
    assert findings(report.warnings)["only expected classes"][0] == (
        "warn: class left out of training")
    assert {path.split("/")[0] for path in excluded(facts)} == {"2"}
    assert len(excluded(facts)) == 6


def test_class_warnings_keep_the_class(tiny_digits):
    for extra in sorted((tiny_digits / "2").iterdir())[2:]:
        extra.unlink()
    report, facts = validate_dataset(tiny_digits, with_severity(min_images_per_class="warn"))
    assert report.success
    assert findings(report.warnings) == {"minimum images per class": (
        "warn: class kept", ["2/: 2 images, fewer than 3"])}
    assert excluded(facts) == {}


def test_report_files_carry_policies_and_round_trip(tiny_digits, tmp_path):
    shutil.copy(first_digit(tiny_digits, "1"), tiny_digits / "1" / "x_copy.png")
    report, facts = validate_dataset(tiny_digits, RULES)
    report_path, facts_path = write_report(report, facts, tmp_path / "out")
    written = json.loads(report_path.read_text())
    assert written["success"] is True
    (warning,) = written["warnings"]
    assert (warning["check"], warning["severity"], warning["action"]) == (
        "no duplicates within a label", "warn", "kept one copy")
    assert written["policies"]["decodable"] == "fail"
    assert list(written["excluded"]) == ["1/x_copy.png"]
    back = pd.read_csv(facts_path, dtype=FACT_DTYPES)
    assert list(back.columns) == [*FACT_COLUMNS, "excluded"]
    assert back["phash"].tolist() == facts["phash"].tolist()
    assert back["phash"].str.fullmatch("[0-9a-f]{16}").all()


def test_facts_without_phash_still_validate_and_compare(tiny_digits):
    facts = collect_facts(tiny_digits)
    old = facts.drop(columns=["phash"])  # as logged before the perceptual hash existed
    report = validate_facts(tiny_digits, old, RULES)
    assert report.success, report.describe()
    drift = compare(old, facts, DriftParams(), "old facts")
    assert drift.status == "ok"


def test_data_docs_are_written_with_warnings(tiny_digits):
    shutil.copy(first_digit(tiny_digits, "1"), tiny_digits / "1" / "x_copy.png")
    docs = tiny_digits.parent / "docs"
    report, _ = validate_dataset(tiny_digits, RULES, docs_dir=docs)
    assert report.success and report.warnings
    pages = list((docs / "validations").rglob("*.html"))
    assert any("1/x_copy.png" in page.read_text() for page in pages)


def brute_force_pairs(hashes, labels, max_distance):
    return sorted((i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                  if labels[i] != labels[j]
                  and bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= max_distance)


@pytest.mark.parametrize("max_distance", [0, 1, 4, 9, 12])
def test_near_pairs_finds_exactly_the_close_pairs_across_groups(max_distance):
    rng = np.random.default_rng(max_distance)
    hashes = rng.integers(0, 2**63, 300, dtype=np.uint64) * 2 + rng.integers(0, 2, 300)
    hashes = hashes.astype(np.uint64)
    for k in range(0, 300, 3):  # plant close pairs: flip up to max_distance + 1 bits
        flips = rng.choice(64, rng.integers(0, max_distance + 2), replace=False)
        hashes[k + 1] = hashes[k] ^ np.uint64(sum(1 << int(b) for b in flips))
    hashes[2] = hashes[0]  # an equal hash
    labels = rng.integers(0, 3, 300)
    found = [tuple(pair) for pair in near_pairs(hashes, labels, max_distance).tolist()]
    expected = brute_force_pairs(hashes, labels, max_distance)
    assert found == expected
    assert expected  # the planted pairs make it a real test
