"""The only module that talks to fsspec: local paths and object stores behind one small API.

Guarantees the rest of the package relies on:

* **Atomic publish.** :func:`write_bytes` and :func:`atomic_write` never leave a partial object
  under the final name: locally they write ``.NAME.tmp-<random>`` beside it and ``os.replace`` it;
  on object stores an object only becomes visible when its upload completes, so the final key is
  written once, whole.
* **Checksums.** Writes return the sha256 of what was written; :func:`sha256_of` streams a file.
* **Conditional writes.** :func:`read_pointer` / :func:`write_pointer` replace a small object only
  if it is unchanged (or create it only if absent), using each store's own primitive (S3 and Azure
  ETag If-Match / If-None-Match, GCS generation preconditions, a lock file locally); a lost race
  raises :class:`PreconditionFailed`, never overwrites.
* **Retries.** Reads and writes retry with exponential backoff on the errors each store documents
  as transient (:func:`is_transient`: 5xx, throttling, timeouts, connection failures); a missing
  file, a denied permission or a failed precondition is raised at once.

Credentials and endpoints come from each SDK's standard chain (environment variables such as
``AWS_ENDPOINT_URL``, profiles, application-default credentials, connection strings); nothing here
reads or logs them. docs/storage.md has the details per store.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import random
import re
import time
import uuid
from typing import IO, Any, Callable, Iterator, TypeVar

import fsspec

T = TypeVar("T")

# gcsfs logs each request that runs out of retries, with its traceback; without a handler of the
# caller's, Python's last-resort handler would print it above the one-line explanation we give.
logging.getLogger("gcsfs").addHandler(logging.NullHandler())

# protocol -> (extra that provides it, module that must import)
_EXTRAS = {"s3": ("s3", "s3fs"), "s3a": ("s3", "s3fs"), "gs": ("gcs", "gcsfs"), "gcs": ("gcs", "gcsfs"),
           "az": ("azure", "adlfs"), "abfs": ("azure", "adlfs"), "abfss": ("azure", "adlfs")}

RETRIES = 5
BACKOFF_S = 0.2


class StorageError(OSError):
    """A storage operation failed for good; the message names the URL."""


class PreconditionFailed(StorageError):
    """A conditional write lost a race (the object changed or already exists)."""


# Failures a person fixes, not a retry: each message names the URL, the cause and the fix (which
# variable, which extra); never retried (is_transient). A refusal stays a PermissionError for the
# callers that catch one; a missing bucket is deliberately not a FileNotFoundError: callers read
# that as "no such object" ("no manifest: is this a dataset?"), which sends the user the wrong way.
class NoCredentials(StorageError):
    """The SDK found no credentials in its standard chain."""


class Unreachable(StorageError):
    """The endpoint never answered (refused, no route, DNS, connect timeout): wrong URL or no network."""


class NoSuchBucket(StorageError):
    """The bucket or container does not exist at the endpoint in use."""


class AccessDenied(StorageError, PermissionError):
    """The store answered 401/403: the credentials in use may not do this."""


def protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def is_local(url: str) -> bool:
    return protocol(url) in ("file", "local")


def local_path(url: str) -> str | None:
    """The filesystem path of a local URL, else None (callers use it for memmap and os.replace)."""
    if not is_local(url):
        return None
    return url[len("file://"):] if url.startswith("file://") else url


# An endpoint that does not answer must fail in seconds, not minutes: botocore's defaults (60 s
# connect timeout, s3fs lowers it to 5 s; "legacy" retries: 5 attempts with up to 8 s sleeps),
# multiplied by our own retries, kept a mistyped AWS_ENDPOINT_URL silent for ~50 s. A connect
# timeout of 3 s and botocore's "standard" mode (3 attempts, what AWS recommends) bound a
# refused or black-holed endpoint to ~10 s; errors of a reachable store still get our RETRIES.
CONNECT_TIMEOUT_S = 3.0
_S3_CONFIG = {"connect_timeout": CONNECT_TIMEOUT_S, "retries": {"max_attempts": 3, "mode": "standard"}}


def _options(proto: str) -> dict[str, Any]:
    """Storage options for a new filesystem: the bounds above, under whatever fsspec's config sets."""
    if proto not in ("s3", "s3a"):
        return {}
    conf = dict(fsspec.config.conf.get("s3", {}))
    # a fresh copy per filesystem: botocore rewrites the "retries" dict it is given in place
    # (max_attempts -> total_max_attempts), which would leak into every later filesystem
    config_kwargs = {**copy.deepcopy(_S3_CONFIG), **conf.get("config_kwargs", {})}
    return {"config_kwargs": config_kwargs}


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it); a missing optional back-end names the extra to install."""
    proto = protocol(url)
    if proto in _EXTRAS:
        extra, module = _EXTRAS[proto]
        try:
            __import__(module)
        except ImportError:
            raise StorageError(f"{url}: the {proto}:// back-end needs the '{extra}' extra: "
                               f"pip install 'signscale[{extra}]'") from None
    try:
        fs, path = fsspec.core.url_to_fs(url, **_options(proto))
    except Exception as exc:  # e.g. Azure without an account: explained, else re-raised as it was
        raise (explain(exc, url) or exc) from exc
    return fs, path


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


# Transient by each provider's documentation, and nothing else:
#  S3   https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html : 500 InternalError,
#       503 SlowDown / ServiceUnavailable, 400 RequestTimeout, throttling codes, and 409
#       ConditionalRequestConflict ("retry the request") on conditional writes.
#  GCS  https://cloud.google.com/storage/docs/retry-strategy : 408, 429, 500, 502, 503, 504.
#  Azure https://learn.microsoft.com/rest/api/storageservices/blob-service-error-codes : 500
#       InternalError / OperationTimedOut, 503 ServerBusy, 408, 429, 502, 504.
# Plus connection-level failures (reset, refused, timed out) on every store. A 4xx that is not
# listed (400 bad request, 401/403 denied, 404 missing, 409 conflict, 412 precondition) is final.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset({"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout",
                              "Throttling", "ThrottlingException", "RequestLimitExceeded",
                              "ConditionalRequestConflict", "ServerBusy", "OperationTimedOut"})
# Connection-level exception classes of the SDKs, matched by name so none has to be imported.
_TRANSIENT_CLASSES = frozenset({"ClientConnectionError", "ServerDisconnectedError", "ClientPayloadError",
                                "ClientOSError", "HTTPClientError", "EndpointConnectionError",
                                "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                                "ServiceRequestError", "ServiceResponseError", "FSTimeoutError",
                                "IncompleteRead", "ChunkedEncodingError", "ProxyError"})
_FINAL = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what it was raised from (fsspec back-ends wrap SDK errors in OSError)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def http_status(exc: BaseException) -> tuple[int | None, str]:
    """(HTTP status, provider error code) carried by an SDK error or its causes; (None, "") if none.

    botocore's ClientError keeps them in ``response``, azure-core's HttpResponseError in
    ``status_code``/``error_code``, gcsfs's HttpError in ``code``.
    """
    for e in _causes(exc):
        resp = getattr(e, "response", None)
        if isinstance(resp, dict) and isinstance(resp.get("Error"), dict):
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return (int(status) if status else None), str(resp["Error"].get("Code", ""))
        status = getattr(e, "status_code", None)
        if isinstance(status, int):
            return status, str(getattr(e, "error_code", "") or "")
        code = getattr(e, "code", None)
        if type(e).__name__ == "HttpError" and isinstance(code, int):
            return code, ""
    return None, ""


def is_transient(exc: BaseException) -> bool:
    """True for the errors the stores document as transient (see above); False for everything else."""
    if isinstance(exc, (_FINAL, PreconditionFailed, NoCredentials, Unreachable)):
        return False
    status, code = http_status(exc)
    if status is not None or code:
        return status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES
    for e in _causes(exc):
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if any(k.__name__ in _TRANSIENT_CLASSES for k in type(e).__mro__):
            return True
    return False


_is_transient = is_transient  # the name older callers used


def retry(fn: Callable[[], T], *, what: str, attempts: int = RETRIES) -> T:
    """Call ``fn`` and retry transient failures (:func:`is_transient`) with jittered exponential backoff.

    Only the exception's type is ever looked at: messages can hold signed URLs, so nothing is logged.
    An endpoint that never answered is not retried here (the SDK below already tried it a bounded
    number of times); a failure a person must fix is raised as one of the explained errors above.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_transient(exc) or attempt == attempts - 1 or _never_connected(exc):
                explained = explain(exc, what)
                if explained is None:
                    raise
                raise explained from exc
            time.sleep(BACKOFF_S * (2 ** attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


# -- Explaining failures a person must fix (the SDKs' own messages name neither the URL nor the fix)

_CONNECT_FAILURES = frozenset({"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                               "ClientConnectorDNSError", "ServiceRequestError", "ConnectionRefusedError",
                               "gaierror"})
_NO_CREDENTIALS = frozenset({"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError",
                             "CredentialRetrievalError", "ClientAuthenticationError"})
# (variables that supply credentials, variable that points at another endpoint, extra) per store
_FIX = {"s3": ("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)", "AWS_ENDPOINT_URL", "s3"),
        "gs": ("GOOGLE_APPLICATION_CREDENTIALS (or run `gcloud auth application-default login`)",
               "STORAGE_EMULATOR_HOST", "gcs"),
        "az": ("AZURE_STORAGE_CONNECTION_STRING (or AZURE_STORAGE_ACCOUNT_NAME with a key or a login)",
               "AZURE_STORAGE_CONNECTION_STRING", "azure")}


def _store(url: str) -> str:
    proto = protocol(url)
    return {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az"}.get(proto, proto)


def _never_connected(exc: BaseException) -> bool:
    return any(k.__name__ in _CONNECT_FAILURES for e in _causes(exc) for k in type(e).__mro__)


def _endpoint(exc: BaseException, store: str) -> str:
    """scheme://host:port of the endpoint an SDK error names (never its path or query: they may be signed),
    else host:port as aiohttp names it, else the endpoint the environment sets for ``store``."""
    from urllib.parse import urlsplit

    for e in _causes(exc):
        kw = getattr(e, "kwargs", None)
        cand = kw.get("endpoint_url") if isinstance(kw, dict) else None
        m = re.search(r"https?://[^\s\"'/]+", str(cand or e))
        if m:
            parts = urlsplit(m.group(0))
            return f"{parts.scheme}://{parts.netloc}"
        m = re.search(r"connect to host ([\w.\-\[\]:]+:\d+)", str(e))
        if m:
            return m.group(1)
    return _configured_endpoint(store)


def _configured_endpoint(store: str) -> str:
    """The endpoint the environment points ``store`` at (an emulator, a proxy), without credentials."""
    if store == "az":
        m = re.search(r"(?i)BlobEndpoint=([^;]+)", os.environ.get("AZURE_STORAGE_CONNECTION_STRING", ""))
        value = m.group(1) if m else ""
    else:
        value = os.environ.get({"s3": "AWS_ENDPOINT_URL", "gs": "STORAGE_EMULATOR_HOST"}.get(store, ""), "")
    return re.sub(r"//[^/@]*@", "//", value).rstrip("/")  # never a user:password@ it may carry


def explain(exc: BaseException, url: str) -> StorageError | None:
    """The failure as one of the explained errors above, or None when it is none of them.

    The text names the URL, the cause and the fix, in one or two lines; the SDK's own exception
    stays attached as ``__cause__`` (``signscale --debug`` prints it).
    """
    if isinstance(exc, StorageError) or is_local(url):
        return None
    store = _store(url)
    creds, endpoint_var, _extra = _FIX.get(store, ("the store's credentials", "the endpoint setting", store))
    names = {k.__name__ for e in _causes(exc) for k in type(e).__mro__}
    if names & _NO_CREDENTIALS:
        return NoCredentials(f"{url}: no credentials found for {store}://. Set {creds}"
                             + (f"; for a local or S3-compatible store also {endpoint_var}." if store == "s3" else "."))
    if _never_connected(exc):
        where = _endpoint(exc, store)
        cause = type(next(e for e in _causes(exc)
                          if any(k.__name__ in _CONNECT_FAILURES for k in type(e).__mro__))).__name__
        return Unreachable(f"{url}: cannot reach the endpoint{' ' + where if where else ''} ({cause}, "
                           f"connect timeout {CONNECT_TIMEOUT_S:g}s). Check {endpoint_var} and the network "
                           "(unset it to use the provider's public endpoint).")
    status, code = http_status(exc)
    bucketish = _BUCKETISH.get(store, "bucket")
    if code in ("NoSuchBucket", "ContainerNotFound") or (
            isinstance(exc, FileNotFoundError) and re.search(r"(?i)no ?such ?bucket|bucket does not exist|"
                                                             r"container.*not.*exist", str(exc))):
        return _no_such_bucket(url, store)
    if status in (401, 403) or isinstance(exc, PermissionError) or code in (
            "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AuthorizationFailure",
            "AuthenticationFailed"):
        why = code or (str(status) if status else "access denied")
        return AccessDenied(f"{url}: access denied ({why}): the credentials in use may not do this. Check "
                            f"{creds} and the {bucketish}'s policy.")
    return None


_BUCKETISH = {"s3": "bucket", "gs": "bucket", "az": "container"}


def _no_such_bucket(url: str, store: str) -> NoSuchBucket:
    bucket = url.split("://", 1)[-1].split("/", 1)[0]
    endpoint_var = _FIX.get(store, ("", "the endpoint setting", ""))[1]
    return NoSuchBucket(f"{url}: no such {_BUCKETISH.get(store, 'bucket')} '{bucket}' at the endpoint in use. "
                        f"Create it, or check the name and {endpoint_var}.")


def exists(url: str) -> bool:
    """Whether an object or folder is there; a missing bucket or container is an error, not a "no"."""
    fs, path = filesystem(url)
    found = retry(lambda: fs.exists(path), what=url)
    if not found and _store(url) in _BUCKETISH:
        _check_bucket(fs, url, path)
    return found


_BUCKETS_SEEN: set[tuple[str, str]] = set()


def _check_bucket(fs: Any, url: str, path: str) -> None:
    """Raise NoSuchBucket when the bucket (or Azure container) of an absent key is itself absent (one
    request per bucket and process). Otherwise "no manifest: is this a dataset?" would answer a typo
    in the bucket name or an endpoint pointing elsewhere. Any other answer (403 without permission to
    see the bucket, say) leaves ``exists`` as it was."""
    store, bucket = _store(url), path.split("/", 1)[0]
    if not bucket or (store, bucket) in _BUCKETS_SEEN:
        return
    try:
        if store == "s3":
            retry(lambda: fs.call_s3("head_bucket", Bucket=bucket), what=url)
        else:
            retry(lambda: fs.info(bucket), what=url)
    except NoSuchBucket:
        raise
    except Exception as exc:
        if http_status(exc)[0] == 404 or (isinstance(exc, FileNotFoundError) and http_status(exc)[0] is None):
            raise _no_such_bucket(url, store) from exc
        return
    _BUCKETS_SEEN.add((store, bucket))


def size(url: str) -> int:
    fs, path = filesystem(url)
    return int(retry(lambda: fs.size(path), what=url))


def read_bytes(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """Whole object, or the byte range [start, end) with one ranged request."""
    fs, path = filesystem(url)
    if start is None and end is None:
        return retry(lambda: fs.cat_file(path), what=url)
    return retry(lambda: fs.cat_file(path, start=start, end=end), what=url)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str) -> Any:
    try:
        return json.loads(read_text(url))
    except json.JSONDecodeError as exc:
        raise StorageError(f"{url}: not valid JSON ({exc}); the file is corrupt or not what was expected") from None


def open_read(url: str) -> IO[bytes]:
    """A seekable binary file object (zip archives and large sources read through this)."""
    fs, path = filesystem(url)
    return retry(lambda: fs.open(path, "rb"), what=url)


def listdir(url: str) -> list[str]:
    """Full URLs of the entries directly under ``url`` (sorted)."""
    fs, path = filesystem(url)
    names = retry(lambda: fs.ls(path, detail=False), what=url)
    proto = protocol(url)
    prefix = "" if proto == "file" else f"{proto}://"
    return sorted(n if "://" in n or not prefix else prefix + n for n in names)


def glob(url: str) -> list[str]:
    fs, path = filesystem(url)
    proto = protocol(url)
    prefix = "" if proto == "file" else f"{proto}://"
    return sorted(prefix + p for p in retry(lambda: fs.glob(path), what=url))


def delete(url: str) -> None:
    fs, path = filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        retry(lambda: fs.rm(path), what=url)


def makedirs(url: str) -> None:
    p = local_path(url)
    if p is not None:
        os.makedirs(p, exist_ok=True)
    # object stores have no directories


class _HashingWriter(io.RawIOBase):
    """File wrapper that computes sha256 and size of everything written through it."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:  # type: ignore[override]
        mv = memoryview(b)
        self.sha.update(mv)
        self.nbytes += mv.nbytes
        self.inner.write(mv)
        return mv.nbytes


class WriteResult:
    def __init__(self) -> None:
        self.sha256 = ""
        self.nbytes = 0


# The temp files atomic_write leaves only when its process is killed: remove_temps matches this exact
# pattern, so nothing else is ever removed.
TEMP_NAME = re.compile(r"\.(?P<name>.+)\.tmp-[0-9a-f]{8}")


def temp_name(name: str) -> str:
    """The hidden temp name :func:`atomic_write` writes ``name`` under before renaming it."""
    return f".{name}.tmp-{uuid.uuid4().hex[:8]}"


def remove_temps(folder: str, *, stale: Callable[[str, str], bool] = lambda tmp, target: True,
                 recursive: bool = False) -> list[str]:
    """Remove the temp files killed :func:`atomic_write` calls left in a local ``folder``; returns their paths.

    ``stale(tmp_path, target_path)`` says whether a temp is safe to remove: the default (all) is for a
    folder whose only writer is the caller; a folder with other live writers passes :func:`older_than`
    or :func:`superseded`. Object stores have no temps (an object appears whole), so nothing is done there.
    """
    root = local_path(folder)
    if root is None or not os.path.isdir(root):
        return []
    walk = os.walk(root) if recursive else [(root, [], os.listdir(root))]
    removed = []
    for dirpath, _, files in walk:
        for f in files:
            m = TEMP_NAME.fullmatch(f)
            if not m:
                continue
            tmp = os.path.join(dirpath, f)
            with contextlib.suppress(FileNotFoundError):  # gone meanwhile, or (superseded) no target yet
                if os.path.isfile(tmp) and not os.path.islink(tmp) and stale(tmp, os.path.join(dirpath, m["name"])):
                    os.remove(tmp)
                    removed.append(tmp)
    return removed


def older_than(seconds: float) -> Callable[[str, str], bool]:
    """A :func:`remove_temps` rule: untouched for ``seconds`` (a fresh temp may be a live writer's)."""
    return lambda tmp, target: time.time() - os.stat(tmp).st_mtime > seconds


def superseded(tmp: str, target: str) -> bool:
    """A :func:`remove_temps` rule: the file the temp was to replace has been written since, so no live
    writer holds it (writers that share a file take its lock before creating their temp)."""
    return os.stat(target).st_mtime_ns > os.stat(tmp).st_mtime_ns


@contextlib.contextmanager
def atomic_write(url: str) -> Iterator[tuple[_HashingWriter, WriteResult]]:
    """Write a file that appears under ``url`` only if the block completes.

    Yields ``(writer, result)``; after the block ``result.sha256`` and ``result.nbytes`` are set.
    Local: temp file in the same directory, fsync, ``os.replace``. Object stores: the upload is
    buffered to a local temp file and put as one object at the end, so an exception or a killed
    process never leaves a partial object under the final key.
    """
    result = WriteResult()
    lp = local_path(url)
    if lp is not None:
        d = os.path.dirname(os.path.abspath(lp))
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, temp_name(os.path.basename(lp)))
        try:
            with open(tmp, "wb") as f:
                w = _HashingWriter(f)
                yield w, result
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, lp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        result.sha256, result.nbytes = w.sha.hexdigest(), w.nbytes
        return
    import tempfile

    fs, path = filesystem(url)
    with tempfile.TemporaryFile() as spool:
        w = _HashingWriter(spool)
        yield w, result
        spool.flush()

        def upload() -> None:
            spool.seek(0)
            with fs.open(path, "wb") as out:
                while chunk := spool.read(8 << 20):
                    out.write(chunk)

        retry(upload, what=url)
    result.sha256, result.nbytes = w.sha.hexdigest(), w.nbytes
    invalidate(fs, path)


def invalidate(fs: Any, path: str) -> None:
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)


def write_bytes(url: str, data: bytes | memoryview) -> str:
    """Atomically write ``data`` to ``url``; returns its sha256."""
    with atomic_write(url) as (w, result):
        w.write(data)
    return result.sha256


def write_json(url: str, obj: Any) -> str:
    return write_bytes(url, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8"))


def sha256_of(url: str, chunk: int = 8 << 20) -> str:
    """sha256 of a stored file, streamed in chunks."""
    lp = local_path(url)
    h = hashlib.sha256()
    if lp is not None:
        with open(lp, "rb") as f:
            while b := f.read(chunk):
                h.update(b)
        return h.hexdigest()
    with open_read(url) as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()




# -- Google Cloud Storage (gcsfs, JSON API)


# -- Azure Blob (adlfs / azure-storage-blob)


