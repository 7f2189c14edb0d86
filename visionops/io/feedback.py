"""The review area of the feedback loop: production images the champion was unsure of,
copied as `<review area>/<predicted label>/<name>-<content hash><suffix>`, the landing
layout. A person checks each one and moves it into the landing area under its right
label (`mv review/3/x-ab12.png landing/8/`); the next ingest takes it, and the next
retrain learns from it. The area is a local folder or an S3 prefix (boto3, endpoint and
credentials from the environment, as for landing areas)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath

from visionops.core.files import write_atomic

SUFFIX_OF_FORMAT = {"PNG": ".png", "JPEG": ".jpg"}
UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def review_name(name: str, content: bytes, image_format: str | None = None) -> str:
    """`<stem>-<12 hex digits of the content's sha256><suffix>`: the same image sent twice
    lands once; two images of one name both land. The stem keeps only safe characters."""
    path = PurePosixPath(name.replace("\\", "/")).name or "image"
    stem = UNSAFE.sub("_", PurePosixPath(path).stem).strip("._")[:80] or "image"
    suffix = PurePosixPath(path).suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg"):
        suffix = SUFFIX_OF_FORMAT.get(image_format or "", ".png")
    return f"{stem}-{hashlib.sha256(content).hexdigest()[:12]}{suffix}"


class ReviewArea:
    """Where low-confidence images are copied; `add` never overwrites a file already there
    (a person may be looking at it)."""

    def __init__(self, location: str, client=None):
        self.location = location.rstrip("/")
        self.s3 = location.startswith("s3://")
        if self.s3:
            import boto3

            self.bucket, _, prefix = location.removeprefix("s3://").partition("/")
            self.prefix = prefix.strip("/")
            self.client = client or boto3.session.Session().client("s3")

    def add(self, name: str, content: bytes, label: str, image_format: str | None = None
            ) -> str:
        """Copy one image under its predicted label; where it is (a path or s3:// URL)."""
        if not label or label.startswith(".") or "/" in label or "\\" in label:
            raise ValueError(f"{label!r} is not a label folder name")
        file_name = review_name(name, content, image_format)
        if self.s3:
            return self._put(f"{label}/{file_name}", content)
        folder = Path(self.location) / label
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / file_name
        if not target.exists():
            write_atomic(target, content, mode=0o644)
        return str(target)

    def _put(self, key: str, content: bytes) -> str:
        from botocore.exceptions import ClientError

        object_key = f"{self.prefix}/{key}" if self.prefix else key
        try:
            self.client.put_object(Bucket=self.bucket, Key=object_key, Body=content,
                                   IfNoneMatch="*")
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("PreconditionFailed", "412"):
                raise
        return f"s3://{self.bucket}/{object_key}"
