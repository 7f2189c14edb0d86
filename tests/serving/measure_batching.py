"""Throughput of `visionops serve-model` with batching against one model call a request.

    .venv/bin/python tests/serving/measure_batching.py [--clients 32] [--seconds 10]
                                                      [--rounds 2]

A tiny registered version (8x8 grayscale, tests/serving/tiny_versions.py) in a SQLite
store in a temporary folder; the server runs twice a round, in alternating order: with
serving.max_batch 64 and batch_wait_ms 2 (the defaults), and with max_batch 1 (every
request its own model call). Closed-loop asyncio httpx clients, one PNG a request, run
for `--seconds` after 2 s of warm-up, on the same cores as the server; they write
prepared requests to keep-alive sockets (httpx took more CPU than the server). Prints
requests/s, p50 and p99 latency, errors and the mean images per model call (/metrics)."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from tiny_versions import Registration, ServingProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: projects
from projects import write_params  # noqa: E402

from visionops.core.demo import write_digits  # noqa: E402

SETUPS = {"batched (max_batch 64, 2 ms)": {"max_batch": 64, "batch_wait_ms": 2},
          "one call a request (max_batch 1)": {"max_batch": 1, "batch_wait_ms": 0}}


def multipart_request(port: int, image: bytes) -> bytes:
    """One POST /predict with the image in `files`, as bytes on the wire: the clients
    send it as it is, so that they spend their CPU on little but the socket."""
    boundary = "measure-batching"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"d.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + image + (
        f"\r\n--{boundary}--\r\n").encode()
    return (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def answer_status(reader: asyncio.StreamReader) -> int:
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def load(url: str, images: list[bytes], clients: int, seconds: float) -> dict:
    """Closed-loop clients on keep-alive connections: each sends its next request when
    the last is answered."""
    port = int(url.rsplit(":", 1)[1])
    requests = [multipart_request(port, image) for image in images]
    latencies, errors = [], 0

    async def client(index: int, warm_until: float, until: float) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sent = index
        while (now := time.perf_counter()) < until:
            writer.write(requests[sent % len(requests)])
            sent += 1
            status = await answer_status(reader)
            if now >= warm_until:
                latencies.append(time.perf_counter() - now)
                errors += status != 200
        writer.close()

    warm_until = time.perf_counter() + 2
    await asyncio.gather(*(client(i, warm_until, warm_until + seconds)
                           for i in range(clients)))
    latencies.sort()
    return {"requests_per_s": len(latencies) / seconds,
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)], "errors": errors}


def images_per_call(server: ServingProcess) -> float:
    samples = {sample.name: sample.value
               for family in text_string_to_metric_families(server.get("/metrics").text)
               for sample in family.samples}
    return samples["visionops_serving_batch_images_sum"] / samples[
        "visionops_serving_batch_images_count"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_digits(root / "images", per_class=10)
        images = [path.read_bytes() for path in sorted((root / "images").rglob("*.png"))]
        base = {"data": {"image_size": 8, "channels": 1},
                "registry": {"model_name": "measure-batching"},
                "mlflow": {"experiment_name": "measure"},
                "feedback": {"confidence_threshold": 0}}
        write_params(root, base)
        Registration(root / "params.yaml", promote="first", versions=1).go().result()
        figures: dict[str, list[dict]] = {name: [] for name in SETUPS}
        for round_ in range(args.rounds):
            order = list(SETUPS) if round_ % 2 == 0 else list(reversed(SETUPS))
            for name in order:
                params = write_params(root, {**base, "serving": SETUPS[name]},
                                      name=f"params-{len(figures[name])}.yaml")
                server = ServingProcess(params, root / "server.log")
                try:
                    server.wait_version("1", timeout=120)
                    figure = asyncio.run(load(server.url, images, args.clients, args.seconds))
                    figure["images_per_call"] = images_per_call(server)
                finally:
                    server.stop()
                figures[name].append(figure)
                print(f"round {round_ + 1} {name}: {figure}", flush=True)
    print(f"\n{args.clients} clients, {args.seconds:.0f} s each, median of {args.rounds} "
          f"rounds; {os.cpu_count()} CPUs, load average at the end "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| setup | requests/s | p50 ms | p99 ms | errors | images per model call |")
    print("|---|---|---|---|---|---|")
    for name, runs in figures.items():
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"| {name} | {median['requests_per_s']:.0f} | {median['p50_ms']:.1f} | "
              f"{median['p99_ms']:.1f} | {median['errors']:.0f} | "
              f"{median['images_per_call']:.1f} |")


if __name__ == "__main__":
    main()
