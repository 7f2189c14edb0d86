"""The one config: `params.yaml` read into one pydantic model.

Relative paths in the file are resolved against the file's own folder, so the
same params work from any working directory.
"""

from __future__ import annotations

import re
import zoneinfo
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

DEFAULT_PARAMS = "params.yaml"


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    path: Path = Path("data")
    image_size: int = Field(28, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    # decoded uint8 images kept on disk under .visionops/cache/, keyed on the data version
    # and preprocessing, so later epochs and runs skip decoding; never in RAM
    cache: bool = True
    # decoded images a cached training split is shuffled through (the files themselves
    # are in a random order already): memory, so 1,000 RGB images at 224 px are 150 MB
    shuffle_buffer: int = Field(1_000, ge=1)


Severity = Literal["fail", "warn"]


class SeverityParams(_Section):
    """What each validation finding does: `fail` stops the run, `warn` reports it and
    goes on (an offending file is then left out of training, or, for duplicates, all but
    one copy), `fix` repairs it where that is safe."""

    outside_dataset: Literal["fail"] = "fail"  # never followed: a link may lead anywhere
    undecodable: Severity = "fail"
    format: Severity = "fail"
    mode: Severity = "fail"
    size: Severity = "fail"
    blank: Severity = "fail"
    label_conflict: Severity = "fail"          # one content under two labels
    duplicate_in_label: Literal["fail", "warn", "fix"] = "warn"  # fix: extra copies deleted
    near_duplicate_across_labels: Severity = "warn"  # perceptual hash
    min_images_per_class: Severity = "fail"
    expected_classes: Severity = "fail"
    class_balance: Severity = "fail"


class ValidationParams(_Section):
    allowed_formats: list[Literal["PNG", "JPEG"]] = ["PNG", "JPEG"]
    allowed_modes: list[str] = ["1", "L", "LA", "P", "RGB", "RGBA"]
    min_side: int = Field(8, ge=1)
    max_side: int = Field(8192, ge=1)
    min_images_per_class: int = Field(5, ge=1)
    max_bytes: int = Field(50_000_000, ge=1)  # larger landing files are refused unread
    convert_modes: list[str] = []              # accepted and converted, e.g. CMYK
    expected_classes: list[str] | None = None  # None: any class folders
    max_class_imbalance: float | None = Field(None, ge=1)  # largest / smallest class
    data_docs_dir: Path = Path("reports/data_docs")
    near_duplicate_distance: int = Field(4, ge=0, le=32)  # bits of 64 in the perceptual hash
    severity: SeverityParams = SeverityParams()

    @model_validator(mode="after")
    def _sides_ordered(self) -> ValidationParams:
        if self.min_side > self.max_side:
            raise ValueError("min_side must not exceed max_side")
        return self


class IngestParams(_Section):
    landing: str | None = None  # local folder or s3://bucket/prefix; None: no ingest step
    quarantine_dir: Path = Path("quarantine")
    git_remote: str | None = None  # git remote name or URL to push data.dvc to; None: no push
    git_branch: str = Field("main", min_length=1)


class DriftParams(_Section):
    """Thresholds on each drift statistic (0 = same distribution, 1 = disjoint)."""

    enabled: bool = True
    warn_threshold: float = Field(0.1, ge=0, le=1)
    fail_threshold: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> DriftParams:
        if self.warn_threshold > self.fail_threshold:
            raise ValueError("warn_threshold must not exceed fail_threshold")
        return self


class SplitParams(_Section):
    seed: int = 42
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)

    @model_validator(mode="after")
    def _leaves_training_data(self) -> SplitParams:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must be below 0.9")
        return self


class AugmentParams(_Section):
    enabled: bool = False
    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "none"
    rotation: float = Field(0.0, ge=0, le=1)
    zoom: float = Field(0.0, ge=0, lt=1)
    translation: float = Field(0.0, ge=0, lt=1)
    contrast: float = Field(0.0, ge=0, le=1)
    brightness: float = Field(0.0, ge=0, le=1)


ARCHITECTURES = ("seed_cnn", "seed_cnn_bn", "mobilenet_v3_small", "efficientnet_b0",
                 "resnet50", "vgg16")
Architecture = Literal["seed_cnn", "seed_cnn_bn", "mobilenet_v3_small", "efficientnet_b0",
                       "resnet50", "vgg16"]


class FineTuneParams(_Section):
    """The second phase of transfer learning: the backbone's top layers trained at a low
    learning rate, BatchNorm kept in inference mode. None: the backbone stays frozen."""

    unfreeze_from: int | str | None = None  # layer name, or index (negative: from the top)
    epochs: int = Field(5, ge=1, le=1000)
    learning_rate: float = Field(1e-5, gt=0, le=1)


