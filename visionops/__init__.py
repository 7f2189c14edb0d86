"""visionops: keeps an image-recognition model fresh in production."""

import os

# Silence TensorFlow's oneDNN/AVX banner before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A temporary Prefect server (no PREFECT_API_URL; Prefect's own, or the `visionops`
# command's) gets 20 s to start by default; creating its database on a fresh machine took
# 22 s here, so the first retrain failed.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

# Loading a model never unpickles (MLflow's default is to): forced, not defaulted, so that
# an exported `true` cannot turn it back on. See visionops.core.model_safety.
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"

__version__ = "0.1.0"
