"""A month of nights on the team stack: the nightly retrain, unattended, in steady state.

    .venv/bin/python benchmarks/soak.py [--nights 30] [--seed 0] [--keep]

Copies the repository into a temporary folder (its code is what every command runs:
PYTHONPATH points at the copy), makes it a git repository with a bare `origin`, starts
the team stack for it (`visionops stack up` on free ports and databases `soak_<random>_*`)
and runs N simulated nights of `visionops retrain --json` with the landing area on the
stack's object store. Tiny models on tiny data (the scikit-learn digits, 28x28, batch 16).

The scenario is fixed by the seed: batches of new digits arrive in
`s3://visionops-landing/incoming/<label>/<file>.png`; some nights bring nothing; some
batches carry defects (a truncated PNG, a 4x4 image, a key `<label>//<file>`); one night
brings the same bytes under two labels; a new class trickles in, 2 images a night; some
nights run in a fresh `git clone` of origin; one night `visionops models rollback` runs
while the retrain trains; one night two retrains start together; one night the object
store is stopped mid-run (and started again after it); one night the retrain is
SIGKILLed mid-training. With fewer nights (`--nights 4` for a trial) the special nights
are squeezed in proportionally, the first ones kept.

After each night the registry is sampled (exactly one `champion`, the one the alias
lookup names) and every new champion is scored on a fixed holdout that
is never uploaded. At the end one JSON line is printed and written to
benchmarks/soak.json; the exit status is 1 if an invariant fails:

- landing_files.lost == 0 (states from `visionops.io.ingest.landing_states`, against the
  dataset version a fresh clone of origin gets, and, for information, the main worker's)
- champion_checks.failures == 0
- champion_regressions == 0: an unattended champion change to a version that gets more
  than HOLDOUT_TOLERANCE holdout images fewer right than the champion it replaced
- versions_registered <= nights_with_change (nights whose dataset version was new)
- rollbacks_overwritten == 0
- crashed_runs_unreported == 0 (a report in reports/failures/ or a webhook post naming it)
- orphan_processes == 0 (no process carrying this soak's marker outlives `stack down`)

Progress, one line a night, goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import io
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
MODEL = "soak-digits"
EXPERIMENT = "soak"
LANDING_BUCKET = "visionops-landing"
LANDING_PREFIX = "incoming"
MARKER_VARIABLE = "VISIONOPS_SOAK_ID"
HOLDOUT_TOLERANCE = 1  # images: a champion change losing at most this many is noise
BASE_CLASSES = [0, 1, 2, 3, 4]
NEW_CLASS = 7
SEED_PER_CLASS = 8
HOLDOUT_PER_CLASS = 20
HOLDOUT_NEW_CLASS = 10
BATCH_PER_CLASS = 6
TRICKLE_PER_NIGHT = 2
RUN_TIMEOUT_S = 900

# The 30-night plan. Fewer nights squeeze it (see `plan_nights`).
EMPTY_NIGHTS = (4, 9, 15, 22, 28)
DEFECT_NIGHTS = {7: "defects", 19: "truncated"}
DUPLICATE_NIGHT = 11
TRICKLE_NIGHTS = range(6, 21)
CLONE_NIGHTS = (8, 18, 26)
MODE_NIGHTS = [(24, "kill"), (21, "s3_outage"), (13, "rollback"), (16, "two_runs")]

SOAK_PARAMS = {
    "data": {"path": "data", "image_size": 28, "channels": 1},
    "validation": {"min_images_per_class": 5},
    "train": {"epochs": 8, "batch_size": 16, "learning_rate": 0.003,
              "early_stopping_patience": 4},
    "gate": {"min_accuracy": 0.5, "min_f1_macro": 0.5, "min_improvement": 0.01},
    "registry": {"model_name": MODEL},
    "mlflow": {"experiment_name": EXPERIMENT},
    "ingest": {"landing": f"s3://{LANDING_BUCKET}/{LANDING_PREFIX}"},
}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the scenario (pure) ---------------------------------------------------------------

def plan_nights(nights: int) -> dict[int, dict]:
    """night -> {"mode", "clone", "empty", "defects", "duplicate", "trickle"}."""
    def squeeze(night: int) -> int:
        return night if nights >= 30 else max(1, math.ceil(night * nights / 30))

    plan = {n: {"mode": "normal", "clone": False, "empty": False, "defects": None,
                "duplicate": False, "trickle": False} for n in range(1, nights + 1)}
    for night, mode in MODE_NIGHTS:  # in priority order: a taken night pushes it later
        n = max(2, squeeze(night))
        while n <= nights and plan[n]["mode"] != "normal":
            n += 1
        if n <= nights:
            plan[n]["mode"] = mode
    for night in CLONE_NIGHTS:
        n = max(2, squeeze(night))
        if n <= nights:
            plan[n]["clone"] = True
    def plain_night(night: int) -> int:  # a defective batch trains nothing: not on a special run
        n = max(2, squeeze(night))
        while n <= nights and (plan[n]["mode"] != "normal" or plan[n]["defects"]
                               or plan[n]["duplicate"]):
            n += 1
        return n

    for night, kind in DEFECT_NIGHTS.items():
        if (n := plain_night(night)) <= nights:
            plan[n]["defects"] = kind
    if (n := plain_night(DUPLICATE_NIGHT)) <= nights:
        plan[n]["duplicate"] = True
    for night in TRICKLE_NIGHTS:
        n = squeeze(night)
        if n <= nights:
            plan[n]["trickle"] = True
    for night in EMPTY_NIGHTS:  # a night with a special run always brings a batch
        n = squeeze(night)
        if n > 1 and n <= nights and plan[n]["mode"] == "normal" and not plan[n]["defects"] \
                and not plan[n]["duplicate"]:
            plan[n].update(empty=True, trickle=False)
    return plan


def split_pool(pool: Path, seed: int) -> dict:
    """The demo digits, shuffled per class: seed set, holdout, nightly queues."""
    rng = random.Random(seed)
    by_class = {}
    for label in [*BASE_CLASSES, NEW_CLASS]:
        files = sorted((pool / str(label)).glob("*.png"))
        rng.shuffle(files)
        by_class[label] = files
    seed_set = {label: by_class[label][:SEED_PER_CLASS] for label in BASE_CLASSES}
    holdout = {label: by_class[label][SEED_PER_CLASS:SEED_PER_CLASS + HOLDOUT_PER_CLASS]
               for label in BASE_CLASSES}
    holdout[NEW_CLASS] = by_class[NEW_CLASS][:HOLDOUT_NEW_CLASS]
    queues = {label: by_class[label][SEED_PER_CLASS + HOLDOUT_PER_CLASS:]
              for label in BASE_CLASSES}
    queues[NEW_CLASS] = by_class[NEW_CLASS][HOLDOUT_NEW_CLASS:]
    return {"seed": seed_set, "holdout": holdout, "queues": queues}


def night_uploads(night: int, plan: dict, queues: dict) -> tuple[dict[str, bytes], list[str]]:
    """The landing keys (<label>/<file>) and bytes a night brings, and what is special."""
    from PIL import Image

    uploads: dict[str, bytes] = {}
    notes: list[str] = []
    if plan["empty"]:
        return uploads, ["nothing arrives"]
    for label in BASE_CLASSES:
        for _ in range(BATCH_PER_CLASS):
            if queues[label]:
                path = queues[label].pop(0)
                uploads[f"{label}/n{night:02d}_{path.name}"] = path.read_bytes()
    notes.append(f"batch {len(uploads)}")
    if plan["trickle"]:
        for _ in range(TRICKLE_PER_NIGHT):
            if queues[NEW_CLASS]:
                path = queues[NEW_CLASS].pop(0)
                uploads[f"{NEW_CLASS}/n{night:02d}_{path.name}"] = path.read_bytes()
        notes.append(f"+{TRICKLE_PER_NIGHT} of new class {NEW_CLASS}")
    if plan["duplicate"]:
        key = next(k for k in uploads if k.startswith("3/"))
        uploads[f"0/n{night:02d}_dup_of_{Path(key).name}"] = uploads[key]
        notes.append(f"duplicate of {key} under 0/")
    if plan["defects"]:
        donor = queues[1].pop(0).read_bytes() if queues[1] else next(iter(uploads.values()))
        uploads[f"1/n{night:02d}_truncated.png"] = donor[:len(donor) // 2]
        notes.append("truncated PNG")
        if plan["defects"] == "defects":
            tiny = io.BytesIO()
            Image.new("L", (4, 4), 128).save(tiny, format="PNG")
            uploads[f"2/n{night:02d}_tiny4x4.png"] = tiny.getvalue()
            odd = queues[3].pop(0).read_bytes() if queues[3] else tiny.getvalue()
            uploads[f"3//n{night:02d}_doubleslash.png"] = odd
            notes.append("4x4 image, key with //")
    return uploads, notes


def champion_problems(versions: list[dict], alias_version: str | None) -> list[str]:
    """Why a registry sample breaks 'exactly one champion, the one the alias lookup names'."""
    if not versions:
        return []
    champions = [v["version"] for v in versions if "champion" in v.get("aliases", [])]
    problems = []
    if len(champions) != 1:
        problems.append(f"{len(champions)} versions carry alias champion: {champions}")
    if alias_version is not None and champions and champions != [alias_version]:
        problems.append(f"alias lookup says v{alias_version}, versions say {champions}")
    return problems


# --- adapters: processes, the stack, MLflow, S3 ----------------------------------------

class Webhook:
    """A tiny HTTP server counting what `notify.webhook_url` receives."""

    def __init__(self) -> None:
        posts = self.posts = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the standard library's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                posts.append(body.decode(errors="replace"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Soak:
    def __init__(self, scratch: Path, seed: int):
        self.scratch = scratch
        self.seed = seed
        self.repo = scratch / "repo"
        self.origin = scratch / "origin.git"
        self.state_dir = scratch / "stack"
        self.logs = scratch / "logs"
        self.logs.mkdir(parents=True)
        self.marker = secrets.token_hex(6)
        self.db_prefix = f"soak_{self.marker}"
        self.stack = None
        self.webhook = Webhook()
        self.run_dirs: list[Path] = []
        self.killed_runs: list[dict] = []
        self.scores: dict[str, dict] = {}
        self.started_pids: set[int] = set()

    # environment ------------------------------------------------------------------

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "VISIONOPS_"))
               or k == "VISIONOPS_POSTGRES_URL"}
        env.update(PYTHONPATH=str(self.repo), PREFECT_HOME=str(self.scratch / "prefect-home"),
                   TF_CPP_MIN_LOG_LEVEL="2", **{MARKER_VARIABLE: self.marker})
        return env

    def client_env(self) -> dict[str, str]:
        return {**self.base_env(), **self.stack.client_env()}

    def command(self, args: list[str], cwd: Path, env: dict, name: str,
                timeout: float = RUN_TIMEOUT_S, check: bool = False) -> dict:
        """Run to the end; stdout and stderr kept in logs/<name>.{out,err}."""
        start = time.monotonic()
        out, err = self.logs / f"{name}.out", self.logs / f"{name}.err"
        with out.open("w") as stdout, err.open("w") as stderr:
            process = subprocess.Popen(args, cwd=cwd, env=env, stdout=stdout, stderr=stderr)
            self.started_pids.add(process.pid)
            try:
                rc = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                rc = process.wait()
        done = {"rc": rc, "stdout": out.read_text(errors="replace"),
                "stderr": err.read_text(errors="replace"),
                "seconds": round(time.monotonic() - start, 1)}
        if check and rc != 0:
            raise RuntimeError(f"{' '.join(map(str, args))} exited {rc}:\n"
                               f"{done['stdout'][-3000:]}\n{done['stderr'][-3000:]}")
        return done

    def visionops(self, *args: str, cwd: Path | None = None, env: dict | None = None,
                  name: str, **kwargs) -> dict:
        return self.command([str(BIN / "visionops"), *args], cwd or self.repo,
                            env or self.client_env(), name, **kwargs)

    def start(self, args: list[str], cwd: Path, name: str) -> tuple[subprocess.Popen, Path, Path]:
        out, err = self.logs / f"{name}.out", self.logs / f"{name}.err"
        process = subprocess.Popen(args, cwd=cwd, env=self.client_env(),
                                   stdout=out.open("w"), stderr=err.open("w"))
        self.started_pids.add(process.pid)
        return process, out, err

    # setup ------------------------------------------------------------------------

    def make_repository(self, pool: Path, split: dict) -> None:
        import yaml

        files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"],
                               cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
        for name in filter(None, (f.decode() for f in files)):
            source = REPO / name
            if source.is_file() and not name.startswith(("data/", "benchmarks/soak.json")):
                target = self.repo / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        params = yaml.safe_load((self.repo / "params.yaml").read_text())
        for section, values in SOAK_PARAMS.items():
            params[section].update(values)
        params["notify"]["webhook_url"] = self.webhook.url
        if "git_remote" in params["ingest"]:
            params["ingest"].update(git_remote="origin", git_branch="main")
        (self.repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for label, paths in split["seed"].items():
            (self.repo / "data" / str(label)).mkdir(parents=True)
            for path in paths:
                shutil.copy2(path, self.repo / "data" / str(label) / path.name)
        git = ["git", "-c", "init.defaultBranch=main"]
        subprocess.run([*git, "init", "-q", "--bare", str(self.origin)], check=True)
        subprocess.run([*git, "init", "-q", str(self.repo)], check=True)
        for args in (["remote", "add", "origin", str(self.origin)], ["add", "-A"],
                     ["commit", "-qm", "soak: the repository at the start"]):
            subprocess.run(["git", *args], cwd=self.repo, check=True, capture_output=True)

    def stack_up(self, project: Path, name: str) -> dict:
        return self.visionops("stack", "up", "--project", str(project), "--state-dir",
                              str(self.state_dir), "--s3-port", "0", "--mlflow-port", "0",
                              "--prefect-port", "0", "--db-prefix", self.db_prefix,
                              env=self.base_env(), name=name, timeout=400)

    def setup(self, pool: Path, split: dict) -> None:
        from visionops.ops.stack import Stack

        self.make_repository(pool, split)
        up = self.stack_up(self.repo, "stack-up")
        self.stack = Stack.load(self.repo, self.state_dir)
        if up["rc"] != 0:
            raise RuntimeError("stack up failed:\n" + up["stdout"][-3000:] + up["stderr"][-3000:])
        dvc = str(BIN / "dvc")
        env = self.client_env()
        for args in (["add", "-q", "data"], ["push", "-q"]):
            self.command([dvc, *args], self.repo, env, f"setup-dvc-{args[0]}", check=True)
        for args in (["add", "data.dvc", ".gitignore"], ["commit", "-qm", "soak: seed dataset"],
                     ["push", "-q", "-u", "origin", "main"]):
            subprocess.run(["git", *args], cwd=self.repo, check=True, capture_output=True)
        self.run_dirs.append(self.repo)
        self.landing = self.stack.object_store().client()

    def fresh_clone(self, name: str) -> tuple[Path, list[str]]:
        """A fresh clone of origin, set up as a new worker would be: `stack up` for it
        writes its DVC remote (.dvc/config.local); data/ is left to the flow."""
        clone = self.scratch / name
        notes = []
        subprocess.run(["git", "clone", "-q", str(self.origin), str(clone)], check=True,
                       capture_output=True)
        up = self.stack_up(clone, f"{name}-stack-up")
        notes.append("clone: stack up for its DVC remote "
                     + ("ok" if up["rc"] == 0 else f"FAILED rc {up['rc']}"))
        self.run_dirs.append(clone)
        return clone, notes

    # the registry through MLflow's REST API, as admin ------------------------------

    def mlflow(self, path: str, params: dict | None = None, body: dict | None = None):
        import requests

        auth = self.stack.user("admin")
        url = self.stack.mlflow_url + path
        if body is None:
            return requests.get(url, params=params, auth=auth, timeout=30)
        return requests.post(url, json=body, auth=auth, timeout=30)

    def versions(self) -> list[dict]:
        answer = self.mlflow("/api/2.0/mlflow/model-versions/search",
                             {"filter": f"name='{MODEL}'", "max_results": 1000})
        if not answer.ok:
            return []
        versions = answer.json().get("model_versions", [])
        model = self.mlflow("/api/2.0/mlflow/registered-models/get", {"name": MODEL})
        aliases = model.json()["registered_model"].get("aliases", []) if model.ok else []
        for version in versions:  # the search leaves aliases out
            version["aliases"] = [a["alias"] for a in aliases
                                  if a["version"] == version["version"]]
        return versions

    def champion(self) -> str | None:
        answer = self.mlflow("/api/2.0/mlflow/registered-models/alias",
                             {"name": MODEL, "alias": "champion"})
        return answer.json()["model_version"]["version"] if answer.ok else None

    def history(self) -> list[dict]:
        done = self.visionops("models", "history", "--json", "--params",
                              str(self.repo / "params.yaml"), name="history", timeout=120)
        try:
            return json.loads(done["stdout"].strip().splitlines()[-1])
        except (ValueError, IndexError):
            return []

    def wait_for_training(self, process: subprocess.Popen, since_ms: int,
                          timeout: float = 300) -> bool:
        """Until a running retrain has logged its first epoch (or the process ended)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            experiment = self.mlflow("/api/2.0/mlflow/experiments/get-by-name",
                                     {"experiment_name": EXPERIMENT})
            if experiment.ok:
                runs = self.mlflow("/api/2.0/mlflow/runs/search", body={
                    "experiment_ids": [experiment.json()["experiment"]["experiment_id"]],
                    "filter": f"attributes.status = 'RUNNING' and "
                              f"attributes.start_time > {since_ms}"}).json()
                for run in runs.get("runs", []):
                    if any(m["key"] == "loss" for m in run["data"].get("metrics", [])):
                        return True
            time.sleep(0.5)
        return False

    def score(self, versions: list[str], holdout: Path) -> None:
        """Holdout images right, per registered version, scored in a fresh process."""
        wanted = [v for v in versions if v and v not in self.scores]
        if not wanted:
            return
        done = self.command([sys.executable, str(Path(__file__).resolve()), "--score",
                             ",".join(wanted), "--params", str(self.repo / "params.yaml"),
                             "--holdout", str(holdout)], self.repo, self.client_env(),
                            f"score-{'-'.join(wanted)}", timeout=600)
        try:
            self.scores.update(json.loads(done["stdout"].strip().splitlines()[-1]))
        except (ValueError, IndexError):
            say(f"  scoring v{wanted} failed: {done['stderr'][-1500:]}")
            for v in wanted:
                self.scores[v] = {"correct": None, "total": None, "error": done["stderr"][-500:]}

    def prefect_runs(self) -> list[dict]:
        answer = self.stack.prefect_session().post(self.stack.prefect_api_url
                                                   + "/flow_runs/filter",
                                                   json={"limit": 200}, timeout=30)
        answer.raise_for_status()  # an unanswered question must not read as "no runs"
        return answer.json()

    def soak_processes(self) -> list:
        import psutil

        found = []
        for process in psutil.process_iter(["pid", "cmdline"]):
            if process.pid == os.getpid():
                continue
            with contextlib.suppress(psutil.Error):
                if process.environ().get(MARKER_VARIABLE) == self.marker:
                    found.append(process)
        return found