class ExportParams(_Section):
    """Exports built for a promoted model, each checked against Keras on a sample."""

    formats: list[Literal["saved_model", "tflite", "onnx"]] = ["saved_model", "tflite", "onnx"]
    tolerance: float = Field(1e-4, gt=0)  # max absolute difference in probabilities


class TrainParams(_Section):
    architecture: Architecture = "seed_cnn"
    # starting weights of a keras.applications backbone: None (random), "imagenet"
    # (downloaded by Keras, online only) or the path of a local weights file
    pretrained: str | None = None
    dropout: float = Field(0.2, ge=0, lt=1)  # before a backbone's softmax head
    fine_tune: FineTuneParams = FineTuneParams()
    # float32 | mixed_bfloat16 | mixed_float16 | auto (bfloat16 on CPUs with bf16
    # instructions, float16 on GPUs, else float32); the output layer stays float32
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16", "auto"] = "float32"
    batch_size: int = Field(128, ge=1, le=8192)
    epochs: int = Field(15, ge=1, le=1000)
    learning_rate: float = Field(1e-3, gt=0, le=1)
    early_stopping_patience: int = Field(3, ge=0)
    seed: int = 42
    # tf.distribute: "mirrored" uses every local GPU (or the CPU); "multi_worker_mirrored"
    # spreads over the machines that TF_CONFIG names (see README)
    strategy: Literal["default", "mirrored", "multi_worker_mirrored"] = "default"


class GateParams(_Section):
    metric: Literal["accuracy", "f1_macro", "precision_macro", "recall_macro"] = "f1_macro"
    min_accuracy: float = Field(0.8, ge=0, le=1)
    min_f1_macro: float = Field(0.8, ge=0, le=1)
    min_improvement: float = Field(0.005, ge=0, le=1)
    min_class_recall: float = Field(0.5, ge=0, le=1)  # no class may collapse
    significance: float = Field(0.05, gt=0, le=1)     # McNemar's exact test on paired results


class RegistryParams(_Section):
    model_name: str = Field("visionops-digits", min_length=1)


CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight",
               "@hourly")


class ScheduleParams(_Section):
    cron: str = "0 2 * * *"
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _valid(self) -> ScheduleParams:
        # The form only; Prefect checks each field's values when it builds the schedule.
        if not (re.fullmatch(r"\s*(\S+\s+){4}\S+\s*", self.cron) or self.cron in CRON_MACROS):
            raise ValueError(f"cron {self.cron!r}: five fields expected, e.g. '0 2 * * *', "
                             f"or one of {', '.join(CRON_MACROS)}")
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"timezone {self.timezone!r}: not an IANA time zone") from exc
        return self


class ComputeParams(_Section):
    """Where the per-image work of validation runs."""

    runner: Literal["local", "dask"] = "local"  # local: worker processes on this machine
    dask_address: str | None = None  # a Dask scheduler, e.g. tcp://10.0.0.5:8786; None: a
    dask_workers: int = Field(2, ge=1)  # LocalCluster of this many workers
    dask_processes: bool = True


class NotifyParams(_Section):
    webhook_url: str | None = None  # a failed flow run's summary is POSTed here as JSON


class FeedbackParams(_Section):
    """Production predictions a person should look at: those whose top probability is
    below `confidence_threshold` are copied to `review_dir`/<predicted label>/<file>, the
    landing layout; moving a file into the landing area, under its right label, feeds
    the next ingest."""

    confidence_threshold: float = Field(0.6, ge=0, le=1)  # 0: nothing is copied
    review_dir: str = "review"  # a folder (relative to params.yaml) or s3://bucket/prefix


class ScoringParams(_Section):
    """`visionops score` and the scheduled scoring deployment (prefect.yaml)."""

    source: str | None = None  # folder or s3://bucket/prefix of images to score
    output_dir: Path = Path("predictions")  # <output_dir>/<time>-v<version>.parquet


