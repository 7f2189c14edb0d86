"""The layering (.importlinter): cli -> flows -> tasks | jobs -> io | ops -> core, with a
pure core. A back-edge fails here, in CI, before review."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", ".importlinter"], cwd=root,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})


def test_the_code_keeps_the_layering():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def copy_of_the_code(tmp_path: Path) -> Path:
    for name in ("visionops", "tasks", "flows"):
        shutil.copytree(REPO / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", tmp_path)
    return tmp_path


def test_a_back_edge_breaks_the_layering(tmp_path):
    root = copy_of_the_code(tmp_path)
    images = root / "visionops" / "core" / "images.py"
    images.write_text(images.read_text() + "\nfrom visionops.io.registry import Registry\n")
    result = lint_imports(root)
    assert result.returncode != 0
    assert "visionops.core.images -> visionops.io.registry" in result.stdout


def test_a_tracking_import_in_core_breaks_the_pure_core(tmp_path):
    root = copy_of_the_code(tmp_path)
    gate = root / "visionops" / "core" / "gate.py"
    gate.write_text(gate.read_text() + "\nimport mlflow\n")
    result = lint_imports(root)
    assert result.returncode != 0
    assert "visionops.core is not allowed to import mlflow" in result.stdout
