"""Images to score: every image file below a local folder, or every image object below an
S3 prefix (boto3; endpoint and credentials from the environment, as for landing areas).

`open_source(location).list()` names them; `stage(images)` gives a local folder to read
them from: the folder itself, or, for S3, a temporary folder the objects are streamed
into (1 MiB at a time, so memory does not grow with an image or with their number; the
disk holds the batch until the block ends). Staged objects are named by their position,
never by their key: a key such as `a/../../x.png` cannot write outside the folder. An
object deleted between listing and staging is left out with its reason (`Staged.gone`);
the run scores the others. An S3 URL carries no user, password or query (a signature):
credentials come from the environment, and the URL is shown and logged."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from visionops.core.images import IMAGE_SUFFIXES

CHUNK = 1 << 20
STAGING_PREFIX = "visionops-score-"  # of the temporary folders S3 objects are staged in


@dataclass(frozen=True)
class SourceImage:
    location: str  # the file's path or the object's s3:// URL, as predictions name it
    name: str      # its file name, for a copy sent for review
    size: int      # bytes, as listed


@dataclass(frozen=True)
class Staged:
    root: Path
    files: list[str]  # each image's path relative to root, in the order listed
    gone: dict[str, str] = field(default_factory=dict)  # file -> why it is not there


class FolderSource:
    def __init__(self, folder: str | Path):
        self.root = Path(folder).absolute()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such folder")
        self.url = str(self.root)

    def list(self) -> list[SourceImage]:
        images = []
        for path in sorted(self.root.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                images.append(SourceImage(str(path), path.name, path.stat().st_size))
        return images

    @contextlib.contextmanager
    def stage(self, images: list[SourceImage]) -> Iterator[Staged]:
        yield Staged(self.root, [str(Path(image.location).relative_to(self.root))
                                 for image in images])


class S3Source:
    def __init__(self, url: str, client=None):
        import boto3

        self.bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if "@" in self.bucket or "?" in url:  # not echoed: it may be a key or a signature
            raise ValueError("an S3 source is s3://bucket/prefix, without a user, password "
                             "or query: credentials come from the environment (AWS_*)")
        if not self.bucket:
            raise ValueError(f"{url}: expected s3://bucket/prefix")
        self.prefix = prefix.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}"
        self.client = client or boto3.session.Session().client("s3")

    def list(self) -> list[SourceImage]:
        start = f"{self.prefix}/" if self.prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=start)
        images = []
        for item in (item for page in pages for item in page.get("Contents", [])):
            key = PurePosixPath(item["Key"])
            if key.suffix.lower() in IMAGE_SUFFIXES:
                images.append(SourceImage(f"s3://{self.bucket}/{item['Key']}", key.name,
                                          item["Size"]))
        return images

    @contextlib.contextmanager
    def stage(self, images: list[SourceImage]) -> Iterator[Staged]:
        from botocore.exceptions import ClientError

        with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX) as scratch:
            staged = Staged(Path(scratch), [])
            for index, image in enumerate(images):
                name = f"{index:08d}{PurePosixPath(image.name).suffix.lower()}"
                staged.files.append(name)
                try:
                    self._download(image, staged.root / name)
                except ClientError as exc:
                    if exc.response["Error"]["Code"] not in ("NoSuchKey", "404"):
                        raise
                    staged.gone[name] = "deleted since it was listed (NoSuchKey)"
            yield staged

    def _download(self, image: SourceImage, target: Path) -> None:
        key = image.location.removeprefix(f"s3://{self.bucket}/")
        body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        room = image.size  # an object replaced by a larger one since listing is cut short
        try:
            with target.open("wb") as out:
                for chunk in body.iter_chunks(CHUNK):
                    out.write(chunk[:room])
                    room -= len(chunk)
                    if room <= 0:
                        break
        finally:
            body.close()


def open_source(location: str | Path) -> FolderSource | S3Source:
    """A folder or an s3://bucket/prefix; FileNotFoundError for a folder that is not one."""
    location = str(location)
    return S3Source(location) if location.startswith("s3://") else FolderSource(location)
