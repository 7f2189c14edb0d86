"""Register the model version in MLflow and promote it: alias `champion`, stage
Production (while MLflow still has stages), previous champion archived."""

from __future__ import annotations

import json
import warnings

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from prefect import task
from prefect.cache_policies import NO_CACHE

CHAMPION = "champion"


def get_champion(client: MlflowClient, model_name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def load_version(model_name: str, version: str):
    """The Keras model behind a registered version, and the class names it predicts."""
    model = mlflow.tensorflow.load_model(f"models:/{model_name}/{version}")
    tags = MlflowClient().get_model_version(model_name, version).tags
    return model, json.loads(tags.get("class_names", "null"))


def register_model(model, model_name: str, sample: np.ndarray, tags: dict[str, str]
                   ) -> ModelVersion:
    """Log the model to the active run and register it, with signature and input example."""
    signature = infer_signature(sample, model.predict(sample, verbose=0))
    info = mlflow.tensorflow.log_model(model, name="model", signature=signature,
                                       input_example=sample, registered_model_name=model_name)
    client = MlflowClient()
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    return client.get_model_version(model_name, version)


def promote(client: MlflowClient, model_name: str, version: str) -> None:
    client.set_registered_model_alias(model_name, CHAMPION, version)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated, still shown
        client.transition_model_version_stage(model_name, version, "Production",
                                              archive_existing_versions=True)


@task(name="Register model version", cache_policy=NO_CACHE)
def register_task(model, model_name: str, sample: np.ndarray, tags: dict[str, str]
                  ) -> ModelVersion:
    return register_model(model, model_name, sample, tags)


@task(name="Promote to champion")
def promote_task(model_name: str, version: str) -> None:
    promote(MlflowClient(), model_name, version)