class ServingParams(_Section):
    """`visionops serve-model`: the online service that follows the champion alias."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    poll_seconds: float = Field(10.0, gt=0)   # how often the champion alias is read
    max_batch: int = Field(64, ge=1)          # images predicted in one model call
    batch_wait_ms: float = Field(2.0, ge=0)   # how long a batch waits for more images
    max_concurrency: int = Field(64, ge=1)    # requests in progress; more get 503
    max_images_per_request: int = Field(64, ge=1)
    max_image_bytes: int = Field(10_000_000, ge=1)  # a larger upload gets 413
    max_request_bytes: int = Field(32_000_000, ge=1)  # a larger request body gets 413
    # request bodies held at once, all requests together: past it, 503 Retry-After
    max_bytes_in_flight: int = Field(256_000_000, ge=1)
    read_timeout_seconds: float = Field(30.0, gt=0)  # a body not read by then: 408
    summary_seconds: float = Field(60.0, gt=0)  # a summary of traffic logged this often


class MlflowParams(_Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_root: Path = Path("mlartifacts")
    experiment_name: str = Field("visionops-retrain", min_length=1)


class Params(_Section):
    data: DataParams = DataParams()
    ingest: IngestParams = IngestParams()
    validation: ValidationParams = ValidationParams()
    drift: DriftParams = DriftParams()
    split: SplitParams = SplitParams()
    augment: AugmentParams = AugmentParams()
    train: TrainParams = TrainParams()
    gate: GateParams = GateParams()
    registry: RegistryParams = RegistryParams()
    export: ExportParams = ExportParams()
    mlflow: MlflowParams = MlflowParams()
    notify: NotifyParams = NotifyParams()
    compute: ComputeParams = ComputeParams()
    schedule: ScheduleParams = ScheduleParams()
    feedback: FeedbackParams = FeedbackParams()
    scoring: ScoringParams = ScoringParams()
    serving: ServingParams = ServingParams()
    root: Path = Field(Path("."), exclude=True)

    @property
    def data_dir(self) -> Path:
        return (self.root / self.data.path).resolve()

    @property
    def landing(self) -> str | None:
        """The landing area from params, a local one resolved against the params folder."""
        source = self.ingest.landing
        if source is None or source.startswith("s3://"):
            return source
        return str((self.root / source).resolve())

    @property
    def training(self) -> TrainParams:
        """`train`, with a `pretrained` weights file resolved against the params folder."""
        weights = self.train.pretrained
        if weights is None or weights == "imagenet" or Path(weights).is_absolute():
            return self.train
        return self.train.model_copy(update={"pretrained": str((self.root / weights).resolve())})

    @property
    def review_dir(self) -> str:
        """The review area, a local one resolved against the params folder."""
        return _resolved(self.root, self.feedback.review_dir)

    @property
    def scoring_source(self) -> str | None:
        source = self.scoring.source
        return None if source is None else _resolved(self.root, source)

    @property
    def scoring_output_dir(self) -> Path:
        return (self.root / self.scoring.output_dir).resolve()

    @property
    def data_docs_dir(self) -> Path:
        return (self.root / self.validation.data_docs_dir).resolve()

    @property
    def tracking_uri(self) -> str:
        uri = self.mlflow.tracking_uri
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
            return prefix + str((self.root / uri[len(prefix) :]).resolve())
        return uri

    @property
    def artifact_location(self) -> str:
        return (self.root / self.mlflow.artifact_root).resolve().as_uri()

    def flat(self) -> dict[str, str]:
        """Every param as `section.key` -> string, for MLflow."""
        def flatten(prefix: str, values: dict) -> dict[str, str]:
            flat = {}
            for key, value in values.items():
                if isinstance(value, dict):
                    flat |= flatten(f"{prefix}{key}.", value)
                else:
                    flat[f"{prefix}{key}"] = str(value)
            return flat

        return flatten("", self.model_dump(mode="json"))

    def loggable(self) -> dict[str, str]:
        """`flat()` less every param that may carry a secret (see `may_carry_secret`):
        what may be logged to MLflow, where anyone who can read the run sees it."""
        return {key: value for key, value in self.flat().items()
                if not may_carry_secret(key, value)}


def _resolved(root: Path, location: str) -> str:
    """A folder resolved against `root`; an s3:// URL as it is."""
    return location if location.startswith("s3://") else str((root / location).resolve())


SECRET_SECTIONS = ("notify",)  # a webhook URL is its own credential
SECRET_NAME_PARTS = ("token", "secret", "password", "credential", "webhook")
SECRET_QUERY_PARTS = ("token", "secret", "passw", "signature", "credential", "auth", "key")
SECRET_QUERY_NAMES = ("sig", "pwd")
WEBHOOK_HOSTS = ("hooks.slack.com", "discord.com", "discordapp.com", "hooks.zapier.com",
                 "webhook.office.com", "outlook.office.com", "chat.googleapis.com",
                 "api.telegram.org")


def may_carry_secret(key: str, value: str) -> bool:
    """True for a param (`section.name` -> its text) that may hold a credential: the
    `notify` section, a name that says so, or a URL with a user or password, a query
    parameter such as token, key, signature or password, or a webhook's host or path."""
    if key.split(".")[0] in SECRET_SECTIONS or \
            any(part in key.rsplit(".", 1)[-1].lower() for part in SECRET_NAME_PARTS):
        return True
    try:
        url = urlsplit(value.strip())
        user, password, host = url.username, url.password, (url.hostname or "")
    except ValueError:  # not a URL Python can parse (an odd port, brackets): keep it out
        return "://" in value
    if not url.scheme or not url.netloc:
        return False
    query_names = [name.lower() for name, _ in parse_qsl(url.query, keep_blank_values=True)]
    return bool(
        user or password
        or any(part in name for name in query_names for part in SECRET_QUERY_PARTS)
        or any(name in SECRET_QUERY_NAMES for name in query_names)
        or any(host == known or host.endswith("." + known) for known in WEBHOOK_HOSTS)
        or "webhook" in url.path.lower() or "/hooks/" in url.path.lower())


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


