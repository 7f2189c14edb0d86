"""The review area of the feedback loop: production images the champion was unsure of,
copied as `<review area>/<predicted label>/<name>-<content hash><suffix>`, the landing
layout. A person checks each one and moves it into the landing area under its right
label (`mv review/3/x-ab12.png landing/8/`) or deletes it; the next ingest takes it, and
the next retrain learns from it. The area is a local folder or an S3 prefix (boto3,
endpoint and credentials from the environment, as for landing areas).

The area remembers what it was sent, by a marker per content hash,
`.visionops/sent/<sha256>`: an image is sent once, ever, so one a reviewer moved away or
deleted does not come back when the same source is scored again. `.visionops/` is the
folder landing areas ignore (visionops.io.landing), and no label starts with a dot."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath

from visionops.core.files import write_atomic
from visionops.io.landing import OWN_FOLDER

SENT = f"{OWN_FOLDER}/sent"
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
    (a person may be looking at it), nor sends an image twice."""

    def __init__(self, location: str, client=None):
        self.location = location.rstrip("/")
        self.s3 = location.startswith("s3://")
        if self.s3:
            import boto3

            self.bucket, _, prefix = location.removeprefix("s3://").partition("/")
            self.prefix = prefix.strip("/")
            self.client = client or boto3.session.Session().client("s3")

    def add(self, name: str, content: bytes, label: str, image_format: str | None = None
            ) -> str | None:
        """Copy one image under its predicted label; where it is (a path or s3:// URL), or
        None when this content was sent before (wherever that copy is now). The copy is
        written before its marker: a run killed between them sends it again, never loses it."""
        if not label or label.startswith(".") or "/" in label or "\\" in label:
            raise ValueError(f"{label!r} is not a label folder name")
        copy = f"{label}/{review_name(name, content, image_format)}"
        marker = f"{SENT}/{hashlib.sha256(content).hexdigest()}"
        record = json.dumps({"copy": copy}).encode()
        if self.s3:
            if self._exists(marker):
                return None
            self._put_new(copy, content)
            self._put_new(marker, record)
            return f"s3://{self.bucket}/{self._key(copy)}"
        root = Path(self.location)
        if (root / marker).exists():
            return None
        for path, data in ((root / copy, content), (root / marker, record)):
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                write_atomic(path, data, mode=0o644)
        return str(root / copy)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def _put_new(self, key: str, content: bytes) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=content,
                                   IfNoneMatch="*")
        except ClientError as exc:  # already there: a person may be looking at it
            if exc.response["Error"]["Code"] not in ("PreconditionFailed", "412"):
                raise
