"""Shared fixtures: the real S3-protocol server, the GCS and Azure emulators, the team's real data, tiny
packed datasets."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GTSRB_ZIP = SHARED_DATA / "GTSRB_Final_Training_Images.zip"
TSRD_ZIP = SHARED_DATA / "TSRD23_crops_64px.zip"


def require(path: Path) -> Path:
    """Skip the test, saying what is missing, when the team's real data is not beside the repo."""
    if not path.exists():
        pytest.skip(f"real data not found at {path} (it lives in ../shared/data beside the repository)")
    return path


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server in its own process on 127.0.0.1 (port 0, read back), reached over HTTP by s3fs."""
    pytest.importorskip("moto.server", reason="needs moto[server] (pip install 'signscale[test]')")
    pytest.importorskip("s3fs", reason="needs s3fs (pip install 'signscale[test]')")
    from signscale.testing import s3local

    with s3local.running() as server:
        yield server


def _emulator(kind: str, module: str):
    """Start the ``kind`` emulator and point this process at it for the module; skip, saying why, when
    its client library or the emulator itself is not there."""
    pytest.importorskip(module, reason=f"needs {module} (pip install 'signscale[{kind}]')")
    from signscale.testing import emulators

    cm = emulators.running(kind)
    try:
        emu = cm.__enter__()
    except emulators.EmulatorUnavailable as exc:
        pytest.skip(f"{kind} emulator unavailable: {exc}")
    yield emu
    cm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def gcs_emulator():
    yield from _emulator("gcs", "gcsfs")


@pytest.fixture(scope="module")
def azure_emulator():
    yield from _emulator("azure", "adlfs")


_bucket_ids = itertools.count()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket per test: ``s3://signscale-test-N``."""
    return s3_server.make_bucket(f"signscale-test-{os.getpid()}-{next(_bucket_ids)}")


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> str:
    """300 synthetic signs packed into several small raw shards (shared, read-only)."""
    from signscale.data.pack import PackConfig, pack

    out = str(tmp_path_factory.mktemp("ds") / "synthetic")
    pack(PackConfig(source="synthetic:?n=300&size=16&seed=1", out=out, image_size=16, shard_mb=0.2, workers=0,
                    progress=False))
    return out


@pytest.fixture(scope="session")
def base_dataset(tmp_path_factory) -> str:
    """A small packed dataset (120 synthetic 16 px samples) that ingest tests copy and grow."""
    from signscale.data.pack import PackConfig, pack

    out = str(tmp_path_factory.mktemp("base") / "ds")
    pack(PackConfig(source="synthetic:?n=120&size=16&seed=5&weather=0", out=out, image_size=16, shard_mb=0.02,
                    workers=0, progress=False))
    return out
