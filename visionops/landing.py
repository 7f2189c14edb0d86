"""Landing areas: where new labelled images arrive, `<label>/<file>` under a local
folder or an S3 prefix. Each file is marked once handled (accepted or quarantined)
by a small JSON marker, `.visionops/handled/<label>/<file>/<fingerprint>.json` in the
landing area itself, so a replaced file counts as new; files are never deleted.
S3 is reached with boto3: endpoint and credentials come from the environment
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...) or the AWS profile, never the repository.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from visionops.images import IMAGE_SUFFIXES

MARKERS = ".visionops/handled"


def _marker_key(file: LandingFile) -> str:
    return f"{MARKERS}/{file.key}/{file.fingerprint}.json"


def _parse_marker(key: str) -> tuple[str, str] | None:
    """(landing key, fingerprint) from a marker's key relative to the landing area."""
    parts = PurePosixPath(key).parts
    if len(parts) != 5 or "/".join(parts[:2]) != MARKERS or not parts[4].endswith(".json"):
        return None
    return f"{parts[2]}/{parts[3]}", parts[4].removesuffix(".json")


@dataclass(frozen=True)
class LandingFile:
    key: str          # "<label>/<file>" relative to the landing area
    fingerprint: str  # changes when the file is replaced (S3 ETag, or size and mtime)

    @property
    def label(self) -> str:
        return PurePosixPath(self.key).parts[0]

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name


def _is_image_key(key: str) -> bool:
    parts = PurePosixPath(key).parts
    return (len(parts) == 2 and not parts[0].startswith(".")
            and PurePosixPath(key).suffix.lower() in IMAGE_SUFFIXES)


class LocalLanding:
    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: landing folder not found")

    def describe(self, file: LandingFile) -> str:
        return str(self.root / file.key)

    def list(self) -> list[LandingFile]:
        files = []
        for path in sorted(self.root.glob("*/*")):
            key = path.relative_to(self.root).as_posix()
            if path.is_file() and _is_image_key(key):
                stat = path.stat()
                files.append(LandingFile(key, f"{stat.st_size}-{stat.st_mtime_ns}"))
        return files

    def fetch(self, file: LandingFile, target: Path) -> None:
        shutil.copyfile(self.root / file.key, target)

    def handled(self) -> set[tuple[str, str]]:
        markers = self.root / MARKERS
        keys = (p.relative_to(self.root).as_posix() for p in markers.rglob("*.json"))
        return {parsed for parsed in map(_parse_marker, keys) if parsed}

    def mark(self, file: LandingFile, record: dict) -> None:
        path = self.root / _marker_key(file)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(record))
        temporary.replace(path)


class S3Landing:
    def __init__(self, url: str, client=None):
        import boto3

        without_scheme = url.removeprefix("s3://")
        self.bucket, _, prefix = without_scheme.partition("/")
        self.prefix = prefix.strip("/")
        self.client = client or boto3.session.Session().client("s3")

    def _object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def describe(self, file: LandingFile) -> str:
        return f"s3://{self.bucket}/{self._object_key(file.key)}"

    def list(self) -> list[LandingFile]:
        files = []
        start = f"{self.prefix}/" if self.prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=start)
        for page in pages:
            for item in page.get("Contents", []):
                key = item["Key"][len(start):]
                if _is_image_key(key):
                    files.append(LandingFile(key, item["ETag"].strip('"')))
        return sorted(files, key=lambda f: f.key)

    def fetch(self, file: LandingFile, target: Path) -> None:
        self.client.download_file(self.bucket, self._object_key(file.key), str(target))

    def handled(self) -> set[tuple[str, str]]:
        start = self._object_key(MARKERS) + "/"
        skip = len(self._object_key(""))
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=start)
        keys = (item["Key"][skip:] for page in pages for item in page.get("Contents", []))
        return {parsed for parsed in map(_parse_marker, keys) if parsed}

    def mark(self, file: LandingFile, record: dict) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._object_key(_marker_key(file)),
                               Body=json.dumps(record).encode())


def open_landing(source: str | Path) -> LocalLanding | S3Landing:
    source = str(source)
    return S3Landing(source) if source.startswith("s3://") else LocalLanding(Path(source))
