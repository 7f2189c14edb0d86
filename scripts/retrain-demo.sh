#!/usr/bin/env bash
# The main job on embedded defaults: set up .venv, write the demo dataset (scikit-learn's
# digits as PNG files in data/<digit>/), run the retraining flow and print its summary.
# Extra arguments go to `visionops retrain` (e.g. --json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/visionops demo-data data
exec .venv/bin/visionops retrain "$@"
