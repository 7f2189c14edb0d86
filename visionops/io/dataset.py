"""Version the dataset with DVC: the data version is the md5 DVC records in
`<data>.dvc`, pushed to the default remote so it can be pulled back, and committed to a
git remote and branch so that a fresh clone of that branch names it."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import TypeVar

import yaml

Result = TypeVar("Result")
LOGGER = logging.getLogger(__name__)

# DVC gives up on its repository lock after 3 s; our calls wait this long for it.
DVC_LOCK_WAIT_S = 600.0
GIT_TIMEOUT_S = 300
PUSH_ATTEMPTS = 5  # the remote branch may move between our fetch and our push
FALLBACK_IDENTITY = {"user.name": "visionops", "user.email": "visionops@localhost"}
# DVC has no public API to hash a folder as `dvc add` would, or to ask whether its cache
# holds a directory version: those two use dvc-data's internals within the majors they are
# tested with (tests/unit/test_version.py::test_the_dvc_internals_used_here_still_exist),
# and DVC's documented formats (the `.dir` listing, the cache's layout) otherwise.
DVC_INTERNALS_MAJORS = {"dvc-data": "3", "dvc-objects": "5"}


@dataclass
class DataVersion:
    md5: str
    dvc_file: str | None  # None when the folder lies outside any DVC repository
    pushed_to: str | None


@dataclass
class DatasetRecord:
    commit: str | None  # the commit on the remote branch whose data.dvc names the version
    detail: str         # what happened, for the log


class GitError(RuntimeError):
    """A git command failed; the message has the command, the folder and git's stderr."""

    def __init__(self, args: tuple[str, ...], cwd: Path, stderr: str):
        self.stderr = stderr
        super().__init__(f"git {' '.join(args)} (in {cwd}) failed: {stderr}")


class DatasetVersionConflict(RuntimeError):
    """The remote branch records a dataset version this repository never had."""