# --- one night -------------------------------------------------------------------------

def parse_summary(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    return None


def flow_run_names(text: str) -> list[str]:
    return sorted(set(re.findall(r"[Ff]low run '([\w-]+)'", text)))


def last_error(done: dict) -> str:
    lines = [line for line in (done["stdout"] + done["stderr"]).splitlines()
             if re.search(r"error|Error|Traceback|failed|Crash", line)]
    return (lines[-1] if lines else (done["stderr"] or done["stdout"])[-300:]).strip()[:400]


def run_night(soak: Soak, night: int, plan: dict, workdir: Path, notes: list[str]) -> list[dict]:
    params = str(workdir / "params.yaml")
    retrain = [str(BIN / "visionops"), "retrain", "--json", "--params", params]
    mode = plan["mode"]
    name = f"night{night:02d}"
    since_ms = int(time.time() * 1000) - 2000
    if mode == "normal":
        return [soak.command(retrain, workdir, soak.client_env(), name)]
    if mode == "two_runs":
        runs = [soak.start(retrain, workdir, f"{name}-{i}") for i in (1, 2)]
        results = []
        for process, out, err in runs:
            try:
                rc = process.wait(timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                rc = process.wait()
            results.append({"rc": rc, "stdout": out.read_text(errors="replace"),
                            "stderr": err.read_text(errors="replace")})
        return results
    process, out, err = soak.start(retrain, workdir, name)
    training = soak.wait_for_training(process, since_ms)
    notes.append("training seen" if training else "training NOT seen before the action")
    if mode == "rollback":
        before = soak.champion()
        done = soak.visionops("models", "rollback", "--reason", "soak: operator rollback",
                              "--params", params, cwd=workdir, name=f"{name}-rollback")
        after = soak.champion()
        plan["rollback"] = {"rc": done["rc"], "from": before, "to": after,
                            "output": (done["stdout"] + done["stderr"]).strip()[-400:]}
        notes.append(f"rollback rc {done['rc']}: v{before} -> v{after}")
    elif mode == "s3_outage":
        down = soak.visionops("stack", "down", "--project", str(soak.repo), "--state-dir",
                              str(soak.state_dir), "--only", "s3", env=soak.base_env(),
                              name=f"{name}-s3-down")
        notes.append(f"object store stopped (rc {down['rc']})")
    elif mode == "kill":
        import psutil

        children = []
        with contextlib.suppress(psutil.Error):
            children = [c.pid for c in psutil.Process(process.pid).children(recursive=True)]
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        time.sleep(5)
        survivors = []
        for pid in children:
            with contextlib.suppress(psutil.Error):
                child = psutil.Process(pid)
                if child.status() != psutil.STATUS_ZOMBIE:
                    survivors.append(f"{pid}: {' '.join(child.cmdline())[:160]}")
        text = out.read_text(errors="replace") + err.read_text(errors="replace")
        soak.killed_runs.append({"night": night, "flow_runs": flow_run_names(text),
                                 "children_alive_5s_after": survivors})
        notes.append(f"SIGKILLed pid {process.pid}; children alive 5 s later: {survivors}")
    try:
        rc = process.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        rc = process.wait()
    result = {"rc": rc, "stdout": out.read_text(errors="replace"),
              "stderr": err.read_text(errors="replace")}
    if mode == "s3_outage":
        up = soak.stack_up(soak.repo, f"{name}-s3-up")
        notes.append(f"object store started again (rc {up['rc']})")
    return [result]


def dataset_md5(workdir: Path) -> str | None:
    import yaml

    with contextlib.suppress(Exception):
        return yaml.safe_load((workdir / "data.dvc").read_text())["outs"][0]["md5"]
    return None


# --- the whole soak --------------------------------------------------------------------

def soak_main(args) -> int:
    import psutil

    from visionops.core.demo import write_digits

    scratch = Path(tempfile.mkdtemp(prefix="visionops-soak-"))
    say(f"soak: {args.nights} nights in {scratch}")
    pool = scratch / "pool"
    write_digits(pool)
    split = split_pool(pool, args.seed)
    holdout = scratch / "holdout"
    for label, paths in split["holdout"].items():
        (holdout / str(label)).mkdir(parents=True)
        for path in paths:
            shutil.copy2(path, holdout / str(label) / path.name)
    plan = plan_nights(args.nights)
    soak = Soak(scratch, args.seed)
    started = time.monotonic()
    nights, failures_seen = [], []
    uploaded: dict[str, str] = {}  # key -> night
    checks = {"samples": 0, "failures": 0, "problems": []}
    regressions, overwritten = [], []
    registered_before: set[str] = set()
    seen_md5: set[str] = set()
    nights_with_change = 0
    rollback_guard = None  # (rolled-back-to version, highest version at the rollback)
    result: dict = {"nights": args.nights, "seed": args.seed}
    try:
        soak.setup(pool, split)
        seen_md5.add(dataset_md5(soak.repo))
        say(f"stack up in {time.monotonic() - started:.0f} s: MLflow {soak.stack.mlflow_url}, "
            f"Prefect {soak.stack.prefect_api_url}, S3 {soak.stack.s3_endpoint}")
        previous_champion = None
        for night in range(1, args.nights + 1):
            night_start = time.monotonic()
            today = plan[night]
            uploads, notes = night_uploads(night, today, split["queues"])
            for key, body in uploads.items():
                soak.landing.put_object(Bucket=LANDING_BUCKET, Key=f"{LANDING_PREFIX}/{key}",
                                        Body=body)
                uploaded[key] = night
            workdir = soak.repo
            if today["clone"]:
                workdir, clone_notes = soak.fresh_clone(f"clone-night{night:02d}")
                notes += clone_notes
            runs = run_night(soak, night, today, workdir, notes)
            summaries = [parse_summary(r["stdout"]) for r in runs]
            for run, summary in zip(runs, summaries, strict=True):
                if summary is None and run["rc"] not in (-signal.SIGKILL,):
                    failures_seen.append({"night": night, "rc": run["rc"],
                                          "error": last_error(run),
                                          "flow_runs": flow_run_names(run["stdout"]
                                                                      + run["stderr"])})
            md5 = dataset_md5(workdir)
            changed = md5 is not None and md5 not in seen_md5
            nights_with_change += changed
            seen_md5.add(md5)

            champion = soak.champion()
            versions = soak.versions()
            problems = champion_problems(versions, champion)
            if versions:
                checks["samples"] += 1
                if problems:
                    checks["failures"] += 1
                    checks["problems"].append({"night": night, "problems": problems})
            all_versions = {v["version"] for v in versions}
            new_versions = sorted(all_versions - registered_before, key=int)
            registered_before |= all_versions

            operator_to = None
            if today["mode"] == "rollback" and today.get("rollback", {}).get("rc") == 0:
                operator_to = today["rollback"]["to"]
                rollback_guard = (operator_to, max(map(int, all_versions)))
            if champion and champion != previous_champion:
                soak.score([champion, previous_champion], holdout)
                unattended = champion != operator_to
                replaced = operator_to if (operator_to and unattended) else previous_champion
                soak.score([replaced], holdout)
                now_right = soak.scores.get(champion, {}).get("correct")
                before_right = (soak.scores.get(replaced, {}).get("correct")
                                if replaced else None)
                if unattended and None not in (now_right, before_right) \
                        and now_right < before_right - HOLDOUT_TOLERANCE:
                    regressions.append({"night": night, "from": replaced, "to": champion,
                                        "holdout_right": [before_right, now_right]})
                if rollback_guard and unattended and operator_to is None \
                        and int(champion) <= rollback_guard[1]:
                    overwritten.append({"night": night, "champion": champion,
                                        "rolled_back_to": rollback_guard[0]})
            if operator_to and champion != operator_to:
                overwritten.append({"night": night, "champion": champion,
                                    "rolled_back_to": operator_to})

            decisions = [(s["decision"], s.get("model_version")) if s else
                         (f"rc {r['rc']}", None) for r, s in zip(runs, summaries, strict=True)]
            record = {"night": night, "where": workdir.name, "mode": today["mode"],
                      "uploaded": len(uploads), "notes": notes, "data_changed": changed,
                      "decisions": decisions, "new_versions": new_versions,
                      "champion": champion, "champion_problems": problems,
                      "seconds": round(time.monotonic() - night_start, 1)}
            if today.get("rollback"):
                record["rollback"] = today["rollback"]
            for run, summary in zip(runs, summaries, strict=True):
                if summary is None and run["rc"] != -signal.SIGKILL:
                    record.setdefault("errors", []).append(last_error(run))
            nights.append(record)
            say(f"night {night:2d} [{workdir.name}] {today['mode']}: {'; '.join(notes)} | "
                + ", ".join(f"{d}{' v' + str(v) if v else ''}" for d, v in decisions)
                + f" | new {new_versions or '-'} champion v{champion}"
                + (f" PROBLEMS {problems}" if problems else "")
                + f" | {record['seconds']:.0f} s")
            if record.get("errors"):
                say("    " + " / ".join(record["errors"]))
            previous_champion = champion

        result.update(finish(soak, uploaded, split, holdout))
    finally:
        orphans = teardown(soak, psutil)
    result.update({
        "champion_checks": checks,
        "champion_regressions": len(regressions),
        "regressions": regressions,
        "holdout_tolerance_images": HOLDOUT_TOLERANCE,
        "holdout_scores": soak.scores,
        "versions_registered": len(registered_before),
        "nights_with_change": nights_with_change,
        "nights_changing_params": 0,
        "versions_on_nights_without_change": [
            {"night": r["night"], "where": r["where"], "versions": r["new_versions"]}
            for r in nights if r["new_versions"] and not r["data_changed"]],
        "rollbacks_overwritten": len(overwritten),
        "overwrites": overwritten,
        "failed_runs": failures_seen,
        "orphan_processes": len(orphans),
        "orphans": orphans,
        "night_log": nights,
        "wall_s": round(time.monotonic() - started, 1),
        "scratch": str(scratch),
    })
    invariants = {
        "landing_files.lost == 0": result.get("landing_files", {}).get("lost", 1) == 0,
        "champion_checks.failures == 0": checks["failures"] == 0,
        "champion_regressions == 0": not regressions,
        "versions_registered <= nights_with_change": result["versions_registered"]
        <= nights_with_change,
        "rollbacks_overwritten == 0": not overwritten,
        "crashed_runs_unreported == 0": result.get("crashed_runs_unreported", 1) == 0,
        "orphan_processes == 0": not orphans,
    }
    result["invariants_failed"] = [name for name, ok in invariants.items() if not ok]
    line = json.dumps(result)
    (HERE / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    print(line, flush=True)
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if result["invariants_failed"] else 0


def finish(soak: Soak, uploaded: dict, split: dict, holdout: Path) -> dict:
    """Landing states (origin's dataset version and the main worker's), crash reports."""
    out: dict = {}
    final, notes = soak.fresh_clone("final-clone")
    pulled = soak.command([str(BIN / "dvc"), "pull", "-q", "data.dvc"], final, soak.client_env(),
                          "final-dvc-pull")
    views = {}
    for view, workdir in (("origin", final), ("main_worker", soak.repo)):
        done = soak.command([sys.executable, str(Path(__file__).resolve()), "--landing-states",
                             "--params", str(workdir / "params.yaml")], workdir,
                            soak.client_env(), f"landing-states-{view}", timeout=300)
        try:
            views[view] = json.loads(done["stdout"].strip().splitlines()[-1])
        except (ValueError, IndexError):
            views[view] = {"error": last_error(done)}
    # What the store lists is what landed (SeaweedFS stores `3//x.png` as `3/x.png`).
    listed = set()
    for page in soak.landing.get_paginator("list_objects_v2").paginate(
            Bucket=LANDING_BUCKET, Prefix=LANDING_PREFIX + "/"):
        for item in page.get("Contents", []):
            key = item["Key"][len(LANDING_PREFIX) + 1:]
            if not key.startswith(".visionops/"):
                listed.add(key)
    unlisted = sorted(k for k in uploaded if re.sub("/+", "/", k) not in listed)
    out["landing_files"] = landing_summary(views.get("origin", {}), listed)
    out["landing_files"].update(origin_dvc_pull_rc=pulled["rc"], uploaded=len(uploaded),
                                uploaded_but_not_listed=unlisted)
    out["landing_files"]["lost"] += len(unlisted)
    out["landing_files_main_worker"] = landing_summary(views.get("main_worker", {}), listed)

    # crash reports: files under reports/failures/ of every working copy, webhook posts
    reports = []
    for workdir in soak.run_dirs:
        folder = workdir / "reports" / "failures"
        if folder.is_dir():
            reports += [p.read_text(errors="replace") for p in sorted(folder.iterdir())
                        if p.is_file()]
    evidence = reports + soak.webhook.posts
    runs = soak.prefect_runs()
    crashed = {r["name"] for r in runs if r.get("state_type") == "CRASHED"}
    killed = {name for k in soak.killed_runs for name in k["flow_runs"]}
    unreported = sorted(name for name in crashed | killed
                        if not any(name in text for text in evidence))
    failed = {r["name"] for r in runs if r.get("state_type") == "FAILED"}
    out.update({
        "crashed_runs": sorted(crashed | killed),
        "crashed_runs_unreported": len(unreported) + sum(not k["flow_runs"]
                                                        for k in soak.killed_runs),
        "unreported": unreported,
        "killed": soak.killed_runs,
        "failed_runs_unreported": sorted(name for name in failed
                                         if not any(name in text for text in evidence)),
        "failure_reports": len(reports),
        "webhook_posts": len(soak.webhook.posts),
        "prefect_run_states": {state: sum(r.get("state_type") == state for r in runs)
                               for state in sorted({r.get("state_type") for r in runs})},
        "final_champion": soak.champion(),
        "history": soak.history(),
    })
    return out


def landing_summary(states: dict, uploaded: dict) -> dict:
    if "error" in states:
        return {"error": states["error"], "total": len(uploaded), "lost": len(uploaded)}
    counts = {"total": len(uploaded), "accepted": 0, "quarantined": 0, "pending": 0, "lost": 0}
    for key in uploaded:
        state = states.get(key)
        counts[state if state in counts else "lost"] += 1
    counts["lost_keys"] = sorted(k for k in uploaded if states.get(k) not in
                                 ("accepted", "quarantined", "pending"))[:50]
    counts["pending_keys"] = sorted(k for k in uploaded if states.get(k) == "pending")[:50]
    return counts


def teardown(soak: Soak, psutil) -> list[dict]:
    """Stack down --purge, then every process still carrying the soak's marker is an
    orphan: recorded, then stopped."""
    if soak.stack is not None:
        down = soak.visionops("stack", "down", "--project", str(soak.repo), "--state-dir",
                              str(soak.state_dir), "--purge", env=soak.base_env(),
                              name="stack-down", timeout=300)
        if down["rc"] != 0:
            say("stack down failed: " + last_error(down))
    soak.webhook.close()
    time.sleep(2)
    orphans = []
    for process in soak.soak_processes():
        with contextlib.suppress(psutil.Error):
            orphans.append({"pid": process.pid, "cmdline": " ".join(process.cmdline())[:300]})
            process.kill()
    return orphans


# --- helpers run in a process of their own, with the copy's code ----------------------

def score_versions(versions: list[str], params_file: str, holdout: Path) -> None:
    import numpy as np

    from visionops.core.config import load_params
    from visionops.core.pipeline import load_pixels, model_input, scale_for
    from visionops.io.models import load_registered_version

    params = load_params(params_file)
    paths = sorted(holdout.rglob("*.png"))
    truth = [p.parent.name for p in paths]
    scores = {}
    for version in versions:
        loaded = load_registered_version(params, version)
        pixels = load_pixels(paths, *model_input(loaded.model))
        predicted = np.argmax(loaded.model.predict(scale_for(pixels, loaded.input_contract),
                                                   verbose=0), axis=1)
        names = loaded.class_names or []
        correct = sum(names[i] == t for i, t in zip(predicted, truth, strict=True))
        scores[version] = {"correct": int(correct), "total": len(paths)}
    print(json.dumps(scores))


def print_landing_states(params_file: str) -> None:
    from visionops.core.config import load_params

    params = load_params(params_file)
    try:
        from visionops.io.ingest import landing_states
    except ImportError:  # computed from the markers and the files in data/
        from visionops.io.landing import open_landing

        landing = open_landing(params.landing)
        markers = landing.markers()
        present = {p.relative_to(params.data_dir).as_posix()
                   for p in params.data_dir.rglob("*") if p.is_file()}
        states = {}
        for file in landing.list():
            marker = markers.get((file.key, file.fingerprint))
            status = marker and marker.get("status")
            states[file.key] = ("pending" if marker is None else
                                "quarantined" if status == "quarantined" else
                                "accepted" if status == "accepted"
                                and marker.get("path", file.key) in present else "lost")
        print(json.dumps(states))
        return
    print(json.dumps(landing_states(params.landing, params)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--score", help=argparse.SUPPRESS)
    parser.add_argument("--landing-states", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    parser.add_argument("--holdout", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score:
        score_versions(args.score.split(","), args.params, Path(args.holdout))
        return
    if args.landing_states:
        print_landing_states(args.params)
        return
    sys.exit(soak_main(args))


if __name__ == "__main__":
    main()
