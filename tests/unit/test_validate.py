import shutil

import numpy as np
import pytest
from PIL import Image

from tasks.validate import validate_task
from visionops.core.config import SeverityParams, ValidationParams
from visionops.io.validation import DataValidationError, validate_dataset, write_report

RULES = ValidationParams(min_images_per_class=3)


def failures_by_check(report) -> dict[str, list[str]]:
    return {failure.check: failure.offenders for failure in report.failures}


def only_failure(data_dir, rules=RULES) -> tuple[str, list[str]]:
    report, _ = validate_dataset(data_dir, rules)
    assert not report.success
    assert len(report.failures) == 1, report.describe()
    return report.failures[0].check, report.failures[0].offenders


def a_digit(data_dir, label="0"):
    return sorted((data_dir / label).iterdir())[0]


def test_clean_folder_passes(tiny_digits):
    report, facts = validate_dataset(tiny_digits, RULES)
    assert report.success, report.describe()
    assert (report.n_images, report.n_classes) == (18, 3)
    assert len(facts) == 18
    assert {"decodable", "one label per content", "no duplicates within a label",
            "not blank", "inside the dataset folder"} <= set(report.checks)
    assert "18 images in 3 classes passed" in report.describe()


def test_truncated_png_is_named(tiny_digits, make_image):
    bad = make_image(tiny_digits / "1" / "cut.png", size=(16, 16))
    bad.write_bytes(bad.read_bytes()[:-30])
    check, offenders = only_failure(tiny_digits)
    assert check == "decodable"
    assert offenders[0].startswith("1/cut.png: not a decodable image (")


def test_zero_byte_file_is_named(tiny_digits):
    (tiny_digits / "2" / "empty.png").write_bytes(b"")
    check, offenders = only_failure(tiny_digits)
    assert check == "decodable"
    assert len(offenders) == 1
    assert offenders[0].startswith("2/empty.png: not a decodable image")


def test_text_with_png_extension_is_named(tiny_digits):
    (tiny_digits / "0" / "notes.png").write_text("hello, I am text")
    check, offenders = only_failure(tiny_digits)
    assert check == "decodable"
    assert offenders[0].startswith("0/notes.png: not a decodable image")


def test_gif_saved_as_png_has_a_disallowed_format(tiny_digits, make_image):
    make_image(tiny_digits / "0" / "anim.png", size=(16, 16), fmt="GIF")
    check, offenders = only_failure(tiny_digits)
    assert check == "allowed format"
    assert offenders == ["0/anim.png: format GIF is not one of ['PNG', 'JPEG']"]


def test_jpeg_is_refused_when_only_png_is_allowed(tiny_digits, make_image):
    make_image(tiny_digits / "0" / "photo.jpg", size=(16, 16), mode="RGB", fmt="JPEG")
    rules = ValidationParams(min_images_per_class=3, allowed_formats=["PNG"])
    check, offenders = only_failure(tiny_digits, rules)
    assert check == "allowed format"
    assert offenders == ["0/photo.jpg: format JPEG is not one of ['PNG']"]


def test_disallowed_mode_is_named(tiny_digits, make_image):
    make_image(tiny_digits / "0" / "rgba.png", size=(16, 16), mode="RGBA")
    rules = ValidationParams(min_images_per_class=3, allowed_modes=["L", "RGB"])
    check, offenders = only_failure(tiny_digits, rules)
    assert check == "allowed mode"
    assert offenders[0].startswith("0/rgba.png: mode RGBA is not one of")


def test_one_pixel_image_is_below_min_side(tiny_digits, make_image):
    make_image(tiny_digits / "1" / "dot.png", size=(1, 1))
    report, _ = validate_dataset(tiny_digits, RULES)
    failures = failures_by_check(report)
    assert set(failures) == {"width within bounds", "height within bounds", "not blank"}
    assert failures["width within bounds"] == ["1/dot.png: width 1 px is outside [8, 8192]"]
    assert failures["height within bounds"] == ["1/dot.png: height 1 px is outside [8, 8192]"]


def test_too_large_image_is_above_max_side(tiny_digits, make_image):
    make_image(tiny_digits / "1" / "wide.png", size=(40, 8))
    rules = ValidationParams(min_images_per_class=3, max_side=32)
    check, offenders = only_failure(tiny_digits, rules)
    assert check == "width within bounds"
    assert offenders == ["1/wide.png: width 40 px is outside [8, 32] (not decoded)"]


def test_duplicate_within_a_label_fails_naming_the_extra_copy_when_its_policy_is_fail(
        tiny_digits):
    original = a_digit(tiny_digits, "1")
    shutil.copy(original, tiny_digits / "1" / "x_copy.png")
    rules = RULES.model_copy(update={"severity": SeverityParams(duplicate_in_label="fail")})
    check, offenders = only_failure(tiny_digits, rules)
    assert check == "no duplicates within a label"
    assert offenders == [f"1/x_copy.png: duplicate of 1/{original.name}"]


