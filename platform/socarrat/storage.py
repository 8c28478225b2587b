"""One interface over local folders and S3: `open_store(uri)` gives a `Store` of keys under a base URI.

A base URI is `s3://bucket/prefix`, `file:///abs/dir`, or a plain path. Keys are `/`-separated and
never escape the base. Local writes are atomic (temp file + rename), so readers never see a partial
file on either backend. The S3 backend (`socarrat.s3`, the only module that imports boto3) loads
with the first s3:// URI; everything else goes through `Store`, so S3 == local can be tested once.
"""

import abc
import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from socarrat.errors import NotFoundError, UserError

_TMP_PREFIX = ".tmp-"


class Store(abc.ABC):
    """Keys under one base URI; `uri` is that base, normalised, without a trailing slash."""

    uri: str

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write `data` at `key`; with `if_absent`, the first writer wins and later ones get False."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The whole object at `key`; NotFoundError naming its URI when missing."""

    @abc.abstractmethod
    def put_file(self, key: str, path: str | os.PathLike, *, if_absent: bool = False) -> bool:
        """Upload the file at `path` to `key`; same return value as `put_bytes`."""

    @abc.abstractmethod
    def get_file(self, key: str, path: str | os.PathLike) -> None:
        """Download `key` to `path` atomically, creating its parent folders."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored at `key`."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys starting with `prefix`, relative to the base, recursive and sorted."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is not an error."""

    @abc.abstractmethod
    def url(self, key: str) -> str:
        """The full URI of `key`."""

    def share_url(self, key: str, expires_s: int) -> str:
        """A URL that gives `key` to someone without this store's credentials: an S3 presigned
        HTTPS URL valid for `expires_s`; a local file's file:// URI."""
        return self.url(key)

    def _check(self, key: str) -> str:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") or p.startswith(_TMP_PREFIX) for p in parts):
            raise UserError(
                f"key {key!r} under {self.uri} is not allowed: use '/'-separated names, none empty, "
                f"'.', '..' or starting with {_TMP_PREFIX!r}"
            )
        return key

    def _check_prefix(self, prefix: str) -> str:
        if prefix.startswith("/") or ".." in prefix.split("/"):
            raise UserError(f"list prefix {prefix!r} under {self.uri} must be relative and free of '..'")
        return prefix


