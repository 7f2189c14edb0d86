"""Promotion is compare-and-set, idempotent, and repaired after a kill half way."""

import pytest
from mlflow import MlflowClient

from visionops.core.config import Params
from visionops.io.registry import ChampionChanged, Registry

NAME = "registry-unit"


@pytest.fixture
def registry(tmp_path) -> Registry:
    """Three versions (no model files: the registry only moves names) in a SQLite store."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.create_registered_model(NAME)
    for _ in range(3):
        client.create_model_version(NAME, source=(tmp_path / "model").as_uri())
    return Registry(Params(registry={"model_name": NAME},
                           mlflow={"tracking_uri": uri, "experiment_name": "unit"},
                           root=tmp_path))


def aliases(registry: Registry) -> dict[str, list[str]]:
    return {row["version"]: row["aliases"] for row in registry.listing()}


def test_promotion_against_a_champion_that_changed_is_refused(registry):
    registry.promote("1", "first", expected_champion=None)
    with pytest.raises(ChampionChanged, match="compared with no champion, the champion "
                                              "is now v1"):
        registry.promote("2", "nightly", expected_champion=None)
    assert str(registry.champion().version) == "1"
    assert [e["to_version"] for e in registry.history()] == ["1"]


def test_a_rollback_during_a_run_is_not_overwritten(registry):
    registry.promote("1", "first")
    registry.promote("2", "better")
    run_compared_with = str(registry.champion().version)  # a nightly run starts: v2
    registry.rollback("v2 misbehaves in production")      # an operator, meanwhile
    with pytest.raises(ChampionChanged, match="compared with v2, the champion is now v1"):
        registry.promote("3", "gate passed", expected_champion=run_compared_with)
    assert aliases(registry) == {"1": ["champion"], "2": [], "3": []}
    assert [(e["from_version"], e["to_version"]) for e in registry.history()] == [
        ("", "1"), ("1", "2"), ("2", "1")]


def test_promoting_the_champion_again_records_nothing(registry):
    registry.promote("1", "first", expected_champion=None)
    again = registry.promote("1", "retried", expected_champion=None)  # a retried task
    assert again["event"] == "none"
    assert [(e["from_version"], e["to_version"]) for e in registry.history()] == [("", "1")]
    registry.promote("2", "better")
    assert registry.rollback("back")["to_version"] == "1"


def test_a_promotion_killed_after_the_alias_moved_is_finished_by_the_next_command(registry):
    registry.promote("1", "first")
    registry._begin("promote", "1", "2", "killed half way", "tester")
    registry.client.set_registered_model_alias(NAME, "champion", "2")  # then SIGKILL
    assert [e["to_version"] for e in registry.history()] == ["1"]  # the record is open

    assert registry.repair() == ["recorded the interrupted move to v2"]
    assert aliases(registry) == {"1": [], "2": ["champion"], "3": []}
    assert [e["to_version"] for e in registry.history()] == ["1", "2"]
    assert registry.repair() == []


def test_a_promotion_killed_before_the_alias_moved_leaves_no_history(registry):
    registry.promote("1", "first")
    registry._begin("promote", "1", "3", "killed before the move", "tester")
    registry.promote("2", "next")  # repairs first
    assert [e["to_version"] for e in registry.history()] == ["1", "2"]
    assert aliases(registry) == {"1": [], "2": ["champion"], "3": []}
