import importlib.util
import os

import pytest

from signscale import pointers, storage


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


def test_missing_extra_is_named_even_where_installed(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "adlfs", None)  # import adlfs now raises ImportError
    with pytest.raises(storage.StorageError, match=r"signscale\[azure\]"):
        storage.exists("az://container/x")


def _client_error(status, code):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def test_transient_errors_are_those_each_store_documents():
    """Classified by status / error code / exception class, never by words in a message."""
    pytest.importorskip("botocore")
    for status, code, want in [(503, "SlowDown", True), (500, "InternalError", True), (400, "RequestTimeout", True),
                               (409, "ConditionalRequestConflict", True), (403, "AccessDenied", False),
                               (404, "NoSuchKey", False), (412, "PreconditionFailed", False),
                               (409, "BucketAlreadyExists", False), (400, "InvalidArgument", False)]:
        assert storage.is_transient(_client_error(status, code)) is want, (status, code)
    s3fs_errors = pytest.importorskip("s3fs.errors")
    wrapped = s3fs_errors.translate_boto_error(_client_error(503, "SlowDown"))  # what s3fs raises: an OSError
    assert isinstance(wrapped, OSError) and storage.is_transient(wrapped)
    assert not storage.is_transient(s3fs_errors.translate_boto_error(_client_error(403, "AccessDenied")))

    assert storage.is_transient(ConnectionResetError("reset by peer"))
    assert storage.is_transient(TimeoutError())
    assert not storage.is_transient(OSError("wrote 500 bytes, connection fine"))  # words don't count
    assert not storage.is_transient(storage.PreconditionFailed("x"))
    assert not storage.is_transient(FileNotFoundError("x"))


def test_transient_classification_for_gcs_and_azure_errors():
    retry_mod = pytest.importorskip("gcsfs.retry")
    for code, want in [(503, True), (429, True), (408, True), (504, True), (400, False), (401, False), (409, False)]:
        assert storage.is_transient(retry_mod.HttpError({"code": code, "message": "m"})) is want, code
    exc_mod = pytest.importorskip("azure.core.exceptions")
    for status, want in [(503, True), (500, True), (403, False), (404, False), (412, False)]:
        err = exc_mod.HttpResponseError(message="m")
        err.status_code = status
        assert storage.is_transient(err) is want, status
    assert storage.is_transient(exc_mod.ServiceRequestError("connection refused"))
    assert not storage.is_transient(exc_mod.ClientAuthenticationError(message="denied"))


def test_pointer_on_unsupported_store_is_refused():
    with pytest.raises(storage.StorageError, match="conditional writes are not supported on memory://"):
        pointers.write_pointer("memory://bucket/head", b"x", expect=None)


def test_local_pointer_tokens_and_lock_file(tmp_path):
    url = str(tmp_path / "aliases" / "prod")
    t1 = pointers.write_pointer(url, b"v1", expect=None)
    assert pointers.read_pointer(url) == (b"v1", t1)
    with pytest.raises(storage.PreconditionFailed, match="prod"):
        pointers.write_pointer(url, b"v2", expect="not-a-token")
    assert sorted(os.listdir(tmp_path / "aliases")) == [".prod.lock", "prod"]  # no temp files left behind


def test_remove_temps_takes_only_atomic_write_temps_and_follows_its_rule(tmp_path):
    (tmp_path / "sub").mkdir()
    target, tmp = tmp_path / "a.json", tmp_path / ".a.json.tmp-0123abcd"
    deep = tmp_path / "sub" / ".b.bin.tmp-89abcdef"
    others = [tmp_path / ".a.json.tmp-xyz", tmp_path / "a.json.tmp-0123abcd", tmp_path / ".a.json.tmp-0123abcde"]
    for p in [target, tmp, deep, *others]:
        p.write_bytes(b"x")
    os.utime(tmp, (1_000, 1_000))  # older than its target: superseded
    assert storage.remove_temps(str(tmp_path), stale=storage.older_than(10**10)) == []  # 300 years
    assert storage.remove_temps(str(tmp_path), stale=storage.superseded) == [str(tmp)]
    assert storage.remove_temps(str(tmp_path / "nowhere")) == []
    assert storage.remove_temps(str(tmp_path)) == []  # not recursive: sub/ untouched
    assert storage.remove_temps(str(tmp_path), recursive=True) == [str(deep)]
    assert all(p.exists() for p in [target, *others])
