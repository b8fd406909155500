"""The only module that talks to fsspec: local paths and object stores behind one small API.

Guarantees the rest of the package relies on:

* **Atomic publish.** :func:`write_bytes` and :func:`atomic_write` never leave a partial object
  under the final name: locally they write ``.NAME.tmp-<random>`` beside it and ``os.replace`` it;
  on object stores an object only becomes visible when its upload completes, so the final key is
  written once, whole.
* **Checksums.** Writes return the sha256 of what was written; :func:`sha256_of` streams a file.
* **Retries.** Reads and writes retry with exponential backoff on errors that are transient by
  nature (connection resets, timeouts, throttling, 5xx); a missing file or a denied permission is
  raised at once.

Credentials and endpoints come from each SDK's standard chain (environment variables such as
``AWS_ENDPOINT_URL``, profiles, application-default credentials); nothing here reads or logs them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import time
import uuid
from typing import IO, Any, Callable, Iterator, TypeVar

import fsspec

T = TypeVar("T")

# protocol -> (extra that provides it, module that must import)
_EXTRAS = {"s3": ("s3", "s3fs"), "s3a": ("s3", "s3fs"), "gs": ("gcs", "gcsfs"), "gcs": ("gcs", "gcsfs"),
           "az": ("azure", "adlfs"), "abfs": ("azure", "adlfs"), "abfss": ("azure", "adlfs")}

RETRIES = 5
BACKOFF_S = 0.2


class StorageError(OSError):
    """A storage operation failed for good; the message names the URL."""


def protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def is_local(url: str) -> bool:
    return protocol(url) in ("file", "local")


def local_path(url: str) -> str | None:
    """The filesystem path of a local URL, else None (callers use it for memmap and os.replace)."""
    if not is_local(url):
        return None
    return url[len("file://"):] if url.startswith("file://") else url


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
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    markers = ("timeout", "timed out", "connection", "throttl", "slowdown", "slow down", "503", "500",
               "502", "504", "internalerror", "serviceunavailable", "temporarily", "reset by peer")
    return any(m in text for m in markers)


def retry(fn: Callable[[], T], *, what: str, attempts: int = RETRIES) -> T:
    """Call ``fn`` and retry transient failures with jittered exponential backoff."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not _is_transient(exc) or attempt == attempts - 1:
                raise
            time.sleep(BACKOFF_S * (2 ** attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return retry(lambda: fs.exists(path), what=url)


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
        tmp = os.path.join(d, f".{os.path.basename(lp)}.tmp-{uuid.uuid4().hex[:8]}")
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
    _invalidate(fs, path)


def _invalidate(fs: Any, path: str) -> None:
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
