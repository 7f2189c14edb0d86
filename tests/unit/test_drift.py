import numpy as np
import pandas as pd
import pytest

from tasks.drift import drift_task
from visionops.core.config import DriftParams
from visionops.core.drift import (
    FAIL,
    OK,
    WARN,
    DataDriftError,
    class_distance,
    compare,
    write_drift,
)

PARAMS = DriftParams(warn_threshold=0.1, fail_threshold=0.5)


def facts(labels, brightness, width=28, decodable=True) -> pd.DataFrame:
    n = len(labels)
    return pd.DataFrame({"label": labels, "width": [width] * n, "height": [28] * n,
                         "brightness": brightness, "decodable": [decodable] * n})


def test_class_distance_is_total_variation():
    assert class_distance(facts(["a", "b"], [0.5, 0.5]), facts(["a", "b"], [0.5, 0.5])) == 0
    assert class_distance(facts(["a", "a"], [0.5, 0.5]), facts(["b", "b"], [0.5, 0.5])) == 1
    assert class_distance(facts(["a", "b"], [0.5] * 2),
                          facts(["a", "a", "a", "b"], [0.5] * 4)) == pytest.approx(0.25)


def test_same_distribution_is_ok():
    rng = np.random.default_rng(0)
    reference = facts(list("ab" * 200), rng.uniform(0.2, 0.4, 400))
    current = facts(list("ab" * 150), rng.uniform(0.2, 0.4, 300))
    report = compare(reference, current, PARAMS, "champion")
    assert report.status == OK, report.describe()
    assert {m.name for m in report.measures} == {
        "class distribution", "width distribution", "height distribution",
        "brightness distribution"}


def test_brightness_shift_fails_and_stops_the_task():
    rng = np.random.default_rng(1)
    reference = facts(list("ab" * 100), rng.uniform(0.1, 0.3, 200))
    current = facts(list("ab" * 100), rng.uniform(0.7, 0.9, 200))
    report = compare(reference, current, PARAMS, "champion v3")
    assert report.status == FAIL
    brightness = {m.name: m for m in report.measures}["brightness distribution"]
    assert brightness.statistic == pytest.approx(1.0) and brightness.status == FAIL
    with pytest.raises(DataDriftError, match=r"brightness distribution: 1.000 \(fail\)"):
        drift_task.fn(reference, current, PARAMS, "champion v3")


def test_moderate_class_shift_warns():
    reference = facts(["a"] * 50 + ["b"] * 50, [0.5] * 100)
    current = facts(["a"] * 70 + ["b"] * 30, [0.5] * 100)
    report = compare(reference, current, PARAMS, "champion")
    assert report.status == WARN
    assert {m.name: m.status for m in report.measures}["class distribution"] == WARN


def test_undecodable_rows_are_left_out():
    reference = facts(["a"] * 10, [0.5] * 10)
    current = pd.concat([facts(["a"] * 10, [0.5] * 10), facts(["b"] * 10, [None] * 10,
                                                             decodable=False)])
    assert compare(reference, current, PARAMS, "champion").status == OK


def test_report_and_plot_are_written(tmp_path):
    reference = facts(list("ab" * 10), [0.3] * 20)
    current = facts(list("abc" * 10), [0.6] * 30)
    report = compare(reference, current, PARAMS, "champion")
    json_path, png_path = write_drift(report, reference, current, tmp_path)
    assert '"status": "fail"' in json_path.read_text()
    assert png_path.read_bytes().startswith(b"\x89PNG")
