"""`visionops serve-model` against `mlflow models serve`: the same champion, the same load.

    .venv/bin/python benchmarks/serve.py [--quick] [--warmup S] [--duration S] [--reps R]
        [--clients 1,8,32] [--mlflow-workers 1,2] [--project DIR] [--keep]

Makes a temporary project with the README's params.yaml and the 1,797 demo digits and
runs `visionops retrain` once: the champion is the product's own model (the seed CNN,
28x28 grayscale, raw 0-255 pixels in), registered and promoted as the pipeline does it.
`--project DIR` uses a project that has a champion already instead.

Then each server runs alone on loopback, in turn, never two at once:
`visionops serve-model --params params.yaml`, and `mlflow models serve -m
models:/<name>@champion --env-manager local` with its default worker count (1), then
with each other count of `--mlflow-workers`. Every client count of `--clients` runs for
`--duration` seconds after `--warmup` seconds: closed-loop asyncio httpx clients, each
sending its next request when the last is answered, one image a request (a demo digit:
to ours its PNG file as multipart `files`; to MLflow its decoded pixels as
`{"inputs": [1, 28, 28, 1]}`, what the registered model's signature takes), and one row
of 8 clients sending 8 images a request. The load generator runs on the same cores as
the server.

`--reps` repetitions (default 2) run the servers in alternating order; each figure is
the median over them. Prints a Markdown table (requests/s, images/s, p50 and p99
latency, errors, server CPU seconds per 1,000 images, and the CPU cores the server, the
load generator and everything else on the machine used meanwhile) and the ratios
ours / MLflow's, and writes benchmarks/serve.json. Floors, at 32 clients, against
MLflow's default worker count: throughput ratio >= 1.0 and our p99 <= MLflow's; the exit
status is 1 if one fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from demo_promotion import make_project  # noqa: E402
from run import machine  # noqa: E402

from visionops.core.demo import write_digits  # noqa: E402
from visionops.ops.objectstore import free_port  # noqa: E402

POOL_PER_CLASS = 20  # request images: the first 20 demo digits of each class
BATCH_IMAGES = 8     # images a request in the batch row
BATCH_CLIENTS = 8
FLOOR_CLIENTS = 32
READY_TIMEOUT_S = 300
OURS = "visionops"
MEDIAN_FIGURES = ("requests_per_s", "images_per_s", "p50_ms", "p99_ms",
                  "server_cpu_s_per_1000_images", "server_cpu_cores", "client_cpu_cores",
                  "other_cpu_cores")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the champion ---------------------------------------------------------------------

def make_champion(root: Path, epochs: int | None) -> Path:
    """A project with the demo digits and a champion trained by `visionops retrain`."""
    params_file = make_project(root)
    if epochs is not None:
        params = yaml.safe_load(params_file.read_text())
        params["train"]["epochs"] = epochs
        params_file.write_text(yaml.safe_dump(params))
    write_digits(root / "data")
    say("retraining once for a champion ...")
    done = subprocess.run([str(BIN / "visionops"), "retrain", "--json", "--params",
                           str(params_file)], cwd=root, capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        sys.exit(f"retrain failed:\n{done.stderr[-3000:]}")
    return params_file


def champion_facts(params_file: Path) -> dict:
    from visionops.core.config import load_params
    from visionops.io.registry import Registry

    params = load_params(params_file)
    registry = Registry(params)
    champion = registry.champion()
    if champion is None:
        sys.exit(f"{registry.name} has no champion in {params.tracking_uri}")
    metrics = registry.client.get_run(champion.run_id).data.metrics
    return {"name": registry.name, "version": str(champion.version),
            "tracking_uri": params.tracking_uri,
            "architecture": params.train.architecture,
            "input": [params.data.image_size, params.data.image_size, params.data.channels],
            "input_contract": champion.tags.get("input_contract"),
            "class_names": json.loads(champion.tags["class_names"]),
            "test_accuracy": metrics.get("test_accuracy"),
            "serving": params.serving.model_dump()}


# --- requests -------------------------------------------------------------------------

@dataclass
class Body:
    content: bytes
    headers: dict[str, str]
    truth: list[str]  # the labels of its images


def request_pool(folder: Path, size: int, channels: int) -> tuple[list[Path], np.ndarray]:
    """The demo digits every request is made of: their PNG files and their pixels as the
    pipeline decodes them (what the model takes)."""
    from visionops.core.pipeline import load_pixels

    write_digits(folder, per_class=POOL_PER_CLASS)
    paths = sorted(folder.rglob("*.png"), key=lambda p: p.name)
    return paths, load_pixels(paths, size, channels)


def bodies_for(server: str, paths: list[Path], pixels: np.ndarray, per_request: int
               ) -> list[Body]:
    """Request bodies built once, so the clients spend their CPU on sending only."""
    import httpx

    bodies = []
    for start in range(0, len(paths) - per_request + 1, per_request):
        chosen = paths[start:start + per_request]
        truth = [p.parent.name for p in chosen]
        if server == OURS:
            request = httpx.Request("POST", "http://server/predict", files=[
                ("files", (p.name, p.read_bytes(), "image/png")) for p in chosen])
            request.read()
            bodies.append(Body(request.content,
                               {"content-type": request.headers["content-type"]}, truth))
        else:
            inputs = pixels[start:start + per_request].astype(np.float32).tolist()
            bodies.append(Body(json.dumps({"inputs": inputs}).encode(),
                               {"content-type": "application/json"}, truth))
    return bodies


def labels_of(server: str, answer: dict, class_names: list[str]) -> list[tuple[str, float]]:
    """(label, top probability) per image of one answer."""
    if server == OURS:
        return [(p["label"], float(p["probability"])) for p in answer["predictions"]]
    rows = np.asarray(answer["predictions"], dtype=np.float64)
    return [(class_names[int(np.argmax(r))], float(np.max(r))) for r in rows]


# --- servers --------------------------------------------------------------------------

class Server:
    """One server process (and its children), started in a session of its own."""

    def __init__(self, name: str, args: list[str], env: dict, cwd: Path, ready_path: str,
                 predict_path: str, port: int, log: Path, workers: int):
        self.name, self.args, self.env, self.cwd = name, args, env, cwd
        self.base = f"http://127.0.0.1:{port}"
        self.ready_url, self.predict_url = self.base + ready_path, self.base + predict_path
        self.log, self.workers = log, workers
        self.process: subprocess.Popen | None = None
        self.ready_s = 0.0

    def __enter__(self) -> Server:
        import httpx

        started = time.perf_counter()
        with self.log.open("w") as log:
            self.process = subprocess.Popen(self.args, cwd=self.cwd, env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        while time.perf_counter() - started < READY_TIMEOUT_S:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.name} exited {self.process.returncode}:\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(self.ready_url, timeout=2).status_code == 200:
                    self.ready_s = round(time.perf_counter() - started, 1)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {READY_TIMEOUT_S} s")

    def __exit__(self, *_) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM to the server's own process group, SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def processes(self) -> list:
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        import psutil

        total = 0.0
        for process in self.processes():
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total


def our_server(project: Path, env: dict, logs: Path) -> Server:
    port = free_port()
    return Server(OURS, [str(BIN / "visionops"), "serve-model", "--params",
                         str(project / "params.yaml"), "--port", str(port)],
                  env, project, "/ready", "/predict", port, logs / "visionops.log", 1)


def mlflow_server(project: Path, env: dict, logs: Path, model_uri: str,
                  workers: int | None) -> Server:
    port = free_port()
    args = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager",
            "local", "--host", "127.0.0.1", "-p", str(port)]
    if workers is not None:
        args += ["--workers", str(workers)]
    name = f"mlflow_w{workers or 1}"
    return Server(name, args, env, project, "/ping", "/invocations", port,
                  logs / f"{name}.log", workers or 1)


def server_env(tracking_uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PREFECT_", "VISIONOPS_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", TF_CPP_MIN_LOG_LEVEL="2",
               MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    return env


# --- load -----------------------------------------------------------------------------

async def measure(server: Server, bodies: list[Body], clients: int, warmup: float,
                  duration: float) -> dict:
    """Closed loop: `clients` clients, each sending its next request when the last is
    answered. Requests answered within the `duration` after `warmup` are counted."""
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    began = time.perf_counter()
    measure_from, stop_at = began + warmup, began + warmup + duration

    async def one_client(index: int) -> None:
        turn = index
        # a client of its own each: one shared pool of `clients` connections costs the
        # load generator CPU that grows with the number of connections
        async with httpx.AsyncClient(timeout=60) as client:
            while (sent := time.perf_counter()) < stop_at:
                body = bodies[turn % len(bodies)]
                turn += clients
                try:
                    answer = await client.post(server.predict_url, content=body.content,
                                               headers=body.headers)
                    problem = None if answer.status_code == 200 else str(answer.status_code)
                except httpx.HTTPError as exc:
                    problem = type(exc).__name__
                done = time.perf_counter()
                if measure_from <= done <= stop_at:
                    if problem is None:
                        latencies.append(done - sent)
                    else:
                        errors[problem] = errors.get(problem, 0) + 1

    async def cpu_probe() -> tuple[float, float, float]:
        await asyncio.sleep(measure_from - time.perf_counter())
        server_from, client_from = server.cpu_seconds(), time.process_time()
        busy_from = busy_cpu_seconds()
        await asyncio.sleep(stop_at - time.perf_counter())
        return (server.cpu_seconds() - server_from, time.process_time() - client_from,
                busy_cpu_seconds() - busy_from)

    *_, (server_cpu, client_cpu, busy) = await asyncio.gather(
        *(one_client(i) for i in range(clients)), cpu_probe())
    images_per_request = len(bodies[0].truth)
    done_ok = len(latencies)
    ms = np.asarray(latencies) * 1000.0
    return {
        "server": server.name, "clients": clients, "images_per_request": images_per_request,
        "requests": done_ok, "requests_per_s": round(done_ok / duration, 1),
        "images_per_s": round(done_ok * images_per_request / duration, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2) if done_ok else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 2) if done_ok else None,
        "errors": sum(errors.values()), "error_kinds": errors,
        "server_cpu_s_per_1000_images": round(
            1000 * server_cpu / max(done_ok * images_per_request, 1), 3),
        "server_cpu_cores": round(server_cpu / duration, 2),
        "client_cpu_cores": round(client_cpu / duration, 2),
        "other_cpu_cores": round(max(busy - server_cpu - client_cpu, 0) / duration, 2),
    }


def busy_cpu_seconds() -> float:
    """CPU seconds this machine has spent on anything but idling, all processes."""
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def answers(server: Server, bodies: list[Body], class_names: list[str]) -> list:
    """Every pool image once, one a request: (label, top probability) per image."""
    import httpx

    found = []
    with httpx.Client(timeout=60) as client:
        for body in bodies:
            answer = client.post(server.predict_url, content=body.content,
                                 headers=body.headers)
            answer.raise_for_status()
            found += labels_of(server.name, answer.json(), class_names)
    return found


def agreement(first: list, second: list, truth: list[str]) -> dict:
    same = sum(a[0] == b[0] for a, b in zip(first, second, strict=True))
    return {"images": len(truth), "same_label": same,
            "max_top_probability_diff": round(max(abs(a[1] - b[1]) for a, b in
                                                  zip(first, second, strict=True)), 7),
            "ours_correct": sum(a[0] == t for a, t in zip(first, truth, strict=True)),
            "mlflow_correct": sum(b[0] == t for b, t in zip(second, truth, strict=True))}


def run_server(server: Server, bodies: dict, clients: list[int], warmup: float,
               duration: float, class_names: list[str]) -> tuple[dict, list[dict], list]:
    """Start it, check its answers on every pool image, then one row per load."""
    with server:
        say(f"{server.name}: ready in {server.ready_s} s; {len(server.processes())} "
            f"process(es), {server.workers} worker(s)")
        checked = answers(server, bodies[1], class_names)
        rows = []
        plan = [(c, 1) for c in clients] + [(BATCH_CLIENTS, BATCH_IMAGES)]
        for count, per_request in plan:
            row = asyncio.run(measure(server, bodies[per_request], count, warmup, duration))
            say(f"  {count:>3} clients x {per_request} image(s): "
                f"{row['requests_per_s']:>8} req/s  p50 {row['p50_ms']} ms  "
                f"p99 {row['p99_ms']} ms  errors {row['errors']}  "
                f"(other work: {row['other_cpu_cores']} cores)")
            rows.append(row)
        about = {"command": " ".join(Path(a).name if i == 0 else a
                                     for i, a in enumerate(server.args)),
                 "workers": server.workers, "processes": len(server.processes()),
                 "ready_s": server.ready_s}
    return about, rows, checked


def median_rows(runs: list[dict]) -> list[dict]:
    """Per server and load, each figure's median over the repetitions; errors summed."""
    grouped: dict[tuple, list[dict]] = {}
    for row in runs:
        grouped.setdefault((row["server"], row["clients"], row["images_per_request"]),
                           []).append(row)
    out = []
    for (server, clients, per_request), same in grouped.items():
        row = {"server": server, "clients": clients, "images_per_request": per_request}
        for key in MEDIAN_FIGURES:
            values = [r[key] for r in same if r[key] is not None]
            row[key] = round(statistics.median(values), 3) if values else None
        row["errors"] = sum(r["errors"] for r in same)
        row["images_per_s_each_rep"] = [r["images_per_s"] for r in same]
        out.append(row)
    return out


