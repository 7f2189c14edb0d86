"""The nightly loop in steady state: never train twice for the same reason, re-gate when
only the gate changed, never promote over a champion the gate did not compare with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from projects import make_project, write_params

from flows.retrain import retrain
from visionops.core.config import load_params
from visionops.io.registry import Registry
from visionops.io.tracking import use_experiment

ALWAYS_REJECT = {"gate": {"min_improvement": 0.9}}


@pytest.fixture(scope="module")
def rejected(tmp_path_factory, prefect_server):
    """v1 champion; v2 trained with other training params and rejected by the gate."""
    root = make_project(tmp_path_factory.mktemp("nightly") / "project")
    first = retrain(params_path=str(root / "params.yaml"))
    other = {"train": {"seed": 7}, **ALWAYS_REJECT}
    second = retrain(params_path=str(write_params(root, other, name="params-other.yaml")))
    return root, first, second, other


def versions(root) -> list[str]:
    return [str(v.version) for v in Registry(load_params(root / "params.yaml")).versions()]


def test_a_rejected_challenger_is_not_trained_again_after_an_unrelated_edit(rejected):
    root, first, second, other = rejected
    assert (first["decision"], second["decision"]) == ("first_champion", "rejected")
    edited = write_params(root, {**other, "notify": {"webhook_url": "http://127.0.0.1:9/x"},
                                 "schedule": {"cron": "0 3 * * *"},
                                 "compute": {"dask_workers": 3}},
                          name="params-edited.yaml")

    summary = retrain(params_path=str(edited))

    assert summary["decision"] == "unchanged", summary["reason"]
    assert summary["same_as_version"] == second["model_version"]
    assert f"v{second['model_version']} (rejected:" in summary["reason"]
    assert summary["epochs_run"] == 0
    assert versions(root) == ["1", "2"]


def test_a_champion_whose_decision_was_never_recorded_is_not_gated_against_itself(
        rejected):
    root, first, _, _ = rejected
    registry = Registry(load_params(root / "params.yaml"))
    registry.client.delete_model_version_tag("tiny-digits", "1", "decision")

    summary = retrain(params_path=str(root / "params.yaml"))

    assert summary["decision"] == "unchanged", summary["reason"]
    assert summary["same_as_version"] == first["model_version"]
    assert versions(root) == ["1", "2"]


def test_a_version_whose_run_died_before_its_decision_is_gated_without_training(rejected):
    root, _, second, other = rejected
    registry = Registry(load_params(root / "params.yaml"))
    for key in ("decision", "reason"):
        registry.client.delete_model_version_tag("tiny-digits", "2", key)
    champion_run = registry.version("1").run_id
    (facts,) = root.glob(f"mlartifacts/**/{champion_run}/artifacts/validation/image_facts.csv")
    facts.unlink()  # the drift check's reference is gone

    summary = retrain(params_path=str(root / "params-other.yaml"))

    assert summary["regated"] and summary["epochs_run"] == 0
    assert summary["decision"] == "rejected"
    assert registry.version("2").tags["decision"] == "rejected"
    assert versions(root) == ["1", "2"]
    tags = registry.client.get_run(summary["run_id"]).data.tags
    assert tags["drift_status"] == "skipped"
    assert tags["drift_warning"].startswith("drift check skipped: the image facts of "
                                            "champion v1 could not be read")


def test_a_change_to_the_gate_alone_gates_the_last_challenger_again(rejected):
    root, first, second, other = rejected
    relaxed = write_params(root, {"train": other["train"],
                                  "gate": {"min_improvement": 0.0, "significance": 1.0}},
                           name="params-relaxed.yaml")

    summary = retrain(params_path=str(relaxed))

    assert summary["regated"] and summary["epochs_run"] == 0
    assert summary["model_version"] == second["model_version"]
    assert versions(root) == ["1", "2"]
    registry = Registry(load_params(relaxed))
    tags = registry.version(second["model_version"]).tags
    assert tags["decision"] == summary["decision"]
    assert tags["gated_against"] == str(first["model_version"])
    if summary["decision"] == "promoted":
        assert str(registry.champion().version) == str(second["model_version"])
    again = retrain(params_path=str(relaxed))
    assert again["decision"] == "unchanged" and versions(root) == ["1", "2"]


def test_two_runs_started_together_register_one_version_and_agree_on_the_champion(
        tmp_path):
    root = make_project(tmp_path / "project")
    use_experiment(load_params(root / "params.yaml"))  # the store exists, as on night 2+
    command = [str(Path(sys.executable).with_name("visionops")), "retrain", "--json",
               "--params", str(root / "params.yaml")]
    runs = [subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (_, stderr) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, stderr[-2000:]
    summaries = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]

    assert sorted(s["decision"] for s in summaries) == ["first_champion", "unchanged"]
    assert versions(root) == ["1"]
    registry = Registry(load_params(root / "params.yaml"))
    assert str(registry.champion().version) == "1"
    assert [e["to_version"] for e in registry.history()] == ["1"]
