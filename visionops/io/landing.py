"""Landing areas: where new labelled images arrive, `<label>/<file>` under a local
folder or an S3 prefix. Each file is marked once handled (accepted or quarantined)
by a small JSON marker, `.visionops/handled/<label>/<file>/<fingerprint>.json` in the
landing area itself, so a replaced file counts as new; files are never deleted.
Every file or object in the area (outside `.visionops/`) is listed, even one that can
never be ingested (a symbolic link, a nested or oddly spelled key, a non-image): the
ingest refuses it with a reason, and its marker then lies under
`.visionops/handled/.refused/<percent-encoded key>/`. A marker whose path would have a
name over 255 bytes, or be over S3's 1024 bytes in all, lies under
`.visionops/handled/.sha256/<sha256 of the key>/` instead, its record naming the key.
A local area is read without following any symbolic link, and its `.visionops/` may
not be one. S3 is reached with boto3: endpoint and credentials come from the
environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...) or the AWS profile, never
the repository.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import posixpath
import stat
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote

from visionops.core.images import IMAGE_SUFFIXES

OWN_FOLDER = ".visionops"
MARKERS = f"{OWN_FOLDER}/handled"
REFUSED = ".refused"  # marker folder of keys that are not <label>/<file>; no label starts with "."
HASHED = ".sha256"    # marker folder of keys whose marker path would be too long
MAX_NAME_BYTES = 255  # a file name longer than this cannot be staged on most file systems
MAX_OBJECT_KEY_BYTES = 1024  # S3's limit on an object key; a marker path keeps within it
CHUNK = 1 << 20


class LandingError(Exception):
    """The landing area cannot be read or marked safely; the message names the path."""


class FileRefused(Exception):
    """One landing file cannot be ingested; the message is the reason."""


class FileChanged(Exception):
    """A landing file changed between listing and reading; the next run takes it."""


@dataclass(frozen=True)
class LandingFile:
    key: str          # "<label>/<file>" relative to the landing area (or anything else listed)
    fingerprint: str  # changes when the file is replaced (S3 ETag, or size and mtime)
    size: int = 0     # bytes, as listed (before reading)
    problem: str | None = None  # why the area itself refuses it (a symbolic link, ...)

    @property
    def label(self) -> str:
        return PurePosixPath(self.key).parts[0]

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name


def key_problem(key: str) -> str | None:
    """Why `key` is not a plain `<label>/<file>`, spelled the one way it normalises to."""
    try:
        key.encode()
    except UnicodeEncodeError:  # a local file name that is not UTF-8
        return "key is not valid UTF-8"
    if any(unicodedata.category(char) == "Cc" for char in key):
        return "key contains a control character"
    if "\\" in key:
        return "key contains a backslash"
    if key.startswith("/"):
        return "key starts with a slash"
    parts = key.split("/")
    if posixpath.normpath(key) != key or "" in parts or "." in parts or ".." in parts:
        return f"key is not in normal form (normalises to {posixpath.normpath(key)!r})"
    if len(parts) != 2:
        return (f"{len(parts)} path levels; only <label>/<file> is read "
                "(no nested folders, no files outside a label folder)")
    if parts[0].startswith("."):
        return "label folder name starts with '.'"
    if any(len(part.encode()) > MAX_NAME_BYTES for part in parts):
        return f"a name is longer than {MAX_NAME_BYTES} bytes"
    return None


def suffix_problem(key: str) -> str | None:
    suffix = PurePosixPath(key).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        return f"suffix {suffix or '(none)'!r} is not one of {sorted(IMAGE_SUFFIXES)}"
    return None


def encoded(key: str) -> str:
    """`key` as one file name (percent-encoded); it may be too long to be one."""
    return quote(key, safe="", errors="surrogateescape")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def fits(path: str, room: int = MAX_OBJECT_KEY_BYTES) -> bool:
    """Whether every name in `path` and the whole of it are short enough to be written."""
    return (len(path.encode("utf-8", "surrogateescape")) <= room
            and all(len(part.encode("utf-8", "surrogateescape")) <= MAX_NAME_BYTES
                    for part in path.split("/")))


def marker_key(file: LandingFile, room: int = MAX_OBJECT_KEY_BYTES) -> str:
    """The marker's path relative to the landing area, at most `room` bytes: under the
    key itself for a plain key, under its percent-encoded form for any other, and under
    its sha256 when either would not fit (the marker's record then names the key)."""
    name = f"{file.fingerprint}.json"
    marker = (f"{MARKERS}/{file.key}/{name}" if key_problem(file.key) is None
              else f"{MARKERS}/{REFUSED}/{encoded(file.key)}/{name}")
    return marker if fits(marker, room) else f"{MARKERS}/{HASHED}/{key_digest(file.key)}/{name}"


def parse_marker(key: str) -> tuple[str, str] | None:
    """(landing key, fingerprint) from a marker's key relative to the landing area; None
    for anything else and for a marker under a key's sha256 (its record names the key)."""
    parts = PurePosixPath(key).parts
    if len(parts) != 5 or "/".join(parts[:2]) != MARKERS or not parts[4].endswith(".json"):
        return None
    fingerprint = parts[4].removesuffix(".json")
    if parts[2] == HASHED:
        return None
    if parts[2] == REFUSED:
        return unquote(parts[3], errors="surrogateescape"), fingerprint
    return f"{parts[2]}/{parts[3]}", fingerprint


def hashed_marker(key: str) -> tuple[str, str] | None:
    """(sha256 of the landing key, fingerprint) of a marker under `.sha256/`, else None."""
    parts = PurePosixPath(key).parts
    if (len(parts) != 5 or "/".join(parts[:2]) != MARKERS or parts[2] != HASHED
            or not parts[4].endswith(".json")):
        return None
    return parts[3], parts[4].removesuffix(".json")


def named_key(digest: str, record: dict) -> str | None:
    """The landing key a `.sha256/<digest>/` marker's record names, if it hashes to it."""
    key = record.get("key")
    return key if isinstance(key, str) and key_digest(key) == digest else None


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise FileRefused(f"{size} bytes, more than validation.max_bytes {max_bytes}")


def _write_private(target: Path, chunks: Iterator[bytes], max_bytes: int) -> None:
    """Write `chunks` to a new file only its owner can read, refusing more than max_bytes."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    written = 0
    with os.fdopen(fd, "wb") as out:
        for chunk in chunks:
            written += len(chunk)
            _check_size(written, max_bytes)
            out.write(chunk)


def _open_folder(name: str, folder_fd: int) -> int:
    """A descriptor of the folder `name` in `folder_fd`; ELOOP when it is a link (Linux
    says ENOTDIR for a link to a folder)."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=folder_fd)
    except NotADirectoryError:
        if stat.S_ISLNK(os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name) from None
        raise


def _read_marker(path: Path) -> dict:
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as marker:
        return json.loads(marker.read())


class LocalLanding:
    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: landing folder not found")
        self.url = str(self.root.resolve())  # the area, however it was spelled

    def describe(self, file: LandingFile) -> str:
        return str(self.root / file.key)

    def _own_folder(self, *parts: str) -> Path:
        """`.visionops/<parts>` in the area, refusing it when any level is a symbolic link."""
        path = self.root
        for part in (OWN_FOLDER, *parts):
            path = path / part
            if path.is_symlink():
                raise LandingError(f"{path}: is a symbolic link; the landing area's own "
                                   "folders must be real folders (it is never followed)")
        return path

    def list(self) -> list[LandingFile]:
        self._own_folder("handled")
        files: list[LandingFile] = []
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._walk(root_fd, "", files)
        finally:
            os.close(root_fd)
        return sorted(files, key=lambda f: f.key)

    def _walk(self, folder_fd: int, folder: str, files: list[LandingFile]) -> None:
        """List the folder open as `folder_fd`, descending only into real folders."""
        with os.scandir(folder_fd) as entries:
            for entry in entries:
                key = f"{folder}/{entry.name}" if folder else entry.name
                if key == OWN_FOLDER:
                    continue
                info = entry.stat(follow_symlinks=False)
                problem = None
                if stat.S_ISLNK(info.st_mode):
                    target = os.readlink(entry.name, dir_fd=folder_fd)
                    problem = f"a symbolic link (to {target}); links are never followed"
                elif stat.S_ISDIR(info.st_mode):
                    try:
                        inner = _open_folder(entry.name, folder_fd)
                    except OSError as exc:  # swapped for a link since it was listed
                        problem = f"cannot be opened without following a link: {exc.strerror}"
                    else:
                        try:
                            self._walk(inner, key, files)
                        finally:
                            os.close(inner)
                        continue
                elif not stat.S_ISREG(info.st_mode):
                    problem = "not a regular file"
                files.append(LandingFile(key, f"{info.st_size}-{info.st_mtime_ns}",
                                         info.st_size, problem))

    def _descend(self, folders: tuple[str, ...] | list[str], create: bool = False) -> int:
        """A descriptor of the folder `folders` below the area, reached without following
        a link at any level (created when missing with `create`). An error names the
        level that failed."""
        folder_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        path = self.root
        try:
            for folder in folders:
                path = path / folder
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(folder, dir_fd=folder_fd)
                try:
                    inner = _open_folder(folder, folder_fd)
                except OSError as exc:
                    raise OSError(exc.errno, exc.strerror, str(path)) from exc
                os.close(folder_fd)
                folder_fd = inner
        except BaseException:
            os.close(folder_fd)
            raise
        return folder_fd

    def _open(self, key: str) -> int:
        """A read descriptor of the file, opened without following a link at any level."""
        *folders, name = key.split("/")
        folder_fd = self._descend(folders)
        try:
            return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder_fd)
        finally:
            os.close(folder_fd)

    def fetch(self, file: LandingFile, target: Path, max_bytes: int) -> None:
        try:
            fd = self._open(file.key)
        except FileNotFoundError as exc:
            raise FileChanged(f"{self.describe(file)}: gone since it was listed") from exc
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a level became a symbolic link
                raise FileRefused(f"{exc.filename}: cannot be opened without following a "
                                  f"link ({exc.strerror})") from exc
            raise FileRefused(f"cannot be opened: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as source:
            info = os.fstat(source.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise FileRefused("not a regular file")
            if f"{info.st_size}-{info.st_mtime_ns}" != file.fingerprint:
                raise FileChanged(f"{self.describe(file)}: changed since it was listed")
            _check_size(info.st_size, max_bytes)
            _write_private(target, iter(lambda: source.read(CHUNK), b""), max_bytes)

    def markers(self) -> dict[tuple[str, str], dict]:
        """Every marker's (landing key, fingerprint) and record."""
        folder = self._own_folder("handled")
        found = {}
        for parent, _, names in os.walk(folder):  # never follows links
            for name in names:
                path = Path(parent) / name
                relative = path.relative_to(self.root).as_posix()
                if path.is_symlink():  # not a marker this area wrote
                    continue
                if parsed := parse_marker(relative):
                    found[parsed] = _read_marker(path)
                elif hashed := hashed_marker(relative):
                    record = _read_marker(path)
                    if key := named_key(hashed[0], record):
                        found[(key, hashed[1])] = record
        return found

    def handled(self) -> set[tuple[str, str]]:
        return set(self.markers())

    def mark(self, file: LandingFile, record: dict) -> None:
        """Write the marker through folders opened one level at a time, never through a
        link: a linked level is refused with its path."""
        relative = PurePosixPath(marker_key(file))
        try:
            folder_fd = self._descend(relative.parent.parts, create=True)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LandingError(f"{exc.filename}: is a symbolic link; markers are never "
                                   "written through one") from exc
            raise
        try:
            temporary = f".{relative.name}.{os.getpid()}.tmp"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                         0o644, dir_fd=folder_fd)
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps({**record, "key": file.key}))
            os.replace(temporary, relative.name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
        finally:
            os.close(folder_fd)


class S3Landing:
    def __init__(self, url: str, client=None):
        import boto3

        without_scheme = url.removeprefix("s3://")
        self.bucket, _, prefix = without_scheme.partition("/")
        self.prefix = prefix.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}"  # the area, however it was spelled
        self.client = client or boto3.session.Session().client("s3")

    def _object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def describe(self, file: LandingFile) -> str:
        return f"s3://{self.bucket}/{self._object_key(file.key)}"

    def _items(self, start: str) -> Iterator[dict]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=start)
        for page in pages:
            yield from page.get("Contents", [])

    def list(self) -> list[LandingFile]:
        start = f"{self.prefix}/" if self.prefix else ""
        files = []
        for item in self._items(start):
            key = item["Key"][len(start):]
            if key == OWN_FOLDER or key.startswith(OWN_FOLDER + "/"):
                continue
            if key.endswith("/") and item["Size"] == 0:  # a console's folder placeholder
                continue
            files.append(LandingFile(key, item["ETag"].strip('"'), item["Size"]))
        return sorted(files, key=lambda f: f.key)

    def fetch(self, file: LandingFile, target: Path, max_bytes: int) -> None:
        from botocore.exceptions import ClientError

        _check_size(file.size, max_bytes)
        try:  # IfMatch: the content read is the one the fingerprint (ETag) names
            response = self.client.get_object(Bucket=self.bucket,
                                              Key=self._object_key(file.key),
                                              IfMatch=f'"{file.fingerprint}"')
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("PreconditionFailed", "NoSuchKey", "412"):
                raise FileChanged(f"{self.describe(file)}: changed since it was listed"
                                  ) from exc
            raise
        body = response["Body"]
        try:
            _write_private(target, body.iter_chunks(CHUNK), max_bytes)
        finally:
            body.close()

    def _marker_room(self) -> int:
        return MAX_OBJECT_KEY_BYTES - len(self._object_key("").encode())

    def _read_json(self, object_key: str) -> dict:
        body = self.client.get_object(Bucket=self.bucket, Key=object_key)["Body"]
        return json.loads(body.read())

    def _markers(self, read_all: bool) -> dict[tuple[str, str], dict | None]:
        """Every marker's (landing key, fingerprint) and record; the record is read only
        with `read_all` or when the key is found in it (a marker under `.sha256/`)."""
        skip = len(self._object_key(""))
        found: dict[tuple[str, str], dict | None] = {}
        for item in self._items(self._object_key(MARKERS) + "/"):
            if parsed := parse_marker(item["Key"][skip:]):
                found[parsed] = self._read_json(item["Key"]) if read_all else None
            elif hashed := hashed_marker(item["Key"][skip:]):
                record = self._read_json(item["Key"])
                if key := named_key(hashed[0], record):
                    found[(key, hashed[1])] = record
        return found

    def markers(self) -> dict[tuple[str, str], dict]:
        return self._markers(read_all=True)

    def handled(self) -> set[tuple[str, str]]:
        return set(self._markers(read_all=False))

    def mark(self, file: LandingFile, record: dict) -> None:
        """Markers are shared by every host: the first one written for a file wins
        (a conditional put), so another ingest's marker is never overwritten."""
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket,
                                   Key=self._object_key(marker_key(file, self._marker_room())),
                                   Body=json.dumps({**record, "key": file.key}).encode(),
                                   IfNoneMatch="*")
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("PreconditionFailed", "412"):
                raise


def open_landing(source: str | Path) -> LocalLanding | S3Landing:
    source = str(source)
    return S3Landing(source) if source.startswith("s3://") else LocalLanding(Path(source))