# --- report ---------------------------------------------------------------------------

def ratios(rows: list[dict], baseline: str) -> list[dict]:
    ours = {(r["clients"], r["images_per_request"]): r for r in rows if r["server"] == OURS}
    out = []
    for r in rows:
        key = (r["clients"], r["images_per_request"])
        if r["server"] != baseline or key not in ours:
            continue
        mine = ours[key]
        out.append({"against": baseline, "clients": key[0], "images_per_request": key[1],
                    "throughput_ratio": round(mine["images_per_s"] / r["images_per_s"], 3)
                    if r["images_per_s"] else None,
                    "p99_ratio": round(mine["p99_ms"] / r["p99_ms"], 3)
                    if mine["p99_ms"] and r["p99_ms"] else None})
    return out


def floors(ratio_rows: list[dict], baseline: str) -> dict:
    at = next((r for r in ratio_rows if r["against"] == baseline
               and r["clients"] == FLOOR_CLIENTS and r["images_per_request"] == 1), None)
    throughput = at and at["throughput_ratio"]
    p99 = at and at["p99_ratio"]
    return {f"throughput ratio at {FLOOR_CLIENTS} clients >= 1.0":
            {"value": throughput, "pass": bool(throughput and throughput >= 1.0)},
            f"our p99 <= {baseline}'s at {FLOOR_CLIENTS} clients (p99 ratio <= 1.0)":
            {"value": p99, "pass": bool(p99 and p99 <= 1.0)}}


