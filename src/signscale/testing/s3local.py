"""A real S3-protocol server on 127.0.0.1 (moto's server mode) for tests, benchmarks and demos.

It runs in its own process, binds port 0 and reports the port it got on its first line of
output, so callers never guess ports or poll. Clients reach it through the standard
``AWS_ENDPOINT_URL`` variable, exactly as they would reach MinIO or a real endpoint.
Needs the ``test`` extra (moto[server], s3fs).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

CLIENT_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class LocalS3:
    endpoint: str
    process: subprocess.Popen

    def env(self) -> dict[str, str]:
        return {**CLIENT_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def make_bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, **_creds()).create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _creds() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


def start() -> LocalS3:
    """Start the server process and return once it listens."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        raise RuntimeError("the local S3 server needs moto[server]: pip install 'signscale[test]'") from None
    # stdin stays open while we live: the server exits at EOF, so it cannot outlive a crashed parent
    proc = subprocess.Popen([sys.executable, "-m", "signscale.testing.s3local"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # blocks until the server has bound its port
    if not line.startswith("http://"):
        proc.kill()
        raise RuntimeError(f"local S3 server failed to start (said {line!r})")
    return LocalS3(endpoint=line, process=proc)


def use(server: LocalS3) -> None:
    """Point this process (and its children) at ``server``; fsspec/s3fs pick it up from the env."""
    os.environ.update(server.env())
    import fsspec

    fsspec.config.conf.setdefault("s3", {})
    _clear_clients()  # s3fs caches clients per process: make sure new ones see the endpoint


@contextlib.contextmanager
def restored_env(keys: Iterable[str]) -> Iterator[None]:
    """On exit, put these environment variables back as they were (set, changed or absent)."""
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def running() -> Iterator[LocalS3]:
    """Start a server, point this process at it, and on exit stop it and put the environment back."""
    with restored_env((*CLIENT_ENV, "AWS_ENDPOINT_URL")):
        server = start()
        try:
            use(server)
            yield server
        finally:
            server.stop()
            _clear_clients()


def _clear_clients() -> None:
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # cached clients still point at the old endpoint
    except ImportError:
        pass


def serve() -> None:  # pragma: no cover - runs in the child process
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    print(f"http://{host}:{port}", flush=True)
    sys.stdin.read()  # returns at EOF: the parent closed the pipe or died
    os._exit(0)


if __name__ == "__main__":  # pragma: no cover
    serve()
