import numpy as np
import pytest

from signscale import storage
from signscale.data import shards
from signscale.data.manifest import Manifest


def _records(n, size=8):
    dt = shards.record_dtype("raw", (size, size, 3))
    r = np.zeros(n, dtype=dt)
    r["image"] = np.arange(n * size * size * 3, dtype=np.uint64).reshape(n, size, size, 3) % 251
    r["id"] = np.arange(n) * 3
    r["label"] = np.arange(n) % 43
    r["track"] = [shards.track_hash(f"t{i}") for i in range(n)]
    return r


def test_raw_roundtrip_and_alignment(tmp_path):
    recs = _records(50)
    url = str(tmp_path / "s.sgs")
    storage.write_bytes(url, shards.encode_raw_shard(recs))
    r = shards.ShardReader(url)
    assert r.count == 50 and r.encoding == "raw"
    assert r.header["data_offset"] % shards.ALIGN == 0
    got = r.records(10, 20)
    assert np.array_equal(got["image"], recs["image"][10:20])
    assert np.array_equal(got["id"], recs["id"][10:20])


def test_encoded_roundtrip_with_extras(tmp_path):
    meta = np.zeros(3, dtype=shards.record_dtype("encoded", None))
    meta["id"] = [5, 6, 7]
    blobs = [b"a", b"bcd", b""]
    extras = [b'{"boxes": [[1, 2, 3, 4]]}', b"{}", b'{"x": 1}']
    url = str(tmp_path / "e.sgs")
    storage.write_bytes(url, shards.encode_encoded_shard(meta, blobs, extras))
    r = shards.ShardReader(url)
    assert r.blobs() == blobs
    assert r.blobs(1, 3) == blobs[1:]
    assert r.extras(0, 1) == [{"boxes": [[1, 2, 3, 4]]}]
    assert list(r.records()["id"]) == [5, 6, 7]


def test_numpy_snippet_in_docs_reads_a_shard(tmp_path):
    """docs/format.md promises a shard is readable with numpy alone; this is that snippet's logic."""
    import json
    import struct

    recs = _records(4)
    data = shards.encode_raw_shard(recs)
    magic, version, hlen = struct.unpack_from("<8sII", data)
    start = 20 if version >= 2 else 16  # format 2: the header's CRC32C sits between
    header = json.loads(data[start:start + hlen])
    dtype = np.dtype([(n, s, tuple(shape)) for n, s, shape in header["dtype"]])
    arr = np.frombuffer(data, dtype=dtype, count=header["count"], offset=header["data_offset"])
    assert magic == b"SIGNSHRD" and version == 2
    assert np.array_equal(arr["image"], recs["image"])


def test_bad_magic_version_and_truncation(tmp_path):
    data = shards.encode_raw_shard(_records(5))
    bad = tmp_path / "bad.sgs"
    bad.write_bytes(b"NOTSHARD" + data[8:])
    with pytest.raises(shards.ShardError, match="bad magic"):
        shards.ShardReader(str(bad))
    newer = tmp_path / "v9.sgs"
    newer.write_bytes(data[:8] + (9).to_bytes(4, "little") + data[12:])
    with pytest.raises(shards.ShardError, match="format 9 is not supported"):
        shards.ShardReader(str(newer))
    short = tmp_path / "short.sgs"
    short.write_bytes(data[:-100])
    with pytest.raises(shards.ShardError, match="truncated"):
        shards.ShardReader(str(short))


def test_manifest_missing_names_the_fix(tmp_path):
    with pytest.raises(shards.ShardError, match="signscale pack"):
        Manifest.load(str(tmp_path))
