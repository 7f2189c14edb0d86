"""Data drift: the new dataset against the one the champion was trained on.
Class distribution (total variation distance) and image width, height and brightness
(two-sample Kolmogorov-Smirnov statistic); each is 0 for identical and 1 for disjoint.
Batch scoring compares unlabelled images the same way: their sizes and brightness
before predicting, the class distribution of the labels predicted for them after."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from visionops.core.config import DriftParams

OK, WARN, FAIL = "ok", "warn", "fail"
NUMERIC = ("width", "height", "brightness")


@dataclass
class DriftMeasure:
    name: str
    statistic: float
    status: str


@dataclass
class DriftReport:
    reference: str  # what the new data is compared with
    warn_threshold: float
    fail_threshold: float
    measures: list[DriftMeasure] = field(default_factory=list)

    @property
    def status(self) -> str:
        statuses = {m.status for m in self.measures}
        return FAIL if FAIL in statuses else WARN if WARN in statuses else OK

    def to_dict(self) -> dict:
        return {"status": self.status, **asdict(self)}

    def describe(self) -> str:
        lines = [f"data drift against {self.reference}: {self.status} (warn at "
                 f"{self.warn_threshold}, fail at {self.fail_threshold})"]
        lines += [f"  {m.name}: {m.statistic:.3f} ({m.status})" for m in self.measures]
        return "\n".join(lines)


class DataDriftError(Exception):
    def __init__(self, report: DriftReport):
        super().__init__(report.describe())
        self.report = report


def _usable(facts: pd.DataFrame) -> pd.DataFrame:
    return facts[facts["decodable"].astype(str) == "True"]


def class_distance(reference: pd.DataFrame, current: pd.DataFrame) -> float:
    """Total variation distance between the two label distributions."""
    ref = reference["label"].astype(str).value_counts(normalize=True)
    cur = current["label"].astype(str).value_counts(normalize=True)
    ref, cur = ref.align(cur, fill_value=0.0)
    return float((ref - cur).abs().sum() / 2)


def compare(reference: pd.DataFrame, current: pd.DataFrame, params: DriftParams,
            reference_name: str) -> DriftReport:
    from scipy.stats import ks_2samp

    reference, current = _usable(reference), _usable(current)
    report = DriftReport(reference_name, params.warn_threshold, params.fail_threshold)
    statistics = {}
    if "label" in current:  # images not yet labelled (scoring, before predicting) have none
        statistics["class distribution"] = class_distance(reference, current)
    for column in NUMERIC:
        if column in reference and column in current:
            ref, cur = reference[column].dropna(), current[column].dropna()
            if len(ref) and len(cur):
                statistics[f"{column} distribution"] = float(
                    ks_2samp(ref.astype(float), cur.astype(float)).statistic)
    for name, value in statistics.items():
        status = (FAIL if value >= params.fail_threshold
                  else WARN if value >= params.warn_threshold else OK)
        report.measures.append(DriftMeasure(name, value, status))
    return report


def plot_drift(reference: pd.DataFrame, current: pd.DataFrame, path: Path,
               current_name: str = "new data") -> Path:
    from matplotlib.figure import Figure

    reference, current = _usable(reference), _usable(current)
    fig = Figure(figsize=(11, 4))
    classes, brightness = fig.subplots(1, 2)
    shares = pd.DataFrame({
        "champion's data": reference["label"].astype(str).value_counts(normalize=True),
        current_name: current["label"].astype(str).value_counts(normalize=True)}).fillna(0)
    shares.sort_index().plot.bar(ax=classes, rot=0)
    classes.set(title="Class distribution", xlabel="label", ylabel="share of images")
    for name, facts in (("champion's data", reference), (current_name, current)):
        if "brightness" in facts:
            brightness.hist(facts["brightness"].dropna().astype(float), bins=30, range=(0, 1),
                            alpha=0.5, density=True, label=name)
    brightness.set(title="Mean brightness per image", xlabel="brightness (0-1)",
                   ylabel="density")
    brightness.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def write_drift(report: DriftReport, reference: pd.DataFrame, current: pd.DataFrame,
                out_dir: Path, current_name: str = "new data") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / "drift.json"
    report_path.write_text(json.dumps(report.to_dict(), indent=2))
    return [report_path, plot_drift(reference, current, out_dir / "drift.png", current_name)]