class LocalStore(Store):
    """Keys as files under a local folder, created on first write."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.abspath(root))
        self.uri = _file_uri(self.root)

    def _path(self, key: str) -> Path:
        return self.root / self._check(key)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        return _publish(self._path(key), lambda f: f.write(data), if_absent=if_absent)

    def get_bytes(self, key: str) -> bytes:
        with _os_errors(self.url(key)):
            return self._path(key).read_bytes()

    def put_file(self, key: str, path: str | os.PathLike, *, if_absent: bool = False) -> bool:
        with _os_errors(_file_uri(path)), open(path, "rb") as src:
            return _publish(self._path(key), lambda f: shutil.copyfileobj(src, f), if_absent=if_absent)

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        with _os_errors(self.url(key)), open(self._path(key), "rb") as src:
            _publish(Path(path), lambda f: shutil.copyfileobj(src, f))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        keys = []
        # Walk only the deepest folder the prefix names, not the whole store.
        for folder, _, names in os.walk(self.root / self._check_prefix(prefix).rpartition("/")[0]):
            rel = Path(folder).relative_to(self.root).as_posix()
            for name in names:
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix) and not name.startswith(_TMP_PREFIX):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        with _os_errors(self.url(key), writing=True):
            self._path(key).unlink(missing_ok=True)

    def url(self, key: str) -> str:
        return _file_uri(self._path(key))


_PROBE = ".write-check"  # what `check_writable` writes and removes


def open_store(uri: str) -> Store:
    """The store at a base URI: `s3://bucket/prefix`, `file:///abs/dir`, `relative/dir` or `/abs/dir`."""
    if is_remote(uri):
        from socarrat.s3 import S3Store  # boto3 loads only for S3 (0.1 s to import, 13 MB of botocore)

        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        return S3Store(bucket, prefix)
    return LocalStore(_local_path(uri))


def is_remote(uri: str) -> bool:
    """Whether `uri` names S3 rather than the local disk."""
    return uri.startswith("s3://")


def absolute(uri: str) -> str:
    """`uri` with a relative local path made absolute (s3:// and file:// as they are), for work done
    in another working directory, such as Ray Train's workers (each starts in a folder of its own)."""
    return uri if "://" in uri else os.path.abspath(uri)


def check_writable(uri: str) -> None:
    """UserError unless objects can be written under `uri` (a bad scheme, a missing bucket, no
    permission, a folder that cannot be made): writes and removes one empty object."""
    store = open_store(uri)
    store.put_bytes(_PROBE, b"")
    with contextlib.suppress(UserError):  # a store that allows writes but not deletes is still usable
        store.delete(_PROBE)


def join(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended, separated by single slashes."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p.strip("/"))])


def read_bytes(uri: str) -> bytes:
    """The whole object at a full URI."""
    store, key = _split(uri)
    return store.get_bytes(key)


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to a full URI, replacing what was there."""
    store, key = _split(uri)
    store.put_bytes(key, data)


def parent(uri: str) -> str:
    """The folder or prefix holding the object at a full URI (`s3://b/p/x.png` -> `s3://b/p`)."""
    if is_remote(uri):
        return uri.rpartition("/")[0]
    return str(_local_path(uri).parent)


def _split(uri: str) -> tuple[Store, str]:
    if is_remote(uri):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return open_store(f"s3://{bucket}"), key
    path = _local_path(uri)
    return LocalStore(path.parent), path.name


def _local_path(uri: str) -> Path:
    if not uri.strip():  # Path("") is the working directory: a forgotten value must not mean "here"
        raise UserError("an empty path or URI: name a folder or file ('.' for the current folder)")
    if uri.startswith("file://"):
        path = uri.removeprefix("file://")
        if not path.startswith("/"):
            raise UserError(f"file URI {uri!r} needs an absolute path: file:///abs/dir")
        return Path(path)
    if "://" in uri:
        raise UserError(f"URI {uri!r} has an unsupported scheme; use s3://, file:// or a plain path")
    return Path(uri)


def _file_uri(path: str | os.PathLike) -> str:
    # Not percent-encoded, so that `_local_path` reverses it exactly.
    return "file://" + os.path.abspath(path)


def _publish(dest: Path, fill: Callable[[BinaryIO], object], *, if_absent: bool = False) -> bool:
    """Write `dest` through a temp file beside it, so readers never see a partial file."""
    with _os_errors(_file_uri(dest), writing=True):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        # Mode 0o666 minus the umask, like a plain open(); mkstemp's 0o600 would hide files from other users.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f, _os_errors(_file_uri(dest), writing=True):  # a full disk, say
            fill(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name: a crash leaves no empty "done" file
        with _os_errors(_file_uri(dest), writing=True):
            if not if_absent:
                os.replace(tmp, dest)
                return True
            try:
                os.link(tmp, dest)  # fails when dest exists: the first writer wins, without a race
            except FileExistsError:
                return False
            return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def _os_errors(uri: str, *, writing: bool = False) -> Iterator[None]:
    """Turn OS errors caused by the caller's path into errors naming `uri`."""
    try:
        yield
    except PermissionError:
        raise UserError(f"permission denied for {uri}; make it accessible or choose another folder") from None
    except OSError as err:
        # Any failure to write (a parent that is a file, a full disk) is about the place the caller chose.
        if writing:
            raise UserError(f"cannot write {uri}: {err.strerror}") from None
        if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            raise NotFoundError(f"{uri} does not exist") from None
        raise
