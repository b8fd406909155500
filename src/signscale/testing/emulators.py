"""Real local stand-ins for the three object stores, for tests, benchmarks and demos.

===========  =======================================  ==========================================
kind         server                                   how clients find it (standard variables)
===========  =======================================  ==========================================
``s3``       moto's server (:mod:`signscale.testing.s3local`)   ``AWS_ENDPOINT_URL``
``gcs``      ``gcp-storage-emulator`` (PyPI)           ``STORAGE_EMULATOR_HOST``
``azure``    Azurite (npm, run with Node.js)           ``AZURE_STORAGE_CONNECTION_STRING``
===========  =======================================  ==========================================

Each server runs in its own process, binds 127.0.0.1 port 0 and reports the port it got, so
nothing guesses ports or polls; each dies with its parent (stdin EOF for the Python servers,
``PR_SET_PDEATHSIG`` for Node). :func:`running` starts one and points this process at it::

    with emulators.running("gcs") as emu:
        root = emu.make_bucket("data")          # "gs://data"
        pack(PackConfig(source=..., out=root + "/gtsrb"))

:class:`Proxy` is a real HTTP proxy that can be put in front of any of them to record requests
and inject failures (the storage contract tests use it for retries and GCS preconditions).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from signscale.testing import s3local

KINDS = ("s3", "gcs", "azure")
SCHEMES = {"s3": "s3", "gcs": "gs", "azure": "az"}

# Azurite's documented development account (public, fixed in Azurite; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_VERSION = "3"  # npm range installed by ensure_azurite()

# The variables each kind sets; saved and restored by running().
_ENV_KEYS = {
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"),
    "gcs": ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "FSSPEC_GS_TOKEN", "FSSPEC_GCS_TOKEN"),
    "azure": ("AZURE_STORAGE_CONNECTION_STRING",),
}


class EmulatorUnavailable(RuntimeError):
    """The emulator (or what it runs on) is not installed here; the message says how to get it."""


@dataclass
class Emulator:
    """A running emulator: its kind, its endpoint (``http://127.0.0.1:PORT``) and its process."""

    kind: str
    endpoint: str
    process: subprocess.Popen
    _s3: Any = field(default=None, repr=False)

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """Client variables for this emulator (or for a proxy at ``endpoint`` in front of it)."""
        ep = endpoint or self.endpoint
        if self.kind == "s3":
            return {**s3local.CLIENT_ENV, "AWS_ENDPOINT_URL": ep}
        if self.kind == "gcs":
            # The plain HTTP client: gcsfs's experimental client probes every bucket's layout over
            # gRPC, which an emulator cannot answer (a 60 s timeout per call). No credentials: anon.
            return {"STORAGE_EMULATOR_HOST": ep, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                    "FSSPEC_GS_TOKEN": "anon", "FSSPEC_GCS_TOKEN": "anon"}
        return {"AZURE_STORAGE_CONNECTION_STRING": azurite_connection_string(ep)}

    def url(self, bucket: str) -> str:
        return f"{SCHEMES[self.kind]}://{bucket}"

    def make_bucket(self, name: str) -> str:
        """Create a bucket (S3, GCS) or container (Azure) and return its URL, e.g. ``gs://name``."""
        if self.kind == "s3":
            return self._s3.make_bucket(name)
        if self.kind == "gcs":
            req = urllib.request.Request(f"{self.endpoint}/storage/v1/b?project=signscale-test",
                                         data=json.dumps({"name": name}).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                r.read()
            return self.url(name)
        from azure.storage.blob import BlobServiceClient

        with BlobServiceClient.from_connection_string(azurite_connection_string(self.endpoint)) as svc:
            svc.create_container(name)
        return self.url(name)

    def stop(self) -> None:
        if self.process.stdin:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def azurite_connection_string(endpoint: str) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={endpoint.rstrip('/')}/{AZURITE_ACCOUNT};")


# ---------------------------------------------------------------------------------------------
# Starting


def start(kind: str, *, azurite_dir: str | None = None) -> Emulator:
    """Start one emulator process and return once it listens (raises EmulatorUnavailable if it can't)."""
    if kind == "s3":
        try:
            server = s3local.start()
        except RuntimeError as exc:
            raise EmulatorUnavailable(str(exc)) from None
        return from_s3local(server)
    if kind == "gcs":
        return _start_gcs()
    if kind == "azure":
        return _start_azurite(azurite_dir)
    raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")


def from_s3local(server: Any) -> Emulator:
    """Wrap an already running :class:`signscale.testing.s3local.LocalS3` (e.g. the tests' session server)."""
    return Emulator("s3", server.endpoint, server.process, _s3=server)


def _start_gcs() -> Emulator:
    try:
        import gcp_storage_emulator  # noqa: F401
    except ImportError:
        raise EmulatorUnavailable("the GCS emulator needs gcp-storage-emulator: "
                                  "pip install gcp-storage-emulator (in the 'test' extra)") from None
    # stdin stays open while we live: the server exits at EOF, so it cannot outlive a crashed parent
    proc = subprocess.Popen([sys.executable, "-m", "signscale.testing.emulators", "gcs"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # blocks until the server has bound its port
    if not line.startswith("http://"):
        proc.kill()
        raise EmulatorUnavailable(f"the GCS emulator failed to start (said {line!r})")
    return Emulator("gcs", line, proc)


def default_azurite_dir() -> str:
    """Where Azurite is (or gets) installed: $SIGNSCALE_AZURITE_DIR, else ~/.cache/signscale/azurite."""
    return os.environ.get("SIGNSCALE_AZURITE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "signscale", "azurite")


def _azurite_main(root: str) -> str:
    return os.path.join(root, "node_modules", "azurite", "dist", "src", "blob", "main.js")


def ensure_azurite(root: str | None = None, *, install: bool = True) -> list[str]:
    """The command that runs Azurite's blob service; installs it with npm into ``root`` if allowed.

    Needs Node.js (>= 18) on PATH. Raises EmulatorUnavailable naming what is missing.
    """
    root = root or default_azurite_dir()
    node = shutil.which("node")
    if node is None:
        raise EmulatorUnavailable("Azurite needs Node.js (node) on PATH; install Node.js >= 18")
    main = _azurite_main(root)
    if not os.path.exists(main) and install:
        npm = shutil.which("npm")
        if npm is None:
            raise EmulatorUnavailable(f"Azurite is not installed in {root} and npm is not on PATH; "
                                      f"run: npm install --prefix {root} azurite@{AZURITE_VERSION}")
        os.makedirs(root, exist_ok=True)
        try:
            subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", root,
                            f"azurite@{AZURITE_VERSION}"], check=True, capture_output=True, timeout=300)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise EmulatorUnavailable(f"could not install Azurite with npm into {root} ({type(exc).__name__}); "
                                      f"run: npm install --prefix {root} azurite@{AZURITE_VERSION}") from None
    if not os.path.exists(main):
        raise EmulatorUnavailable(f"Azurite is not installed in {root}; "
                                  f"run: npm install --prefix {root} azurite@{AZURITE_VERSION}")
    return [node, main]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: deliver SIGTERM to this child when the process that started it dies."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def _start_azurite(root: str | None) -> Emulator:
    cmd = ensure_azurite(root)
    proc = subprocess.Popen([*cmd, "--blobHost", "127.0.0.1", "--blobPort", "0", "--inMemoryPersistence",
                             "--extentMemoryLimit", "1024", "--skipApiVersionCheck", "--loose",
                             "--disableTelemetry"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            # prctl must run in the child before exec; we start no threads around it
                            text=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None)  # noqa: PLW1509
    assert proc.stdout is not None
    said = []
    for line in proc.stdout:  # "Azurite Blob service successfully listens on http://127.0.0.1:PORT"
        said.append(line.strip())
        if "listens on http://" in line:
            endpoint = line.strip().rsplit(" ", 1)[-1]
            # keep draining its output so a chatty server never blocks on a full pipe
            threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
            return Emulator("azure", endpoint, proc)
        if len(said) > 50:
            break
    proc.kill()
    raise EmulatorUnavailable(f"Azurite failed to start: {' | '.join(said[-5:])}")


def _drain(stream: Any) -> None:
    with contextlib.suppress(Exception):
        for _ in stream:
            pass


# ---------------------------------------------------------------------------------------------
# Pointing this process at one


def use(emu: Emulator, endpoint: str | None = None) -> None:
    """Point this process (and its children) at ``emu``, or at a proxy at ``endpoint`` in front of it."""
    os.environ.update(emu.env(endpoint))
    if emu.kind == "gcs":
        import fsspec

        for proto in ("gs", "gcs"):  # fsspec read FSSPEC_* variables at import: set its config too
            fsspec.config.conf.setdefault(proto, {})["token"] = "anon"
        _use_plain_gcsfs()
    clear_clients()


def _use_plain_gcsfs() -> None:
    """gcsfs picks its client class when first imported; if that was the gRPC-probing one, register
    the plain HTTP class for gs:// so emulators (and proxies) work without a restart."""
    with contextlib.suppress(ImportError):
        import fsspec
        import gcsfs.core

        for proto in ("gs", "gcs"):
            fsspec.register_implementation(proto, gcsfs.core.GCSFileSystem, clobber=True)


def clear_clients() -> None:
    """Drop cached filesystem instances: they hold clients bound to the previous endpoint."""
    for mod, cls in (("s3fs", "S3FileSystem"), ("gcsfs.core", "GCSFileSystem"), ("gcsfs", "GCSFileSystem"),
                     ("adlfs", "AzureBlobFileSystem")):
        with contextlib.suppress(ImportError, AttributeError):
            getattr(__import__(mod, fromlist=[cls]), cls).clear_instance_cache()


@contextlib.contextmanager
def running(kind: str, *, azurite_dir: str | None = None) -> Iterator[Emulator]:
    """Start an emulator, point this process at it, and on exit stop it and put the environment back."""
    import copy

    import fsspec

    saved_conf = copy.deepcopy(fsspec.config.conf)
    with s3local.restored_env(_ENV_KEYS.get(kind, ())):
        emu = start(kind, azurite_dir=azurite_dir)
        try:
            use(emu)
            yield emu
        finally:
            emu.stop()
            fsspec.config.conf.clear()
            fsspec.config.conf.update(saved_conf)
            clear_clients()


# ---------------------------------------------------------------------------------------------
# A recording, fault-injecting HTTP proxy


@dataclass(frozen=True)
class Seen:
    method: str
    path: str  # path and query string, as sent
    status: int  # what the client got back


class Proxy:
    """A real HTTP proxy on 127.0.0.1 (port 0) in front of ``upstream``.

    It records every request (:attr:`seen`) and answers the next ``n`` matching requests itself
    with an error (:meth:`fail_next`), so retry behaviour is tested against real sockets and the
    real SDKs rather than against mocks.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.replace("http://", "").rstrip("/")
        self.seen: list[Seen] = []
        self._faults: list[tuple[int, str, bytes, str]] = []  # (status, path substring, body, type)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail_next(self, n: int, status: int = 503, *, match: str = "", body: bytes = b"",
                  content_type: str = "application/xml") -> None:
        """Answer the next ``n`` requests whose path contains ``match`` with ``status``."""
        with self._lock:
            self._faults.extend([(status, match, body, content_type)] * n)

    def requests(self, match: str = "") -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if match in s.path]

    def _take_fault(self, path: str) -> tuple[int, str, bytes, str] | None:
        with self._lock:
            for i, f in enumerate(self._faults):
                if f[1] in path:
                    return self._faults.pop(i)
        return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.seen.append(Seen(method, path, status))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return type("Handler", (_ProxyHandler,), {"proxy": self})


_HOP_HEADERS = ("transfer-encoding", "connection", "content-length")


class _ProxyHandler(BaseHTTPRequestHandler):
    """One request through the proxy: answered by an injected fault, or forwarded and recorded."""

    protocol_version = "HTTP/1.1"
    proxy: Proxy

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _any(self) -> None:
        body = self._body()
        fault = self.proxy._take_fault(self.path)
        if fault is not None:
            self._answer_fault(fault)
        else:
            self._forward(body)

    def _answer_fault(self, fault: tuple[Any, ...]) -> None:
        status, _, fbody, ctype = fault
        # recorded before answering: once the client has its response, the record exists
        self.proxy._record(self.command, self.path, status)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(fbody)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(fbody)

    def _forward(self, body: bytes) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        if body or self.command in ("PUT", "POST", "PATCH"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(self.proxy.upstream, timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.proxy._record(self.command, self.path, resp.status)
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP_HEADERS:
                    self.send_header(k, v)
            length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD" and data:
                self.wfile.write(data)
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _any


@contextlib.contextmanager
def through_proxy(emu: Emulator) -> Iterator[Proxy]:
    """Point this process at a :class:`Proxy` in front of ``emu`` (to count requests or inject
    errors), and back at ``emu`` on exit. Worker processes forked inside see the proxy too."""
    with Proxy(emu.endpoint) as proxy:
        use(emu, proxy.endpoint)
        try:
            yield proxy
        finally:
            use(emu)


# ---------------------------------------------------------------------------------------------
# Child process entry point


def _serve_gcs() -> None:  # pragma: no cover - runs in the child process
    import logging

    logging.disable(logging.CRITICAL)
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    host, port = server._api._httpd.server_address[:2]  # the port the OS gave us
    print(f"http://{host}:{port}", flush=True)
    sys.stdin.read()  # returns at EOF: the parent closed the pipe or died
    os._exit(0)


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:] == ["gcs"]:
        _serve_gcs()
    else:
        sys.exit("usage: python -m signscale.testing.emulators gcs")
