"""The `visionops` command as a user runs it, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow import MlflowClient

VISIONOPS = str(Path(sys.executable).with_name("visionops"))


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(cwd / ".prefect")  # a temporary Prefect server of its own
    return subprocess.run([VISIONOPS, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def processes_for(prefect_home: Path) -> list[str]:
    """Processes whose environment names this Prefect home: the command and what it started."""
    marker = f"PREFECT_HOME={prefect_home}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.append((environ.parent / "cmdline").read_bytes().replace(b"\0", b" ")
                             .decode()[:200])
        except OSError:  # it ended meanwhile
            pass
    return found


def test_retrain_json_ends_with_the_summary(project):
    result = run("retrain", "--json", cwd=project)

    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["decision"] == "first_champion"
    assert set(summary["metrics"]) >= {"accuracy", "precision_macro", "recall_macro", "f1_macro"}
    assert summary["data_version"].endswith(".dir") and summary["run_id"]
    assert summary["reason"]
    champion = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_model_version_by_alias(
        "tiny-digits", "champion")
    assert str(champion.version) == str(summary["model_version"]) == str(
        summary["champion_version"])
    assert "mlflow ui --backend-store-uri" in result.stdout
    assert "prefect server start" in result.stdout
    # its temporary Prefect server and the serve check's process ended with it
    assert processes_for(project / ".prefect") == []


def test_unknown_param_fails_at_start_naming_the_key(project):
    params = project / "params.yaml"
    params.write_text(params.read_text() + "\nextra_section:\n  learning_rate: 3\n")

    result = run("retrain", cwd=project)

    assert result.returncode == 2
    assert "extra_section: unknown key" in result.stderr
    assert not (project / "mlflow.db").exists()


def test_validate_names_each_offending_file(project):
    assert run("validate", "data", cwd=project).returncode == 0
    (project / "data" / "2" / "notes.png").write_text("not an image")

    result = run("validate", "data", "--json", cwd=project)

    assert result.returncode == 1
    report = json.loads(result.stdout)
    offenders = [item for failure in report["failures"] for item in failure["offenders"]]
    assert any(item.startswith("2/notes.png: not a decodable image") for item in offenders)


def code_deps(pipeline: dict) -> set[str]:
    return {dep for stage in pipeline["stages"].values() for dep in stage["deps"]
            if dep.endswith(".py")}


def test_dvc_stages_depend_on_the_code_that_shapes_their_outputs():
    from visionops.io.tracking import MODEL_CODE

    repo = Path(__file__).resolve().parents[1]
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    assert all((repo / dep).is_file() for dep in code_deps(pipeline)), code_deps(pipeline)
    train_deps = set(pipeline["stages"]["train"]["deps"])
    assert {module.replace(".", "/") + ".py" for module in MODEL_CODE} <= train_deps


def test_dvc_repro_runs_the_same_stages(project):
    repo = Path(__file__).resolve().parents[1]
    (project / "dvc.yaml").write_text((repo / "dvc.yaml").read_text())
    for dep in code_deps(yaml.safe_load((repo / "dvc.yaml").read_text())):
        (project / dep).parent.mkdir(parents=True, exist_ok=True)
        (project / dep).write_bytes((repo / dep).read_bytes())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    result = subprocess.run([str(Path(sys.executable).with_name("dvc")), "repro"], cwd=project,
                            env=env, capture_output=True, text=True, timeout=600)

    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.5
    assert (project / "dvc.lock").exists() and (project / "reports" / "model.keras").exists()
