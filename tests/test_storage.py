import importlib.util

import pytest

from signscale import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_write_read_range_list_delete(root):
    url = storage.join(root, "a", "blob.bin")
    data = bytes(range(256)) * 40
    sha = storage.write_bytes(url, data)
    assert storage.exists(url)
    assert storage.size(url) == len(data)
    assert storage.read_bytes(url) == data
    assert storage.read_bytes(url, 100, 356) == data[100:356]
    assert storage.sha256_of(url) == sha
    assert storage.listdir(storage.join(root, "a")) == [url]
    storage.delete(url)
    assert not storage.exists(url)


def test_atomic_write_leaves_nothing_on_failure(root):
    url = storage.join(root, "x", "model.bin")
    storage.write_bytes(url, b"good")
    with pytest.raises(RuntimeError):
        with storage.atomic_write(url) as (w, _):
            w.write(b"half a new model")
            raise RuntimeError("crash mid-write")
    assert storage.read_bytes(url) == b"good"  # the old file is intact, no partial replacement
    leftovers = [u for u in storage.listdir(storage.join(root, "x")) if u != url]
    assert leftovers == []


def test_retry_on_transient_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset by peer")
        return "ok"

    assert storage.retry(flaky, what="x") == "ok" and len(calls) == 3

    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    with pytest.raises(FileNotFoundError):
        storage.retry(missing, what="x")
    assert len(calls) == 1  # a missing file is not retried


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_missing_extra_is_named():
    with pytest.raises(storage.StorageError, match=r"signscale\[gcs\]"):
        storage.exists("gs://bucket/x")


def test_json_roundtrip_and_corrupt_json(tmp_path):
    url = str(tmp_path / "m.json")
    storage.write_json(url, {"a": [1, 2]})
    assert storage.read_json(url) == {"a": [1, 2]}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(storage.StorageError, match="bad.json"):
        storage.read_json(str(tmp_path / "bad.json"))
