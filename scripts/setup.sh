#!/usr/bin/env bash
# Create .venv in the repository root and install exactly what uv.lock says into it: the
# project (editable), TensorFlow, the dev tools and the team stack's extra. Installs again
# only when pyproject.toml or uv.lock changed, or another TensorFlow build is asked for:
# VISIONOPS_TENSORFLOW=gpu (CUDA; Linux with an NVIDIA driver) or cpu. Without it, the
# build installed last stays; a new .venv gets cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
stamp=.venv/.visionops-installed
installed_build=$(sed -n 's/.* tensorflow=//p' "$stamp" 2>/dev/null || true)
tensorflow="${VISIONOPS_TENSORFLOW:-${installed_build:-cpu}}"
case "$tensorflow" in
  cpu | gpu) ;;
  *) echo "VISIONOPS_TENSORFLOW is cpu or gpu, not '$tensorflow'" >&2; exit 2 ;;
esac
wanted="$(cat pyproject.toml uv.lock | sha256sum | cut -d' ' -f1) tensorflow=$tensorflow"
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "visionops needs Python 3.11 or newer: set PYTHON=python3.11" >&2; exit 2; }
  "$PYTHON" -m venv .venv
fi
# uv, the version pyproject.toml requires, lives in .venv: it is locked in the dev extra,
# so `uv sync`, which removes what the lock does not name, keeps it.
uv_version=$(.venv/bin/python -c 'import tomllib
uv = tomllib.load(open("pyproject.toml", "rb"))["tool"]["uv"]
print(uv["required-version"].removeprefix("=="))')
if [ "$(.venv/bin/uv --version 2>/dev/null | cut -d' ' -f2)" != "$uv_version" ]; then
  .venv/bin/python -m pip --version > /dev/null 2>&1 || .venv/bin/python -m ensurepip > /dev/null
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "uv==$uv_version"
fi

echo "Installing visionops and its locked dependencies into .venv (about 75 s on 2 cores the first time)..."
# --compile-bytecode: what pip did; without it every process compiles TensorFlow's sources
# again where PYTHONDONTWRITEBYTECODE is set.
UV_PYTHON_DOWNLOADS=never .venv/bin/uv sync --quiet --locked --compile-bytecode \
  --extra "$tensorflow" --extra dev --extra stack
echo "$wanted" > "$stamp"
