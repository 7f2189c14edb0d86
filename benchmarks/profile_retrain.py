"""Where a retrain's time goes: one promoting `visionops retrain` under py-spy.

    .venv/bin/python benchmarks/profile_retrain.py [--epochs E] [--prefect-server]

Makes a project of its own (the demo digits, as benchmarks/run.py does), runs a first
retrain, then one that registers and promotes a model of its own under
`py-spy record --idle`, as the benchmark's overhead figure does, and prints the
main thread's wall time by the line of the CLI or of the flow it was under: imports,
waits (Prefect's temporary server, the serve check) and each step. Needs py-spy
(`pip install py-spy`); samples every 10 ms.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import isolated_env, make_project, params_for_model, prefect_server  # noqa: E402

RATE = 100  # samples per second
OWN_FILES = ("visionops/cli.py", "flows/retrain.py")


def frame_line(frame: str) -> tuple[str, int] | None:
    """('flows/retrain.py', 247) from py-spy's 'retrain (flows/retrain.py:247)'."""
    location = frame.rsplit("(", 1)[-1].rstrip(")")
    path, _, line = location.rpartition(":")
    if path in OWN_FILES and line.isdigit():
        return path, int(line)
    return None


def main_thread_by_line(raw: Path) -> tuple[collections.Counter, float]:
    """Seconds per innermost line of the CLI or the flow, for the command's main thread
    (stacks that start at the console script), and that thread's total."""
    by_line: collections.Counter = collections.Counter()
    total = 0
    for row in raw.read_text().splitlines():
        stack, _, count = row.rpartition(" ")
        frames = stack.split(";")
        if not frames[0].startswith("<module> (visionops"):
            continue
        total += int(count)
        own = [line for line in map(frame_line, frames) if line]
        by_line[own[-1] if own else ("(interpreter start and exit)", 0)] += int(count)
    return by_line, total / RATE


def source(path: str, line: int) -> str:
    if not line:
        return ""
    return (HERE.parent / path).read_text().splitlines()[line - 1].strip()[:70]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--prefect-server", action="store_true",
                        help="run against a `prefect server start` (no temporary server)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("py-spy not found: pip install py-spy")

    scratch = Path(tempfile.mkdtemp(prefix="visionops-profile-"))
    project = make_project(scratch / "project", args.epochs)
    env = isolated_env(scratch)
    bin_dir = Path(sys.executable).parent
    with contextlib.ExitStack() as stack:
        if args.prefect_server:
            env["PREFECT_API_URL"] = stack.enter_context(
                prefect_server(env, scratch / "prefect-server.log"))
        # First a retrain that creates the stores, as the benchmark's first champion does;
        # the profiled one registers a model name of its own, so it promotes too.
        subprocess.run([str(bin_dir / "visionops"), "retrain"], cwd=project, env=env,
                       capture_output=True, check=True)
        params = params_for_model(project, "profiled")
        raw = scratch / "retrain.txt"
        started = time.perf_counter()
        done = subprocess.run([py_spy, "record", "--idle", "-r", str(RATE), "-f", "raw",
                               "-o", str(raw), "--", str(bin_dir / "visionops"), "retrain",
                               "--json", "--params", str(params)], cwd=project, env=env,
                              capture_output=True, text=True, check=True)
        wall = time.perf_counter() - started
    summary = json.loads(next(line for line in reversed(done.stdout.splitlines())
                              if line.startswith("{")))  # py-spy prints after it
    by_line, sampled = main_thread_by_line(raw)
    print(f"retrain: {wall:.1f} s wall under py-spy, {summary['fit_seconds']:.1f} s in "
          f"model.fit, decision {summary['decision']}; main thread sampled {sampled:.1f} s")
    for (path, line), count in by_line.most_common(args.top):
        print(f"{count / RATE:6.2f} s  {path}:{line:<4} {source(path, line)}")


if __name__ == "__main__":
    main()
