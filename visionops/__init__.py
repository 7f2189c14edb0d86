"""visionops: keeps an image-recognition model fresh in production."""

import os

# Silence TensorFlow's oneDNN/AVX banner before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

__version__ = "0.1.0"