def markdown(result: dict) -> str:
    lines = ["| server | clients | images/request | requests/s | images/s | p50 ms | "
             "p99 ms | errors | server CPU s / 1,000 images | cores: server, client, other |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['server']} | {r['clients']} | {r['images_per_request']} | "
                     f"{r['requests_per_s']:,.1f} | {r['images_per_s']:,.1f} | "
                     f"{r['p50_ms']:,.1f} | {r['p99_ms']:,.1f} | {r['errors']} | "
                     f"{r['server_cpu_s_per_1000_images']:.2f} | {r['server_cpu_cores']:.2f}, "
                     f"{r['client_cpu_cores']:.2f}, {r['other_cpu_cores']:.2f} |")
    lines += ["", "| ours / | clients | images/request | throughput ratio | p99 ratio |",
              "|---|---:|---:|---:|---:|"]
    for r in result["ratios"]:
        lines.append(f"| {r['against']} | {r['clients']} | {r['images_per_request']} | "
                     f"{r['throughput_ratio']} | {r['p99_ratio']} |")
    lines.append("")
    for name, floor in result["floors"].items():
        lines.append(f"- {'PASS' if floor['pass'] else 'FAIL'}: {name} ({floor['value']})")
    lines += [f"- {note}" for note in result["notes"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 8 epochs, 1 s warm-up, 3 s a row, one repetition, "
                             "MLflow's default worker count only")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--reps", type=int, default=2,
                        help="repetitions, the servers' order alternating; medians reported")
    parser.add_argument("--mlflow-workers", default="1,2",
                        help="MLflow worker counts; the first is its default, the baseline")
    parser.add_argument("--project", type=Path,
                        help="a project folder with a champion (no retrain)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.duration, args.mlflow_workers, args.reps = 1.0, 3.0, "1", 1
    clients = [int(c) for c in args.clients.split(",")]
    mlflow_workers = [int(w) for w in args.mlflow_workers.split(",")]

    scratch = Path(tempfile.mkdtemp(prefix="visionops-serve-bench-"))
    logs = scratch / "logs"
    logs.mkdir()
    started = time.perf_counter()
    try:
        project = args.project.resolve() if args.project else \
            make_champion(scratch / "project", 8 if args.quick else None).parent
        model = champion_facts(project / "params.yaml")
        paths, pixels = request_pool(scratch / "pool", model["input"][0], model["input"][2])
        truth = [p.parent.name for p in paths]
        env = server_env(model["tracking_uri"])
        model_uri = f"models:/{model['name']}@champion"
        servers = [lambda: our_server(project, env, logs)] + [
            (lambda w=w: mlflow_server(project, env, logs, model_uri, None if w == 1 else w))
            for w in mlflow_workers]
        about, runs, checked = {}, [], {}
        for rep in range(args.reps):  # alternating: forwards, then backwards
            say(f"repetition {rep + 1} of {args.reps}")
            for make in servers if rep % 2 == 0 else servers[::-1]:
                server = make()
                kind = OURS if server.name == OURS else "mlflow"
                bodies = {n: bodies_for(kind, paths, pixels, n) for n in (1, BATCH_IMAGES)}
                about[server.name], rows, checked[server.name] = run_server(
                    server, bodies, clients, args.warmup, args.duration,
                    model["class_names"])
                runs += [{**row, "rep": rep + 1} for row in rows]
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    rows = median_rows(runs)
    names = list(about)
    baseline = names[1]
    ratio_rows = [r for name in names[1:] for r in ratios(rows, name)]
    result = {
        "machine": machine(),
        "notes": ["The load generator (asyncio httpx, one process) runs on the same cores as "
                  "the server: its CPU is in client_cpu_cores.",
                  "The machine was shared with other work while this ran.",
                  f"MLflow's default worker count is 1 (`mlflow models serve --workers`); "
                  f"{baseline} is the baseline of the floors. visionops serve-model runs "
                  "one process."],
        "model": {k: v for k, v in model.items() if k not in ("class_names", "serving")},
        "serving_params": model["serving"],
        "settings": {"warmup_s": args.warmup, "duration_s": args.duration,
                     "clients": clients, "batch_row": [BATCH_CLIENTS, BATCH_IMAGES],
                     "pool_images": len(paths), "quick": args.quick},
        "servers": about,
        "agreement": agreement(checked[OURS], checked[baseline], truth),
        "rows": rows,
        "runs": runs,
        "ratios": ratio_rows,
        "floors": floors(ratio_rows, baseline),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(markdown(result))
    (HERE / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0 if all(f["pass"] for f in result["floors"].values()) else 1)


if __name__ == "__main__":
    main()
