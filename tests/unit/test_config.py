from pathlib import Path

import pytest

from visionops.core.config import ConfigError, Params, load_params

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def write_params(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repo_params_load():
    params = load_params(REPO_PARAMS)
    assert isinstance(params, Params)
    assert params.data.image_size == 28
    assert params.root == REPO_PARAMS.parent
    assert params.data_dir == REPO_PARAMS.parent / "data"


def test_unknown_key_is_refused_and_named(tmp_path):
    path = write_params(tmp_path, "train:\n  epochz: 3\n")
    with pytest.raises(ConfigError) as error:
        load_params(path)
    assert "train.epochz" in str(error.value)
    assert "unknown key" in str(error.value)


def test_unknown_section_is_refused(tmp_path):
    path = write_params(tmp_path, "trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="trian: unknown key"):
        load_params(path)


@pytest.mark.parametrize(("text", "key"), [
    ("train:\n  epochs: 0\n", "train.epochs"),
    ("split:\n  test_fraction: 1.5\n", "split.test_fraction"),
    ("data:\n  channels: 2\n", "data.channels"),
    ("gate:\n  metric: auc\n", "gate.metric"),
])
def test_out_of_range_value_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as error:
        load_params(write_params(tmp_path, text))
    assert key in str(error.value)


def test_split_fractions_must_leave_training_data(tmp_path):
    path = write_params(tmp_path, "split:\n  val_fraction: 0.5\n  test_fraction: 0.45\n")
    with pytest.raises(ConfigError, match="below 0.9"):
        load_params(path)


def test_relative_sqlite_uri_resolves_against_params_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    path = write_params(folder, "mlflow:\n  tracking_uri: sqlite:///mlflow.db\n")
    monkeypatch.chdir(tmp_path)  # somewhere else than the params file
    params = load_params(path)
    assert params.tracking_uri == f"sqlite:///{folder.resolve()}/mlflow.db"


def test_absolute_sqlite_and_http_uris_are_kept(tmp_path):
    absolute = load_params(write_params(tmp_path, "mlflow:\n  tracking_uri: sqlite:////x/m.db\n"))
    assert absolute.tracking_uri == "sqlite:////x/m.db"
    http = load_params(write_params(tmp_path, "mlflow:\n  tracking_uri: http://host:5000\n"))
    assert http.tracking_uri == "http://host:5000"


def test_keyword_override(tmp_path):
    params = load_params(REPO_PARAMS, train__epochs=2, split__seed=7)
    assert params.train.epochs == 2
    assert params.split.seed == 7
    assert load_params(REPO_PARAMS).train.epochs != 2


def test_override_is_validated():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_params(REPO_PARAMS, train__epochs=0)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(write_params(tmp_path, "train: [epochs\n"))


def test_empty_file_gives_defaults(tmp_path):
    assert load_params(write_params(tmp_path, "")).train == Params().train


def test_flat_lists_every_param_by_section_and_key():
    params = load_params(REPO_PARAMS, validation__allowed_formats=["PNG"])
    flat = params.flat()
    assert flat["train.epochs"] == str(params.train.epochs)
    assert flat["validation.allowed_formats"] == "['PNG']"
    assert flat["data.path"] == "data"
    assert "root" not in flat


def test_override_without_section_is_a_config_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n")
    assert load_params(path, train__epochs=2).train.epochs == 2
    with pytest.raises(ConfigError, match="section__key"):
        load_params(path, epochs=2)


def test_environment_overrides_single_values(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONOPS_MLFLOW__TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("VISIONOPS_TRAIN__EPOCHS", "3")
    monkeypatch.setenv("VISIONOPS_POSTGRES_URL", "not a param: no section__key")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")  # MLflow's, not ours
    path = write_params(tmp_path, "train:\n  epochs: 9\n")
    params = load_params(path)
    assert params.tracking_uri == "http://mlflow.internal:5000"
    assert params.train.epochs == 3
    assert load_params(path, train__epochs=5).train.epochs == 5


def test_an_unknown_environment_override_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONOPS_TRAIN__EPOCHZ", "3")
    with pytest.raises(ConfigError, match="train.epochz: unknown key"):
        load_params(write_params(tmp_path, ""))


def test_environment_values_are_read_as_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONOPS_VALIDATION__ALLOWED_FORMATS", "[PNG]")
    monkeypatch.setenv("VISIONOPS_INGEST__LANDING", "null")
    monkeypatch.setenv("VISIONOPS_DATA__CHANNELS", "3")
    monkeypatch.setenv("VISIONOPS_DRIFT__ENABLED", "false")
    monkeypatch.setenv("VISIONOPS_SCHEDULE__CRON", "0 3 * * *")
    params = load_params(write_params(tmp_path, "ingest:\n  landing: landing\n"))
    assert params.validation.allowed_formats == ["PNG"]
    assert params.landing is None
    assert params.data.channels == 3
    assert params.drift.enabled is False
    assert params.schedule.cron == "0 3 * * *"


def test_an_environment_override_of_an_unknown_section_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONOPS_TRIAN__EPOCHS", "3")
    with pytest.raises(ConfigError, match="trian: unknown key"):
        load_params(write_params(tmp_path, ""))


def test_an_environment_value_that_is_not_yaml_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONOPS_VALIDATION__ALLOWED_FORMATS", "[PNG")
    with pytest.raises(ConfigError, match="VISIONOPS_VALIDATION__ALLOWED_FORMATS: not valid YAML"):
        load_params(write_params(tmp_path, ""))


def test_a_section_that_is_not_a_mapping_is_refused_even_when_overridden(tmp_path):
    path = write_params(tmp_path, "train: 5\n")
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_params(path, train__epochs=2)


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_params(write_params(tmp_path, "- train\n"))


def test_an_environment_variable_below_a_key_is_refused_by_name(tmp_path, monkeypatch):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 3\n")
    monkeypatch.setenv("VISIONOPS_TRAIN__EPOCHS__X", "2")
    with pytest.raises(ConfigError, match="VISIONOPS_TRAIN__EPOCHS"):
        load_params(path)


def test_a_whole_section_in_one_variable_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 3\n")
    monkeypatch.setenv("VISIONOPS_TRAIN", "epochs: 2")
    with pytest.raises(ConfigError, match="VISIONOPS_TRAIN__<KEY>"):
        load_params(path)


@pytest.mark.parametrize("cron", ["0 2 * * *", "@daily", "*/15 * * * 1-5"])
def test_cron_takes_five_fields_or_a_macro(tmp_path, cron):
    path = tmp_path / "params.yaml"
    path.write_text(f"schedule:\n  cron: '{cron}'\n")
    assert load_params(path).schedule.cron == cron


def test_a_cron_of_the_wrong_form_is_a_config_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("schedule:\n  cron: '0 2 * *'\n")
    with pytest.raises(ConfigError, match="five fields"):
        load_params(path)


def test_a_pretrained_weights_file_is_relative_to_the_params_folder(tmp_path, monkeypatch):
    params_file = tmp_path / "params.yaml"
    params_file.write_text("train:\n  architecture: mobilenet_v3_small\n"
                           "  pretrained: weights/backbone.weights.h5\n")
    monkeypatch.chdir("/")
    params = load_params(params_file)
    assert params.training.pretrained == str(tmp_path / "weights" / "backbone.weights.h5")
    assert params.train.pretrained == "weights/backbone.weights.h5"  # as written, for MLflow
    online = load_params(params_file, train__pretrained="imagenet")
    assert online.training.pretrained == "imagenet"


def test_a_sub_section_key_is_set_from_the_environment(tmp_path, monkeypatch):
    params_file = tmp_path / "params.yaml"
    params_file.write_text("train:\n  fine_tune:\n    unfreeze_from: -20\n")
    monkeypatch.setenv("VISIONOPS_TRAIN__FINE_TUNE__EPOCHS", "3")
    monkeypatch.setenv("VISIONOPS_VALIDATION__SEVERITY__BLANK", "warn")
    params = load_params(params_file)
    assert (params.train.fine_tune.unfreeze_from, params.train.fine_tune.epochs) == (-20, 3)
    assert params.validation.severity.blank == "warn"
    assert params.flat()["train.fine_tune.epochs"] == "3"