def test_duplicate_across_labels_names_both_files(tiny_digits):
    original = a_digit(tiny_digits, "0")
    shutil.copy(original, tiny_digits / "2" / "mislabelled.png")
    check, offenders = only_failure(tiny_digits)
    assert check == "one label per content"
    assert offenders == [
        f"0/{original.name}: label conflict: same content as 2/mislabelled.png",
        f"2/mislabelled.png: label conflict: same content as 0/{original.name}"]


def test_class_with_too_few_images_names_the_folder(tiny_digits):
    for extra in sorted((tiny_digits / "2").iterdir())[2:]:
        extra.unlink()
    check, offenders = only_failure(tiny_digits)
    assert check == "minimum images per class"
    assert offenders == ["2/: 2 images, fewer than 3"]


def test_empty_class_folder_is_named(tiny_digits):
    (tiny_digits / "7").mkdir()
    check, offenders = only_failure(tiny_digits)
    assert check == "minimum images per class"
    assert offenders == ["7/: 0 images, fewer than 3"]


def test_folder_without_images_fails(tmp_path):
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "a.txt").write_text("x")
    report, _ = validate_dataset(tmp_path, RULES)
    assert [f.check for f in report.failures] == ["images present"]


def test_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        validate_dataset(tmp_path / "nope", RULES)


def test_odd_file_names_pass(tiny_digits, make_image):
    make_image(tiny_digits / "0" / "with space.png", size=(16, 16), seed=1)
    make_image(tiny_digits / "1" / "ünïcødé_数字.png", size=(16, 16), seed=2)
    make_image(tiny_digits / "2" / "photo.JPEG", size=(16, 16), mode="RGB", fmt="JPEG", seed=3)
    report, facts = validate_dataset(tiny_digits, RULES)
    assert report.success, report.describe()
    assert {"0/with space.png", "1/ünïcødé_数字.png", "2/photo.JPEG"} <= set(facts["path"])


def test_several_defects_are_all_reported(tiny_digits):
    (tiny_digits / "0" / "empty.png").write_bytes(b"")
    (tiny_digits / "9").mkdir()
    report, _ = validate_dataset(tiny_digits, RULES)
    failures = failures_by_check(report)
    assert failures["decodable"][0].startswith("0/empty.png:")
    assert failures["minimum images per class"] == ["9/: 0 images, fewer than 3"]


def test_validate_task_raises_naming_the_file(tiny_digits):
    (tiny_digits / "1" / "broken.png").write_text("not a png")
    with pytest.raises(DataValidationError) as error:
        validate_task.fn(tiny_digits, RULES)
    assert "1/broken.png: not a decodable image" in str(error.value)
    assert "data validation failed" in str(error.value)
    assert not error.value.report.success
    assert "1/broken.png" in set(error.value.facts["path"])


def test_validate_task_returns_report_when_clean(tiny_digits):
    report, facts = validate_task.fn(tiny_digits, RULES)
    assert report.success
    assert len(facts) == 18


def test_write_report(tiny_digits, tmp_path):
    report, facts = validate_dataset(tiny_digits, RULES)
    paths = write_report(report, facts, tmp_path / "out")
    assert [p.name for p in paths] == ["validation.json", "image_facts.csv"]
    assert '"success": true' in paths[0].read_text()
    assert len(paths[1].read_text().splitlines()) == 19


def test_symlink_leading_outside_the_folder_is_named_and_not_read(tiny_digits, make_image):
    outside = make_image(tiny_digits.parent / "secret.png", seed=7)
    (tiny_digits / "1" / "link.png").symlink_to(outside)
    check, offenders = only_failure(tiny_digits)
    assert check == "inside the dataset folder"
    assert offenders == [f"1/link.png: leads outside the dataset folder (to {outside})"]


def test_symlink_inside_the_folder_is_fine(tiny_digits, make_image):
    target = make_image(tiny_digits / "1" / "real.png", seed=8)
    (tiny_digits / "2" / "alias.png").symlink_to(target)
    check, offenders = only_failure(tiny_digits)
    assert check == "one label per content"  # a link is a second copy under another label


def test_blank_image_is_named(tiny_digits):
    Image.new("L", (16, 16), color=255).save(tiny_digits / "0" / "white.png")
    check, offenders = only_failure(tiny_digits)
    assert (check, offenders) == ("not blank",
                                  ["0/white.png: blank: every pixel has the same value"])


