"""The demo's gate can say yes: a genuinely better model is promoted.

    .venv/bin/python benchmarks/demo_promotion.py [--first-per-class N]

Night 1 trains the first champion on the first N demo digits of each class; night 2
brings the rest of the 1,797 and trains on all of them, with the README's params.yaml.
The second model is better because it saw more data, and the gate (floors, then
min_improvement, then McNemar's one-sided exact test on the same test split) must
promote it. Prints both nights' decisions with the gate's power and writes
benchmarks/demo_promotion.json; exits 1 if night 2 is not promoted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from visionops.core.demo import write_digits  # noqa: E402


def make_project(root: Path) -> Path:
    """A folder with the README's params.yaml, a DVC repository and a local remote."""
    from dvc.repo import Repo

    root.mkdir(parents=True)
    Repo.init(str(root), no_scm=True).close()
    (root / ".dvc" / "config").write_text(
        "[core]\n    no_scm = true\n    remote = local\n    analytics = false\n"
        "['remote \"local\"']\n    url = ../dvc-storage\n")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root / "params.yaml"


def night(params: Path) -> dict:
    started = time.perf_counter()
    result = subprocess.run([str(Path(sys.executable).with_name("visionops")), "retrain",
                             "--json", "--params", str(params)], cwd=params.parent,
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        sys.exit(f"retrain failed:\n{result.stderr[-3000:]}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    return summary


def gate_figures(summary: dict) -> dict:
    from mlflow import MlflowClient

    run = MlflowClient(summary["tracking_uri"]).get_run(summary["run_id"])
    keep = ("mcnemar_b", "mcnemar_c", "mcnemar_p_value", "gate_champion_errors",
            "gate_min_wins")
    return {key: run.data.metrics[key] for key in keep if key in run.data.metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-per-class", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="visionops-demo-promotion-") as scratch:
        params = make_project(Path(scratch) / "project")
        data = params.parent / "data"
        first_images = write_digits(data, per_class=args.first_per_class)
        first = night(params)
        all_images = write_digits(data)
        second = night(params)
        figures = {
            "night_1": {"images": first_images, "decision": first["decision"],
                        "test_metrics": first["metrics"], "wall_s": first["wall_s"]},
            "night_2": {"images": all_images, "decision": second["decision"],
                        "reason": second["reason"], "test_metrics": second["metrics"],
                        "champion_test_metrics": second["champion_metrics"],
                        "gate": gate_figures(second), "wall_s": second["wall_s"]},
        }
    print(json.dumps(figures, indent=2))
    (HERE / "demo_promotion.json").write_text(json.dumps(figures, indent=2) + "\n")
    sys.exit(0 if second["decision"] == "promoted" else 1)


if __name__ == "__main__":
    main()