ENV_PREFIX = "VISIONOPS_"


class _ParamsFile(YamlConfigSettingsSource):
    """params.yaml, with its reading errors as ConfigErrors."""

    def _read_file(self, file_path: Path) -> dict[str, Any]:
        try:
            sections = super()._read_file(file_path)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file_path}: not valid YAML: {exc}") from exc
        if not isinstance(sections, dict):
            raise ConfigError(f"{file_path}: expected a mapping of sections at the top level")
        for section, values in sections.items():
            if values is not None and not isinstance(values, dict):
                raise ConfigError(f"{file_path}: {section}: expected a mapping")
        return sections


_SECTIONS = {name for name, field in Params.model_fields.items()
             if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)}


_SUBSECTIONS = {f"{name}__{key}" for name in _SECTIONS
                for key, field in Params.model_fields[name].annotation.model_fields.items()
                if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)}


class _ParamsEnvironment(EnvSettingsSource):
    """`VISIONOPS_<SECTION>__<KEY>` variables, each value read as YAML as in params.yaml
    (`3`, `true`, `null`, `[PNG, JPEG]`). A variable whose section is no param section
    is handed on too, so that it is refused by name like an unknown key in the file."""

    def prepare_field_value(
        self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool
    ) -> Any:
        prepared = super().prepare_field_value(field_name, field, value, value_is_complex)
        if isinstance(prepared, dict):
            return {key: self._read(f"{field_name}__{key}", raw) for key, raw in prepared.items()}
        if isinstance(prepared, str) and field_name in _SECTIONS:
            raise ConfigError(f"{self.env_prefix}{field_name.upper()}: set one key at a time, "
                              f"as {self.env_prefix}{field_name.upper()}__<KEY>")
        return self._read(field_name, prepared) if isinstance(prepared, str) else prepared

    def _read(self, name: str, value: str | dict) -> object:
        if isinstance(value, dict) and name in _SUBSECTIONS:  # VISIONOPS_TRAIN__FINE_TUNE__EPOCHS
            return {key: self._read(f"{name}__{key}", raw) for key, raw in value.items()}
        if not isinstance(value, str):  # VISIONOPS_TRAIN__EPOCHS__X: below a key
            raise ConfigError(f"{self.env_prefix}{name.upper()}__...: "
                              f"{name.replace('__', '.')} has no keys below it")
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{self.env_prefix}{name.upper()}: not valid YAML: {exc}") from exc

    def __call__(self) -> dict[str, Any]:
        values = super().__call__()
        prefix = self.env_prefix.lower()
        for name, value in self.env_vars.items():
            section, delimiter, key = name.removeprefix(prefix).partition("__")
            if name.startswith(prefix) and delimiter and section not in Params.model_fields:
                values.setdefault(section, {})[key] = value
        return values


class _ParamsSettings(BaseSettings, Params):
    """Where params come from, the first that sets a value winning: `load_params`
    overrides, `VISIONOPS_<SECTION>__<KEY>` variables, the params file (`yaml_file`),
    the defaults above. `VISIONOPS_MLFLOW__TRACKING_URI=http://mlflow:5000` is how one
    deployment differs from another without editing params.yaml (see `visionops stack
    env`). MLFLOW_TRACKING_URI is not read: MLflow itself rewrites it in-process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", enable_decoding=False
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _ParamsEnvironment(settings_cls), _ParamsFile(settings_cls)


def load_params(path: str | Path = DEFAULT_PARAMS, **overrides: object) -> Params:
    """Read and validate params.yaml; `VISIONOPS_<SECTION>__<KEY>` variables and then
    `overrides` (`section__key=value` pairs) replace single values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    sections: dict[str, dict[str, object]] = {}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition("__")
        if not key:
            raise ConfigError(f"override {dotted!r}: expected section__key")
        sections.setdefault(section, {})[key] = value

    class ParamsFromFile(_ParamsSettings):
        model_config = SettingsConfigDict(yaml_file=path)

    try:
        settings = ParamsFromFile(**sections, root=path.resolve().parent)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid params\n{_describe(exc)}") from exc
    except SettingsError as exc:
        raise ConfigError(f"{path}: {exc.__cause__ or exc}") from exc
    return Params(**dict(settings))
