"""Pointers: small objects replaced only by compare-and-swap (dataset heads, registry aliases).

Each store's own primitive does the compare-and-swap, so two writers never both win:
  local  an exclusive flock on ``.NAME.lock`` beside the file, compare, write temp, os.replace;
         token = sha256 of the content
  s3     PutObject with If-None-Match: * (create) or If-Match: <ETag>; token = ETag
  gs     JSON-API media upload with ifGenerationMatch=0 (create) or =<generation>; token = generation
  az     Put Blob with If-None-Match: * or If-Match: <ETag>; token = ETag
Tokens are opaque strings: compare them only with ``==`` and pass them back as ``expect``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any, Iterator

from signscale.storage import (
    PreconditionFailed,
    StorageError,
    filesystem,
    http_status,
    invalidate,
    is_local,
    local_path,
    protocol,
    retry,
    write_bytes,
)


def read_pointer(url: str) -> tuple[bytes, str]:
    """(content, version token) of a small object; FileNotFoundError if absent."""
    proto = protocol(url)
    if is_local(url):
        return _local_read_pointer(local_path(url) or url)
    if proto in ("s3", "s3a"):
        return retry(lambda: _s3_read_pointer(url), what=url)
    if proto in ("gs", "gcs"):
        return retry(lambda: _gcs_read_pointer(url), what=url)
    if proto in ("az", "abfs", "abfss"):
        return retry(lambda: _az_read_pointer(url), what=url)
    raise StorageError(f"{url}: conditional writes are not supported on {proto}:// "
                       "(use a local path, s3://, gs:// or az://)")


def write_pointer(url: str, data: bytes, *, expect: str | None) -> str:
    """expect=None: create only if absent (If-None-Match: *); else replace only if the current
    version token equals expect (If-Match ETag / GCS ifGenerationMatch / Azure If-Match).
    Returns the new token. Raises PreconditionFailed on a lost race, never overwrites silently."""
    proto = protocol(url)
    data = bytes(data)
    if is_local(url):
        return _local_write_pointer(local_path(url) or url, data, expect)
    writers = {"s3": _s3_write_pointer, "s3a": _s3_write_pointer, "gs": _gcs_write_pointer,
               "gcs": _gcs_write_pointer, "az": _az_write_pointer, "abfs": _az_write_pointer,
               "abfss": _az_write_pointer}
    if proto not in writers:
        raise StorageError(f"{url}: conditional writes are not supported on {proto}:// "
                           "(use a local path, s3://, gs:// or az://)")
    attempts = 0

    def once() -> str:
        nonlocal attempts
        attempts += 1
        return writers[proto](url, data, expect)

    try:
        token = retry(once, what=url)
    except PreconditionFailed:
        # A retried write whose first attempt landed but whose reply was lost sees its own write
        # as "changed". Only after a retry, and only if the object now holds exactly our bytes,
        # is that a win; otherwise the race is lost.
        if attempts > 1:
            with contextlib.suppress(FileNotFoundError):
                current, tok = read_pointer(url)
                if current == data:
                    return tok
        raise
    _invalidate_url(url)
    return token


def _lost(url: str, expect: str | None, why: str = "") -> PreconditionFailed:
    why = f" {why}" if why else ""
    if expect is None:
        return PreconditionFailed(f"{url}: already exists, so create-if-absent lost the race{why}; "
                                  "read_pointer() it and retry with its token")
    return PreconditionFailed(f"{url}: changed since version {expect!r} was read{why}; "
                              "read_pointer() it again and redo the update")


def _invalidate_url(url: str) -> None:
    with contextlib.suppress(Exception):
        fs, path = filesystem(url)
        invalidate(fs, path)


_THREAD_LOCKS: dict[str, Any] = {}  # one lock per local pointer file and process (flock is per open file)


@contextlib.contextmanager
def _local_lock(path: str) -> Iterator[None]:
    """Exclusive lock for ``path`` across processes (flock) and threads (flock is per open file,
    but on NFS it degrades to per-process fcntl locks, so threads also share a threading.Lock)."""
    import threading

    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        raise StorageError(f"{path}: local conditional writes need POSIX file locks (fcntl)") from None
    key = os.path.abspath(path)
    tlock = _THREAD_LOCKS.setdefault(key, threading.Lock())
    d, base = os.path.split(key)
    os.makedirs(d, exist_ok=True)
    with tlock:
        fd = os.open(os.path.join(d, f".{base}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock


def _local_read_pointer(path: str) -> tuple[bytes, str]:
    with open(path, "rb") as f:
        data = f.read()
    return data, hashlib.sha256(data).hexdigest()


def _local_write_pointer(path: str, data: bytes, expect: str | None) -> str:
    with _local_lock(path):
        try:
            _, current = _local_read_pointer(path)
        except FileNotFoundError:
            current = None
        if expect is None and current is not None:
            raise _lost(path, expect)
        if expect is not None and current != expect:
            raise _lost(path, expect, "(it was deleted)" if current is None else "")
        write_bytes(path, data)  # temp + fsync + os.replace: readers (who take no lock) see old or new
        with contextlib.suppress(OSError):  # make the rename itself durable
            dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    return hashlib.sha256(data).hexdigest()


def _is_412(exc: BaseException) -> bool:
    return http_status(exc)[0] == 412 or http_status(exc)[1] == "PreconditionFailed"


def _s3_read_pointer(url: str) -> tuple[bytes, str]:
    from fsspec.asyn import sync

    fs, path = filesystem(url)
    bucket, key, _ = fs.split_path(path)

    async def get() -> tuple[bytes, str]:
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return await resp["Body"].read(), str(resp["ETag"])
        finally:
            resp["Body"].close()

    return sync(fs.loop, get)


def _s3_write_pointer(url: str, data: bytes, expect: str | None) -> str:
    fs, path = filesystem(url)
    bucket, key, _ = fs.split_path(path)
    cond = {"IfNoneMatch": "*"} if expect is None else {"IfMatch": expect}
    try:
        resp = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
    except FileNotFoundError as exc:  # If-Match on a deleted key: 404 NoSuchKey
        if expect is None or http_status(exc)[1] == "NoSuchBucket":
            raise
        raise _lost(url, expect, "(it was deleted)") from None
    except Exception as exc:
        if _is_412(exc):
            raise _lost(url, expect) from None
        raise
    return str(resp["ETag"])


def _gcs_object(url: str) -> tuple[Any, str, str]:
    fs, path = filesystem(url)
    bucket, key, _ = fs.split_path(path)
    return fs, bucket, key


def _gcs_read_pointer(url: str) -> tuple[bytes, str]:
    fs, bucket, key = _gcs_object(url)
    headers, data = fs.call("GET", "b/{}/o/{}", bucket, key, alt="media")
    generation = headers.get("x-goog-generation")
    if generation:  # the real service names the generation it served: one request, consistent
        return bytes(data), str(generation)
    # Servers that omit the header (gcp-storage-emulator): metadata, media, metadata; the pair is
    # consistent when the generation did not move in between.
    for _ in range(20):
        before = fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True)["generation"]
        _, data = fs.call("GET", "b/{}/o/{}", bucket, key, alt="media")
        after = fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True)["generation"]
        if before == after:
            return bytes(data), str(after)
    raise StorageError(f"{url}: the object kept changing while it was read; try again")


def _gcs_write_pointer(url: str, data: bytes, expect: str | None) -> str:
    from urllib.parse import quote

    fs, bucket, key = _gcs_object(url)
    # ifGenerationMatch=0 means "only if no live object exists"; =N "only if generation N is live".
    # A stale or missing generation gets 412, which gcsfs raises as FileExistsError.
    try:
        out = fs.call("POST", f"{fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
                      uploadType="media", name=key, ifGenerationMatch="0" if expect is None else expect,
                      data=data, headers={"Content-Type": "application/octet-stream"}, json_out=True)
    except FileExistsError:
        raise _lost(url, expect) from None
    return str(out["generation"])


def _az_object(url: str) -> tuple[Any, str, str]:
    fs, path = filesystem(url)
    container, blob, _ = fs.split_path(path)
    return fs, container, blob


# The SDK's own retry policy waits 15 s, then 45 s; pointer calls turn it off and use ours, which
# also lets write_pointer tell a lost race from its own retried write (see write_pointer).
_AZ_NO_SDK_RETRY = {"retry_total": 0}


def _az_read_pointer(url: str) -> tuple[bytes, str]:
    from azure.core.exceptions import ResourceNotFoundError
    from fsspec.asyn import sync

    fs, container, blob = _az_object(url)

    async def get() -> tuple[bytes, str]:
        async with fs.service_client.get_blob_client(container, blob) as bc:
            stream = await bc.download_blob(**_AZ_NO_SDK_RETRY)
            return await stream.readall(), str(stream.properties.etag)

    try:
        return sync(fs.loop, get)
    except ResourceNotFoundError:
        raise FileNotFoundError(url) from None


def _az_write_pointer(url: str, data: bytes, expect: str | None) -> str:
    from azure.core import MatchConditions
    from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
    from fsspec.asyn import sync

    fs, container, blob = _az_object(url)
    # overwrite=False sends If-None-Match: *; the etag + IfNotModified pair sends If-Match: <etag>.
    cond: dict[str, Any] = ({"overwrite": False} if expect is None else
                            {"overwrite": True, "etag": expect, "match_condition": MatchConditions.IfNotModified})

    async def put() -> str:
        async with fs.service_client.get_blob_client(container, blob) as bc:
            resp = await bc.upload_blob(data, **cond, **_AZ_NO_SDK_RETRY)
            return str(resp["etag"])

    try:
        return sync(fs.loop, put)
    except (ResourceExistsError, ResourceModifiedError) as exc:  # 409 BlobAlreadyExists / 412 ConditionNotMet
        if http_status(exc)[0] not in (409, 412):
            raise
        raise _lost(url, expect) from None
    except ResourceNotFoundError as exc:
        if expect is None or http_status(exc)[1] == "ContainerNotFound":
            raise FileNotFoundError(url) from None
        raise _lost(url, expect, "(it was deleted)") from None
