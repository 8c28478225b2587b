"""The S3 backend of `socarrat.storage` (`open_store("s3://bucket/prefix")`): the only module that
imports boto3, loaded with the first s3:// URI. Credentials and endpoint come from the AWS settings."""

import contextlib
import functools
import itertools
import os
import random
import time
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
from socarrat.storage import Store, _file_uri, _os_errors, _publish

PART_SIZE_BYTES = 8 * 1024 * 1024
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
            # A key ending in "/" is a folder marker (the S3 console's "Create folder"), not an object.
            return sorted(obj["Key"][len(base):] for page in pages for obj in page.get("Contents", [])
                          if not obj["Key"].endswith("/"))

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
