"""Params that can carry secrets are never among those logged to MLflow."""

import pytest

from visionops.core.config import Params, may_carry_secret

WEBHOOK = "https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXXXXXXXXXXXXXX"


def test_a_webhook_and_a_tracking_uri_with_a_password_are_not_loggable():
    params = Params(notify={"webhook_url": WEBHOOK},
                    mlflow={"tracking_uri": "https://alice:s3cret@mlflow.example.com"},
                    ingest={"git_remote": "https://x-token:ghp_abc@github.com/o/r.git"})
    loggable = params.loggable()
    assert not [key for key in loggable if key.startswith("notify.")]
    assert "mlflow.tracking_uri" not in loggable
    assert "ingest.git_remote" not in loggable
    assert not any("s3cret" in value or "hooks.slack" in value or "ghp_abc" in value
                   for value in loggable.values())
    assert "notify.webhook_url" in params.flat()  # flat() itself is unchanged


def test_ordinary_params_are_loggable_as_flat_gives_them():
    params = Params(mlflow={"tracking_uri": "http://127.0.0.1:5000"},
                    ingest={"landing": "s3://visionops-landing/incoming"})
    flat, loggable = params.flat(), params.loggable()
    for key in ("train.epochs", "train.learning_rate", "gate.significance",
                "registry.model_name", "mlflow.tracking_uri", "ingest.landing",
                "data.image_size", "schedule.cron"):
        assert loggable[key] == flat[key]
    assert set(flat) - set(loggable) == {"notify.webhook_url"}


@pytest.mark.parametrize("value", [
    "https://example.com/api?token=abc",
    "https://example.com/api?api_key=abc",
    "https://bucket.s3.amazonaws.com/x?X-Amz-Signature=abc&X-Amz-Credential=def",
    "https://example.com/x?sig=abc",
    "https://example.com/x?PASSWORD=abc",
    "postgresql://postgres:pw@127.0.0.1:5432/mlflow",
    "https://user@example.com/",
    "https://discord.com/api/webhooks/1/abc",
    "https://acme.webhook.office.com/webhookb2/abc",
    "https://ci.example.com/hooks/abc",
])
def test_urls_with_credentials_are_recognised(value):
    assert may_carry_secret("mlflow.tracking_uri", value)


@pytest.mark.parametrize("value", [
    "sqlite:///mlflow.db", "sqlite:////abs/mlflow.db", "http://127.0.0.1:5000",
    "s3://bucket/prefix", "file:///tmp/artifacts", "tcp://10.0.0.5:8786",
    "https://example.com/page?page=2&design=x", "0 2 * * *", "None", "seed_cnn",
])
def test_ordinary_values_are_kept(value):
    assert not may_carry_secret("mlflow.tracking_uri", value)


def test_a_name_that_says_secret_is_left_out_whatever_its_value():
    assert may_carry_secret("notify.anything", "None")
    assert may_carry_secret("future.api_token", "plain")
    assert not may_carry_secret("gate.significance", "0.05")