def _dvc_root(data_dir: Path) -> Path | None:
    for folder in [data_dir.parent, *data_dir.parent.parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def dvc_file(data_dir: Path) -> Path:
    """`<data>.dvc` beside the folder: the dataset version DVC records."""
    return data_dir.with_name(data_dir.name + ".dvc")


def recorded_md5(tracked_by: Path) -> str:
    """The md5 a `.dvc` file records for its one output."""
    return _recorded_out(tracked_by.read_text(), str(tracked_by))["md5"]


def _recorded_out(text: str, source: str) -> dict:
    try:
        out = yaml.safe_load(text)["outs"][0]
        if isinstance(out["md5"], str) and isinstance(out["path"], str):
            return out
    except (yaml.YAMLError, TypeError, KeyError, IndexError):
        pass
    raise ValueError(f"{source}: not a DVC file with one output, its path and its md5")


def content_hash(data_dir: Path) -> str:
    """The md5 `dvc add` would record, computed without tracking the folder."""
    if dvc_internals_supported():
        return _content_hash_by_dvc_data(data_dir)
    return _content_hash_by_format(data_dir)


@functools.cache
def dvc_internals_supported() -> bool:
    """dvc-data and dvc-objects are of the majors whose internals this module uses."""
    try:
        found = {name: metadata.version(name) for name in DVC_INTERNALS_MAJORS}
    except metadata.PackageNotFoundError:
        return False
    supported = all(found[name].split(".")[0] == major
                    for name, major in DVC_INTERNALS_MAJORS.items())
    if not supported:
        LOGGER.warning("dvc-data %s / dvc-objects %s: untested majors, hashing and cache "
                       "lookups use DVC's documented formats", *found.values())
    return supported


def _content_hash_by_dvc_data(data_dir: Path) -> str:
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import LocalFileSystem, MemoryFileSystem

    scratch = HashFileDB(MemoryFileSystem(), "/scratch")
    _, _, tree = build(scratch, str(data_dir.resolve()), LocalFileSystem(), "md5")
    return tree.hash_info.value


def _content_hash_by_format(data_dir: Path) -> str:
    """DVC's documented directory hash: the md5 of its `.dir` listing (a JSON list of
    {"md5", "relpath"} sorted by relpath, each file's md5 of its bytes), plus `.dir`."""
    data_dir = data_dir.resolve()
    listing = []
    for folder, _, names in os.walk(data_dir):
        for name in names:
            path = Path(folder, name)
            with path.open("rb") as content:
                md5 = hashlib.file_digest(content, "md5").hexdigest()
            listing.append({"md5": md5, "relpath": path.relative_to(data_dir).as_posix()})
    listing.sort(key=lambda entry: entry["relpath"])
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


def in_cache(repo, md5: str) -> bool:
    """The DVC repository's local cache holds the object `md5` (for a directory version,
    its listing): a version this repository had."""
    if dvc_internals_supported():
        return repo.cache.local.exists(md5)
    return Path(repo.cache.local_cache_dir, "files", "md5", md5[:2], md5[2:]).is_file()


def recorded_files(data_dir: Path) -> set[str] | None:
    """Paths (relative to the folder) in the version `<data>.dvc` records; None outside a
    DVC repository, without `<data>.dvc`, or when the local cache lacks that version's
    listing."""
    from dvc.repo import Repo

    data_dir = data_dir.resolve()
    root, tracked_by = _dvc_root(data_dir), dvc_file(data_dir)
    if root is None or not tracked_by.is_file():
        return None
    md5 = recorded_md5(tracked_by)
    with Repo(str(root)) as repo:
        if not in_cache(repo, md5):
            return None
        if dvc_internals_supported():
            return _listing_by_dvc_data(repo, md5)
        return _listing_by_dvc_api(repo, data_dir.relative_to(root))


def _listing_by_dvc_data(repo, md5: str) -> set[str]:
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    return {"/".join(key) for key, _, _ in Tree.load(repo.cache.local, HashInfo("md5", md5))}


def _listing_by_dvc_api(repo, folder: Path) -> set[str]:
    """The same through DVC's public file system; it indexes the whole workspace first,
    about five times slower."""
    from dvc.api import DVCFileSystem

    top = PurePosixPath("/", folder.as_posix())
    found = DVCFileSystem(repo=repo).find(str(top), detail=False, dvc_only=True)
    return {PurePosixPath(path).relative_to(top).as_posix() for path in found}


def version_dataset(data_dir: Path, push: bool = True) -> DataVersion:
    """`dvc add` the folder (a no-op when unchanged) and push it to the default remote."""
    from dvc.repo import Repo

    data_dir = data_dir.resolve()
    root = _dvc_root(data_dir)
    if root is None:
        return DataVersion(md5=content_hash(data_dir), dvc_file=None, pushed_to=None)
    tracked_by = dvc_file(data_dir)

    def add_and_push() -> str | None:
        # DVC prints git hints on stdout; keep stdout for the CLI's own output.
        with contextlib.redirect_stdout(sys.stderr), Repo(str(root)) as repo:
            repo.add(str(data_dir))
            remote = repo.config["core"].get("remote")
            if push and remote:
                repo.push(targets=[str(tracked_by)])
        return remote

    remote = wait_for_dvc_lock(add_and_push, root)
    return DataVersion(md5=recorded_md5(tracked_by), dvc_file=str(tracked_by.relative_to(root)),
                       pushed_to=remote if push else None)


def needs_pull(data_dir: Path) -> bool:
    """The folder is tracked by a `.dvc` file but absent or empty here (a fresh clone, a
    new worker): its content is on the DVC remote."""
    tracked = dvc_file(data_dir).exists()
    return tracked and not (data_dir.is_dir() and any(data_dir.iterdir()))


def pull_dataset(data_dir: Path) -> Path:
    """`dvc pull` the version `<data>.dvc` records from the default remote."""
    from dvc.repo import Repo

    data_dir = data_dir.resolve()
    root = _dvc_root(data_dir)
    if root is None:
        raise FileNotFoundError(f"{data_dir}: not inside a DVC repository, nothing to pull")

    def pull() -> None:
        with contextlib.redirect_stdout(sys.stderr), Repo(str(root)) as repo:
            repo.pull(targets=[str(dvc_file(data_dir))])

    wait_for_dvc_lock(pull, root)
    return data_dir


def sync_dataset(data_dir: Path) -> str:
    """Make the folder the version `<data>.dvc` records, before anything reads it.

    Returns what it found or did: `untracked` (no `.dvc` file), `in sync`, `checked out`
    (the folder held another version this repository had: stale, replaced from the
    cache), `pulled` (the same, with content fetched from the DVC remote), or `modified`
    (content no version here ever had: images added or removed by hand, left for
    `dvc add` to version rather than thrown away)."""
    from dvc.exceptions import CheckoutError
    from dvc.repo import Repo

    data_dir = data_dir.resolve()
    root = _dvc_root(data_dir)
    tracked_by = dvc_file(data_dir)
    if root is None or not tracked_by.is_file():
        return "untracked"
    wanted = recorded_md5(tracked_by)
    present = data_dir.is_dir() and any(data_dir.iterdir())
    current = content_hash(data_dir) if present else None
    if current == wanted:
        return "in sync"

    def check_out() -> str:
        with contextlib.redirect_stdout(sys.stderr), Repo(str(root)) as repo:
            if current is not None and not in_cache(repo, current):
                return "modified"
            try:
                repo.checkout(targets=[str(tracked_by)], force=True)
                return "checked out"
            except CheckoutError:  # part of the version is not in the cache here
                repo.pull(targets=[str(tracked_by)], force=True)
                return "pulled"

    state = wait_for_dvc_lock(check_out, root)
    if state != "modified" and (found := content_hash(data_dir)) != wanted:
        raise RuntimeError(f"{data_dir}: holds {found} after DVC {state} it, "
                           f"but {tracked_by} records {wanted}")
    return state


def wait_for_dvc_lock(operation: Callable[[], Result], root: Path,
                      wait_s: float = DVC_LOCK_WAIT_S) -> Result:
    """Run a DVC operation, trying again while another DVC command holds the repository's
    lock: DVC itself gives up after 3 s, and overlapping runs then fail for nothing. DVC
    takes its lock before it changes anything, so trying again is safe."""
    from dvc.lock import LockError

    deadline = time.monotonic() + wait_s
    pause = 1.0
    while True:
        try:
            return operation()
        except LockError as exc:
            if time.monotonic() + pause > deadline:
                raise LockError(f"{root}: another DVC command held the repository lock "
                                f"(.dvc/tmp/lock) for over {wait_s:.0f} s") from exc
            time.sleep(pause)
            pause = min(pause * 2, 30.0)


def record_dataset(data_dir: Path, remote: str | None, branch: str) -> DatasetRecord:
    """record_dataset_version for the version `<data>.dvc` records now (after `dvc add`)."""
    data_dir = data_dir.resolve()
    root, tracked_by = _dvc_root(data_dir), dvc_file(data_dir)
    if root is None or not tracked_by.is_file():
        return DatasetRecord(None, f"not recorded: {tracked_by} does not exist or is "
                                   "outside any DVC repository")
    return record_dataset_version(root, tracked_by, recorded_md5(tracked_by), remote, branch)


def record_dataset_version(root: Path, tracked_by: Path, md5: str, remote: str | None,
                           branch: str) -> DatasetRecord:
    """Commit `tracked_by` (and the `.gitignore` entry DVC adds for its output) and push
    that change alone to `branch` of `remote`, so a fresh clone of the branch names the
    dataset version. Nothing else of the working tree or the index is committed.

    The change is committed on the current branch, then rebuilt on top of the remote
    branch's tip, so commits that only exist here are never pushed (a branch that does not
    exist there yet is created from the current branch). A remote branch whose
    `tracked_by` names a version this repository never had raises
    DatasetVersionConflict: two workers ingested different data, and neither is dropped.
    """
    if remote is None:
        return DatasetRecord(None, "not recorded: ingest.git_remote is null")
    top = _git_toplevel(root)
    if top is None:
        return DatasetRecord(None, f"not recorded: {root} is not in a git repository")
    found = recorded_md5(tracked_by)
    if found != md5:
        raise ValueError(f"{tracked_by}: records {found}, not the version {md5} to record")
    path = tracked_by.resolve().relative_to(top).as_posix()
    ignore_path = (Path(path).parent / ".gitignore").as_posix()
    ignore_entry = _dvc_ignore_entry(tracked_by)
    identity = _identity(top)
    blob = _git(top, "hash-object", "-w", "--", path)
    message = (f"Record dataset version {md5}\n\n{path} names the DVC data version "
               "ingested by visionops; `dvc pull` fetches it.")

    def changes(base: str | None) -> dict[str, str]:
        wanted = {path: blob}
        if ignore_entry is not None:
            wanted[ignore_path] = _with_line(top, base, ignore_path, ignore_entry)
        return wanted

    local = _commit_here(top, changes, message, identity)
    known = _blobs_in_history(top, local, path)
    for _ in range(PUSH_ATTEMPTS):
        tip = _fetch_tip(top, remote, branch)
        if tip is None:
            pushed = _push(top, remote, local, branch)
            commit = local
        else:
            remote_blob = _rev(top, f"{tip}:{path}")
            if remote_blob is not None and remote_blob not in known:
                remote_md5 = _recorded_out(_git(top, "cat-file", "blob", remote_blob),
                                           f"{remote} {branch}:{path}")["md5"]
                raise DatasetVersionConflict(
                    f"{remote} {branch}: {path} records dataset version {remote_md5}, which "
                    f"this repository ({top}) never had; its own version {md5} is committed "
                    f"here as {local}. Merge the two datasets, then record the result.")
            commit = _commit_files(top, tip, changes(tip), message, identity)
            if commit == tip:
                return DatasetRecord(tip, f"{md5} already on {remote} {branch} ({tip})")
            pushed = _push(top, remote, commit, branch)
        if pushed:
            return DatasetRecord(commit, f"{md5} committed and pushed to {remote} {branch} "
                                         f"({commit})")
    raise GitError(("push", remote, branch), top,
                   f"rejected {PUSH_ATTEMPTS} times: the branch kept moving")


def adopt_recorded_version(root: Path, tracked_by: Path, remote: str | None,
                           branch: str) -> str:
    """Bring `tracked_by` up to the version recorded on `branch` of `remote`, when the
    version here is one that branch already had (older, or the same): a worker that ran
    while another recorded a newer version must build on it, not on its own stale one.
    The adopted file is committed here (that change alone), so that this repository's
    history holds every version it worked from. Returns what it did."""
    if remote is None:
        return "not fetched: ingest.git_remote is null"
    top = _git_toplevel(root)
    if top is None:
        return f"not fetched: {root} is not in a git repository"
    path = tracked_by.resolve().relative_to(top).as_posix()
    tip = _fetch_tip(top, remote, branch)
    remote_blob = _rev(top, f"{tip}:{path}") if tip else None
    if remote_blob is None:
        return f"{remote} {branch} records no {path}"
    remote_text = _git(top, "cat-file", "blob", remote_blob, strip=False)
    remote_md5 = _recorded_out(remote_text, f"{remote} {branch}:{path}")["md5"]
    if tracked_by.is_file():
        here = _git(top, "hash-object", "--", path)
        if here == remote_blob:
            return f"{remote_md5}, as on {remote} {branch}"
        if here not in _blobs_in_history(top, tip, path):
            return (f"{recorded_md5(tracked_by)} kept: {remote} {branch} never had it "
                    f"(it records {remote_md5})")
    tracked_by.write_text(remote_text)
    _commit_here(top, lambda _: {path: remote_blob},
                 f"Adopt dataset version {remote_md5} from {remote} {branch}", _identity(top))
    return f"{remote_md5} adopted from {remote} {branch}"


def _commit_here(top: Path, changes: Callable[[str | None], dict[str, str]], message: str,
                 identity: list[str]) -> str:
    """Commit `changes(HEAD)` (path -> blob) on the current branch, and stage them where
    nothing else was staged; nothing else of the index or the working tree is touched.
    Returns the new HEAD (the old one when nothing changed)."""
    head = _rev(top, "HEAD")
    files = changes(head)
    commit = _commit_files(top, head, files, message, identity)
    if commit != head:
        _git(top, *identity, "update-ref", "-m", f"visionops: {message.splitlines()[0]}",
             "HEAD", commit, head or "0" * 40)
        _stage_unless_staged(top, head, files)
    return commit


def _dvc_ignore_entry(tracked_by: Path) -> str | None:
    """The line DVC adds to the `.gitignore` beside `tracked_by` for its output, when it
    added one."""
    entry = "/" + _recorded_out(tracked_by.read_text(), str(tracked_by))["path"]
    ignore = tracked_by.with_name(".gitignore")
    present = ignore.is_file() and entry in ignore.read_text().splitlines()
    return entry if present else None


def _git(cwd: Path, *args: str, env: dict[str, str] | None = None,
         stdin: str | None = None, strip: bool = True) -> str:
    env = {**(env or os.environ), "GIT_TERMINAL_PROMPT": "0"}
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              input=stdin, env=env, timeout=GIT_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise TimeoutError(f"git {' '.join(args)} (in {cwd}): no answer in "
                           f"{GIT_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        raise GitError(args, cwd, done.stderr.strip())
    return done.stdout.strip() if strip else done.stdout


def _git_toplevel(root: Path) -> Path | None:
    try:
        return Path(_git(root, "rev-parse", "--show-toplevel"))
    except GitError:
        return None


def _rev(top: Path, name: str) -> str | None:
    try:
        return _git(top, "rev-parse", "--verify", "--quiet", name)
    except GitError:
        return None


def _identity(top: Path) -> list[str]:
    """`-c` options for the author and committer git lacks a configuration for."""
    options = []
    for key, value in FALLBACK_IDENTITY.items():
        try:
            _git(top, "config", key)
        except GitError:
            options += ["-c", f"{key}={value}"]
    return options


def _with_line(top: Path, base: str | None, path: str, line: str) -> str:
    """The blob of `path` as in `base`, with `line` appended when missing."""
    blob = _rev(top, f"{base}:{path}") if base else None
    text = _git(top, "cat-file", "blob", blob, strip=False) if blob else ""
    if blob and line in text.splitlines():
        return blob
    if text and not text.endswith("\n"):
        text += "\n"
    return _git(top, "hash-object", "-w", "--stdin", stdin=text + line + "\n")


def _commit_files(top: Path, base: str | None, files: dict[str, str], message: str,
                  identity: list[str]) -> str | None:
    """A commit of `base`'s tree with `files` (path -> blob) set, or `base` itself when
    that changes nothing. Neither the index nor the working tree is touched."""
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(scratch) / "index")}
        if base:
            _git(top, "read-tree", base, env=env)
        for path, blob in files.items():
            _git(top, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
        tree = _git(top, "write-tree", env=env)
    if base and tree == _rev(top, f"{base}^{{tree}}"):
        return base
    parents = ["-p", base] if base else []
    return _git(top, *identity, "commit-tree", tree, *parents, "-m", message)


def _stage_unless_staged(top: Path, old_head: str | None, files: dict[str, str]) -> None:
    """Set the index to the new commit for paths with nothing staged, so `git status`
    shows them clean; a path with staged changes keeps them."""
    for path, blob in files.items():
        staged = (_git(top, "diff", "--cached", "--name-only", old_head, "--", path)
                  if old_head else _git(top, "ls-files", "--", path))
        if not staged:
            _git(top, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}")


def _blobs_in_history(top: Path, commit: str, path: str) -> set[str]:
    """Every content `path` had in the history of `commit`."""
    raw = _git(top, "log", "--no-abbrev", "--format=", "--raw", commit, "--", path)
    return {sha for line in raw.splitlines() for sha in line.split()[2:4]
            if sha.strip("0")}


def _fetch_tip(top: Path, remote: str, branch: str) -> str | None:
    """The remote branch's tip, fetched here; None when the branch does not exist yet."""
    try:
        _git(top, "fetch", "--no-tags", "--quiet", remote, f"refs/heads/{branch}")
    except GitError as exc:
        if "couldn't find remote ref" in exc.stderr:
            return None
        raise
    return _git(top, "rev-parse", "FETCH_HEAD")


def _push(top: Path, remote: str, commit: str, branch: str) -> bool:
    """Push `commit` as the remote branch; False when it was rejected because the branch
    moved (not a fast-forward)."""
    try:
        _git(top, "push", "--quiet", "--no-verify", remote, f"{commit}:refs/heads/{branch}")
    except GitError as exc:
        if any(sign in exc.stderr for sign in ("[rejected]", "non-fast-forward",
                                                "fetch first")):
            return False
        raise
    return True


def sync_recorded(data_dir: Path, git_remote: str | None = None, git_branch: str = "main"
                  ) -> str:
    """The newest data.dvc recorded on the git remote, then its content in the folder;
    a one-line summary of both."""
    data_dir = data_dir.resolve()
    root = _dvc_root(data_dir)
    adopted = (adopt_recorded_version(root, dvc_file(data_dir), git_remote, git_branch)
               if root is not None else "none: outside any DVC repository")
    state = sync_dataset(data_dir)
    return f"data.dvc: {adopted}; {data_dir.name}/: {state}"
