"""One interface over local folders and S3: `open_store(uri)` gives a `Store` of keys under a base URI.

A base URI is `s3://bucket/prefix`, `file:///abs/dir`, or a plain path. Keys are `/`-separated and
never escape the base. Local writes are atomic (temp file + rename), so readers never see a partial
file on either backend. This is the only module that may import boto3; everything else goes
through `Store`, so S3 == local can be tested once, here.
"""

import abc
import contextlib
import functools
import itertools
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import boto3
from botocore.client import BaseClient
from botocore.exceptions import (
    ClientError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError, ParamValidationError,
    PartialCredentialsError, ProfileNotFound,
)

from socarrat.errors import NotFoundError, UserError

PART_SIZE_BYTES = 8 * 1024 * 1024
_TMP_PREFIX = ".tmp-"
_MAX_PARTS = 10_000  # S3's limit on parts per multipart upload
_ALREADY_EXISTS = "PreconditionFailed"  # HTTP 412
# HTTP 409: a conditional write raced another operation on the key; S3 asks to retry it (a multipart
# upload from its start), and then answers 412 if the other write created the object.
_CONFLICT = "ConditionalRequestConflict"
_CONFLICT_RETRIES = 5
_DENIED = ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
           "InvalidToken")
_UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError)
_NO_CREDENTIALS = (NoCredentialsError, PartialCredentialsError, ProfileNotFound)


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


class S3Store(Store):
    """Keys as objects under `s3://bucket/prefix`; credentials and endpoint from the AWS settings."""

    def __init__(self, bucket: str, prefix: str = "", *, part_size_bytes: int = PART_SIZE_BYTES):
        if not bucket:
            raise UserError("an S3 URI needs a bucket: s3://bucket/prefix")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.part_size_bytes = part_size_bytes  # files above this size go up in parts of this size

    @functools.cached_property
    def _client(self) -> BaseClient:
        # A session per store: the default session is not safe to share across threads.
        return boto3.session.Session().client("s3")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{self._check(key)}" if self.prefix else self._check(key)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        return self._write(key, if_absent, lambda extra: self._client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data, **extra))

    def get_bytes(self, key: str) -> bytes:
        with self._errors(key):
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def put_file(self, key: str, path: str | os.PathLike, *, if_absent: bool = False) -> bool:
        with _os_errors(_file_uri(path)), open(path, "rb") as src:
            size = os.fstat(src.fileno()).st_size

            def upload(extra: dict) -> None:
                src.seek(0)  # a retried upload starts again
                if size <= self.part_size_bytes:
                    self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=src, **extra)
                else:
                    self._put_parts(self._key(key), src, size, extra)

            return self._write(key, if_absent, upload)

    def _put_parts(self, full_key: str, src: BinaryIO, size: int, extra: dict) -> None:
        part_size = max(self.part_size_bytes, -(-size // _MAX_PARTS))
        where = {"Bucket": self.bucket, "Key": full_key}
        # CRC32 named on every call: botocore may checksum parts on its own, S3 may reject part checksums
        # of a type the upload did not declare, and complete_multipart_upload must repeat them.
        upload_id = self._client.create_multipart_upload(**where, ChecksumAlgorithm="CRC32")["UploadId"]
        try:
            parts = []
            for number, chunk in enumerate(iter(lambda: src.read(part_size), b""), start=1):
                done = self._client.upload_part(
                    **where, UploadId=upload_id, PartNumber=number, Body=chunk, ChecksumAlgorithm="CRC32")
                parts.append(
                    {"PartNumber": number, "ETag": done["ETag"], "ChecksumCRC32": done["ChecksumCRC32"]})
            self._client.complete_multipart_upload(
                **where, UploadId=upload_id, MultipartUpload={"Parts": parts}, **extra)
        except BaseException:
            # Uploaded parts are billed until aborted; the original error matters more than a failed abort.
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(**where, UploadId=upload_id)
            raise

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        with self._errors(key):
            _publish(Path(path), lambda f: self._client.download_fileobj(self.bucket, self._key(key), f))

    def exists(self, key: str) -> bool:
        with self._errors(key):
            try:
                self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as err:
                if err.response["Error"].get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
        return True

    def list(self, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        with self._errors():
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base + self._check_prefix(prefix))
            return sorted(obj["Key"][len(base):] for page in pages for obj in page.get("Contents", []))

    def delete(self, key: str) -> None:
        with self._errors(key):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def share_url(self, key: str, expires_s: int) -> str:
        with self._errors(key):
            return self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_s)

    def _write(self, key: str, if_absent: bool, upload: Callable[[dict], object]) -> bool:
        """Run `upload(extra_args)`; with `if_absent`, S3 itself refuses to overwrite, so no race."""
        with self._errors(key):
            for attempt in itertools.count():
                try:
                    upload({"IfNoneMatch": "*"} if if_absent else {})
                    return True
                except ClientError as err:
                    code = err.response["Error"].get("Code")
                    if if_absent and code == _ALREADY_EXISTS:
                        return False
                    if code != _CONFLICT or attempt == _CONFLICT_RETRIES:
                        raise
                time.sleep(random.uniform(0, 0.05 * 2 ** attempt))  # jitter: the racing writer retries too

    @contextlib.contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except (ClientError, ParamValidationError, *_NO_CREDENTIALS, *_UNREACHABLE) as err:
            raise self._error(err, key) from None

    def _error(self, err: Exception, key: str | None) -> Exception:
        """The user mistake behind `err`, or `err` itself when it is not one."""
        uri = self.url(key) if key else self.uri
        if isinstance(err, _NO_CREDENTIALS):
            why = "" if isinstance(err, NoCredentialsError) else f" ({err})"
            return UserError(f"no AWS credentials for {uri}{why}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                             "AWS_PROFILE, or give the machine a role")
        if isinstance(err, _UNREACHABLE):
            return UserError(f"cannot reach S3 for {uri} ({err}); check AWS_ENDPOINT_URL, the region and the network")
        if isinstance(err, ParamValidationError):  # an S3 URI that cannot be a request, such as "s3://my bucket"
            return UserError(f"{uri} is not a valid S3 location: {err.kwargs['report'].split(':')[0]}")
        code = err.response["Error"].get("Code", "")
        if code == "InvalidBucketName":
            return UserError(f"{self.bucket!r} is not a valid S3 bucket name (in {uri})")
        if code == "NoSuchBucket":
            return NotFoundError(
                f"bucket {self.bucket!r} does not exist (needed for {uri}); create it or fix the URI")
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFoundError(f"{uri} does not exist")
        if code in _DENIED:
            return UserError(
                f"access denied to {uri} ({code}); check the AWS credentials and the bucket policy")
        return err


_PROBE = ".write-check"  # what `check_writable` writes and removes


def open_store(uri: str) -> Store:
    """The store at a base URI: `s3://bucket/prefix`, `file:///abs/dir`, `relative/dir` or `/abs/dir`."""
    if is_remote(uri):
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


def _split(uri: str) -> tuple[Store, str]:
    if is_remote(uri):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return S3Store(bucket), key
    path = _local_path(uri)
    return LocalStore(path.parent), path.name


def _local_path(uri: str) -> Path:
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
