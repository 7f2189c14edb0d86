"""The model registry's operations: who is champion, promotion and rollback, and
the history of alias moves that MLflow itself does not keep.

Every promotion and rollback is recorded as a run in the experiment
`<experiment_name>-promotions` (event, from and to version, reason, actor, and the
new champion's test metrics), so the history lives in the same tracking server as
the models. A promotion takes a lock (visionops.io.locks: across machines with a Prefect
server), re-reads the champion and moves it only if it is the one the gate compared
with; a promotion killed half way is finished or undone by the next one (`repair`).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import socket
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from visionops.core.config import Params
from visionops.io.locks import exclusive

CHAMPION, CHALLENGER = "champion", "challenger"


ANY = object()  # promote() without a compare-and-set
CHAMPION_CHANGED = "champion changed during the run"


class RegistryError(Exception):
    """A registry operation that cannot be done, with the reason."""


class ChampionChanged(RegistryError):
    """The champion is not the one a promotion was decided against."""


def default_actor() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


class Registry:
    def __init__(self, params: Params):
        self.params = params
        self.name = params.registry.model_name
        self.client = MlflowClient(params.tracking_uri)

    # -- reading ---------------------------------------------------------------------------
    def alias(self, alias: str) -> ModelVersion | None:
        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            # A server with basic auth answers 403, not 404, for a model nobody registered yet.
            if exc.error_code == "PERMISSION_DENIED" and not self._exists():
                return None
            raise

    def _exists(self) -> bool:
        found = self.client.search_registered_models(filter_string=f"name = '{self.name}'")
        return any(model.name == self.name for model in found)

    def champion(self) -> ModelVersion | None:
        return self.alias(CHAMPION)

    def version(self, version: str | int) -> ModelVersion:
        try:
            return self.client.get_model_version(self.name, str(version))
        except MlflowException as exc:
            raise RegistryError(f"{self.name} has no version {version}") from exc

    def versions(self) -> list[ModelVersion]:
        found = self.client.search_model_versions(f"name = '{self.name}'")
        return sorted(found, key=lambda v: int(v.version))

    def latest_with(self, tags: dict[str, str]) -> ModelVersion | None:
        """The newest version carrying all of `tags` (e.g. a run's lineage), or None."""
        matching = [v for v in self.versions()
                    if all(v.tags.get(key) == value for key, value in tags.items())]
        return matching[-1] if matching else None

    def history(self) -> list[dict]:
        return [{"time": time.strftime("%Y-%m-%dT%H:%M:%S",
                                       time.localtime(run.info.start_time / 1000)),
                 **{key: run.data.tags.get(key, "") for key in (
                     "event", "from_version", "to_version", "reason", "actor")},
                 "metrics": run.data.metrics} for run in self._history_runs()]

    def listing(self) -> list[dict]:
        promoted = {}
        for event in self.history():
            promoted[event["to_version"]] = event["time"]
        versions = self.versions()
        # search results carry no aliases; the registered model has them all
        aliases = self.client.get_registered_model(self.name).aliases if versions else {}
        rows = []
        for version in versions:
            rows.append({
                "version": str(version.version),
                "aliases": sorted(a for a, v in aliases.items() if str(v) == str(version.version)),
                "metrics": {key.removeprefix("test_"): float(value)
                            for key, value in version.tags.items() if key.startswith("test_")},
                "data_version": version.tags.get("data_version", ""),
                "decision": version.tags.get("decision", ""),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S",
                                         time.localtime(version.creation_timestamp / 1000)),
                "promoted": promoted.get(str(version.version), ""),
                "run_id": version.run_id,
            })
        return rows

    # -- changing --------------------------------------------------------------------------
    def set_challenger(self, version: str | int) -> None:
        self.client.set_registered_model_alias(self.name, CHALLENGER, str(version))

    def promote(self, version: str | int, reason: str, actor: str | None = None,
                event: str = "promote", expected_champion: str | None | object = ANY
                ) -> dict:
        """Make `version` the champion (the `champion` alias) and record the move, with
        the version it replaced, in the history; returns the recorded event.

        Compare-and-set: with `expected_champion` (a version, or None for "no champion"),
        the move happens only if the champion is still that one when the lock is held,
        else ChampionChanged. Promoting the champion again changes and records nothing."""
        version = str(self.version(version).version)
        with self.lock():
            self.repair()
            previous = self.champion()
            previous_version = previous and str(previous.version)
            if previous_version == version:
                return {"event": "none", "model_name": self.name, "from_version": version,
                        "to_version": version, "reason": f"v{version} is already champion",
                        "actor": actor or default_actor()}
            if expected_champion is not ANY and previous_version != (
                    expected_champion and str(expected_champion)):
                raise ChampionChanged(
                    f"{CHAMPION_CHANGED}: the gate compared with "
                    f"{_named(expected_champion)}, the champion is now "
                    f"{_named(previous_version)}")
            journal = self._begin(event, previous_version, version, reason,
                                  actor or default_actor())
            self.client.set_registered_model_alias(self.name, CHAMPION, version)
            self.client.set_terminated(journal["run_id"])
            return journal

    def rollback(self, reason: str, actor: str | None = None) -> dict:
        """Move `champion` back to the version it replaced most recently."""
        with self.lock():
            self.repair()
            current = self.champion()
        if current is None:
            raise RegistryError(f"{self.name} has no champion to roll back")
        for event in reversed(self.history()):
            if event["to_version"] == str(current.version) and event["from_version"]:
                return self.promote(event["from_version"], reason, actor, event="rollback",
                                    expected_champion=str(current.version))
        raise RegistryError(f"{self.name} v{current.version} replaced no earlier champion; "
                            "nothing to roll back to")

    def repair(self) -> list[str]:
        """Finish what a killed promotion left half done; returns what was repaired.

        A promotion first opens its history record (an unfinished run), then moves the
        alias, then finishes the record. The alias decides: a record whose version holds
        it is finished; one whose version does not is marked failed."""
        repaired = []
        champion = self.champion()
        champion_version = champion and str(champion.version)
        for run in self._history_runs(status="RUNNING"):
            to_version = run.data.tags.get("to_version", "")
            if to_version == champion_version:
                self.client.set_terminated(run.info.run_id)
                repaired.append(f"recorded the interrupted move to v{to_version}")
            else:
                self.client.set_terminated(run.info.run_id, status="FAILED")
                repaired.append(f"dropped the move to v{to_version}, which never happened")
        return repaired

    # -- internals -------------------------------------------------------------------------
    @property
    def _history_experiment_name(self) -> str:
        return f"{self.params.mlflow.experiment_name}-promotions"

    def _history_runs(self, status: str = "FINISHED") -> list:
        experiment = self.client.get_experiment_by_name(self._history_experiment_name)
        if experiment is None:
            return []
        return self.client.search_runs(
            [experiment.experiment_id],
            f"tags.model_name = '{self.name}' and attributes.status = '{status}'",
            order_by=["attributes.start_time ASC"], max_results=10_000)

    def _history_experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self._history_experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        local = self.params.tracking_uri.startswith(("sqlite:", "file:", "/"))
        try:
            return self.client.create_experiment(
                self._history_experiment_name,
                artifact_location=self.params.artifact_location if local else None)
        except MlflowException:  # created meanwhile by a racing promotion
            return self.client.get_experiment_by_name(
                self._history_experiment_name).experiment_id

    def _begin(self, event: str, from_version: str | None, to_version: str, reason: str,
               actor: str) -> dict:
        """Open the move's history record; it counts once finished (see repair)."""
        tags = {"event": event, "model_name": self.name, "from_version": from_version or "",
                "to_version": to_version, "reason": reason, "actor": actor}
        run = self.client.create_run(self._history_experiment_id(),
                                     run_name=f"{event} v{from_version or '-'} -> v{to_version}")
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, 0) for key, value in
                   self.version(to_version).tags.items() if key.startswith("test_")]
        self.client.log_batch(run.info.run_id, metrics=metrics,
                              tags=[RunTag(k, v) for k, v in tags.items()])
        return {**tags, "run_id": run.info.run_id}

    def lock(self) -> contextlib.AbstractContextManager:
        """Changes to this model's registry exclude each other: across machines with a
        Prefect server, else on this machine (a file beside a SQLite store, or in
        ~/.cache)."""
        uri = self.params.tracking_uri
        if uri.startswith("sqlite:///"):
            path = Path(uri.removeprefix("sqlite:///") + ".promotion.lock")
        else:
            digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
            path = Path.home() / ".cache" / "visionops" / f"promotion-{digest}.lock"
        return exclusive(f"promotion-{self.name}", path)


def _named(version: str | None) -> str:
    return f"v{version}" if version else "no champion"