@pytest.mark.parametrize("mode", ["CMYK", "I;16"])
def test_unsupported_mode_is_named_unless_converted(tiny_digits, mode):
    fmt, name = ("JPEG", "print.jpg") if mode == "CMYK" else ("PNG", "deep.png")
    image = Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 200) \
        if mode == "I;16" else Image.new("CMYK", (16, 16), (10, 200, 30, 0))
    image.putpixel((0, 0), (0, 0, 0, 255) if mode == "CMYK" else 1)
    image.save(tiny_digits / "1" / name, format=fmt)
    check, offenders = only_failure(tiny_digits)
    assert check == "allowed mode"
    assert offenders[0].startswith(f"1/{name}: mode {mode} is not one of")
    converting = RULES.model_copy(update={"convert_modes": [mode]})
    assert validate_dataset(tiny_digits, converting)[0].success


def test_image_too_large_is_refused_from_its_header(tiny_digits):
    Image.new("L", (300, 20)).save(tiny_digits / "0" / "wide.png")
    rules = RULES.model_copy(update={"max_side": 256})
    report, facts = validate_dataset(tiny_digits, rules)
    assert failures_by_check(report) == {
        "width within bounds": ["0/wide.png: width 300 px is outside [8, 256] (not decoded)"]}
    assert facts.set_index("path").loc["0/wide.png", "decodable"] is None


def test_decompression_bomb_is_refused_without_decoding(tiny_digits):
    import struct
    import zlib

    # A 60000 x 60000 PNG header over a few bytes of data: decoding would need 3.6 GB.
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    chunk += struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\0" * 1000)
    idat_chunk = (struct.pack(">I", len(idat)) + b"IDAT" + idat
                  + struct.pack(">I", zlib.crc32(b"IDAT" + idat)))
    (tiny_digits / "2" / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk + idat_chunk + b"\0\0\0\0IEND\xaeB`\x82")
    report, _ = validate_dataset(tiny_digits, RULES)
    offenders = [o for f in report.failures for o in f.offenders]
    assert offenders and all(o.startswith("2/bomb.png: ") for o in offenders)
    assert any("60000" in o for o in offenders)


def test_missing_and_unexpected_classes_are_named(tiny_digits):
    rules = RULES.model_copy(update={"expected_classes": ["0", "1", "2", "3"]})
    shutil.copytree(tiny_digits / "2", tiny_digits / "x")
    for image in (tiny_digits / "x").iterdir():
        image.rename(image.with_name("x" + image.name))
    report, _ = validate_dataset(tiny_digits, rules)
    failures = failures_by_check(report)
    assert failures["expected classes present"] == ["3/: expected class has no folder"]
    assert failures["only expected classes"] == [
        "x/: not one of the expected classes ['0', '1', '2', '3']"]


def test_class_imbalance_beyond_the_ratio_is_named(tiny_digits):
    for extra in sorted((tiny_digits / "2").iterdir())[3:]:
        extra.unlink()
    rules = RULES.model_copy(update={"max_class_imbalance": 1.5})
    check, offenders = only_failure(tiny_digits, rules)
    assert check == "class balance"
    assert offenders == ["2/: 3 images: the largest class is 2.0x bigger, more than "
                         "max_class_imbalance 1.5"]


def test_data_docs_are_written_to_the_given_folder(tiny_digits):
    (tiny_digits / "0" / "notes.png").write_text("not an image")
    docs = tiny_digits.parent / "docs"
    report, _ = validate_dataset(tiny_digits, RULES, docs_dir=docs)
    assert report.data_docs == str(docs / "index.html")
    pages = list((docs / "validations").rglob("*.html"))
    assert {p.parent.parent.parent.name for p in pages} == {"images", "classes"}
    assert any("0/notes.png" in p.read_text() for p in pages)


def test_facts_from_worker_processes_equal_the_serial_ones(tiny_digits, monkeypatch):
    import visionops.io.validation as validate

    serial = validate.collect_facts(tiny_digits, workers=1)
    monkeypatch.setattr(validate, "PARALLEL_MIN_FILES", 1)
    monkeypatch.setattr(validate, "CHUNK_SIZE", 4)
    parallel = validate.collect_facts(tiny_digits, workers=2)
    assert len(serial) == 18
    assert parallel.equals(serial)


def test_truncated_jpeg_is_named(tiny_digits, make_image):
    photo = make_image(tiny_digits / "2" / "photo.jpg", size=(64, 64), mode="RGB", fmt="JPEG")
    photo.write_bytes(photo.read_bytes()[:400])
    check, offenders = only_failure(tiny_digits)
    assert check == "decodable"
    assert offenders == [offenders[0]] and offenders[0].startswith(
        "2/photo.jpg: not a decodable image (")


def test_validation_draws_no_progress_bars(tiny_digits, capfd):
    """great-expectations draws a progress bar per validation unless its context's
    `progress_bars` config turns them off."""
    validate_dataset(tiny_digits, RULES)
    validate_dataset(tiny_digits, RULES, docs_dir=tiny_digits.parent / "docs")
    output = capfd.readouterr()
    assert "Calculating Metrics" not in output.err + output.out
