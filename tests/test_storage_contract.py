"""The storage contract, run alike against local disk, S3 (moto), GCS (gcp-storage-emulator) and
Azure Blob (Azurite), each a real server on 127.0.0.1 reached over HTTP by the real fsspec back-end.

Emulator gaps are stated where they bite: gcp-storage-emulator accepts ``ifGenerationMatch`` but
does not enforce it, so on GCS the race test is replaced by a check, through a recording proxy,
that every pointer write carries its generation precondition (the real service enforces it).
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import threading
from urllib.parse import parse_qs, urlparse

import pytest

from signscale import pointers, storage
from signscale.testing import emulators

BACKENDS = ["local", "s3", "gcs", "azure"]
_ids = itertools.count()


@pytest.fixture
def s3_emulator(s3_server):
    return emulators.from_s3local(s3_server)


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    """(kind, root URL, emulator or None) with a fresh bucket per test."""
    kind = request.param
    if kind == "local":
        return kind, str(tmp_path / "store"), None
    emu = request.getfixturevalue(f"{kind}_emulator")
    return kind, emu.make_bucket(f"contract-{os.getpid()}-{next(_ids)}") + "/prefix", emu


# ---------------------------------------------------------------------------------------------
# Objects


@pytest.mark.parametrize("kind", [b for b in BACKENDS if b != "local"])
def test_a_missing_bucket_is_an_error_naming_it_and_an_absent_key_a_plain_no(kind, request):
    """Read as "no such object", a missing bucket would send a user to re-pack a dataset that is there,
    under a mistyped bucket name or at another endpoint."""
    root = request.getfixturevalue(f"{kind}_emulator").make_bucket(f"contract-{os.getpid()}-{next(_ids)}")
    assert storage.exists(storage.join(root, "absent.bin")) is False
    missing = f"{root.split('://')[0]}://no-such-bucket-{os.getpid()}/ds/manifest.json"
    with pytest.raises(storage.NoSuchBucket, match=f"no such (bucket|container) 'no-such-bucket-{os.getpid()}'"):
        storage.exists(missing)


def test_write_read_range_list_exists_delete(backend):
    _, root, _ = backend
    url = storage.join(root, "a", "blob.bin")
    data = bytes(range(256)) * 64
    sha = storage.write_bytes(url, data)
    storage.write_bytes(storage.join(root, "a", "sub", "deeper.bin"), b"x")
    assert storage.exists(url) and not storage.exists(storage.join(root, "a", "absent.bin"))
    assert storage.size(url) == len(data)
    assert storage.read_bytes(url) == data
    assert storage.read_bytes(url, 1000, 5000) == data[1000:5000]
    assert storage.read_bytes(url, len(data) - 7, len(data)) == data[-7:]
    assert storage.sha256_of(url) == sha
    # listing is one level deep on every store: the nested object shows as its "directory"
    assert storage.listdir(storage.join(root, "a")) == [url, storage.join(root, "a", "sub")]
    assert storage.glob(storage.join(root, "a", "*.bin")) == [url]
    storage.delete(url)
    assert not storage.exists(url)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(url)


def test_atomic_publish(backend):
    _, root, _ = backend
    url = storage.join(root, "x", "model.bin")
    with storage.atomic_write(url) as (w, _):
        w.write(b"part one, ")
        assert not storage.exists(url)  # nothing under the final name until the write completes
        w.write(b"part two")
    assert storage.read_bytes(url) == b"part one, part two"
    with pytest.raises(RuntimeError), storage.atomic_write(url) as (w, _):
        w.write(b"half a new model")
        raise RuntimeError("crash mid-write")
    assert storage.read_bytes(url) == b"part one, part two"  # the old object is intact
    assert [u for u in storage.listdir(storage.join(root, "x")) if u != url] == []  # no temp left


# ---------------------------------------------------------------------------------------------
# Pointers


def test_pointer_create_then_compare_and_swap(backend):
    _, root, _ = backend
    url = storage.join(root, "heads", "main")
    with pytest.raises(FileNotFoundError):
        pointers.read_pointer(url)
    t1 = pointers.write_pointer(url, b"v1", expect=None)
    assert pointers.read_pointer(url) == (b"v1", t1)
    t2 = pointers.write_pointer(url, b"v2", expect=t1)
    assert t2 != t1 and pointers.read_pointer(url) == (b"v2", t2)


def test_pointer_lost_races_are_reported(backend):
    kind, root, _ = backend
    if kind == "gcs":
        pytest.skip("gcp-storage-emulator does not enforce ifGenerationMatch (the real service does); "
                    "test_gcs_every_pointer_write_carries_its_generation_precondition checks what is sent")
    url = storage.join(root, "heads", "main")
    t1 = pointers.write_pointer(url, b"v1", expect=None)
    with pytest.raises(storage.PreconditionFailed, match="already exists"):
        pointers.write_pointer(url, b"other", expect=None)
    t2 = pointers.write_pointer(url, b"v2", expect=t1)
    with pytest.raises(storage.PreconditionFailed, match="changed since"):
        pointers.write_pointer(url, b"stale", expect=t1)
    assert pointers.read_pointer(url) == (b"v2", t2)  # the losers wrote nothing
    storage.delete(url)
    with pytest.raises(storage.PreconditionFailed):
        pointers.write_pointer(url, b"resurrect", expect=t2)
    assert not storage.exists(url)


def _race_round(url: str, expect: str | None, tag: str) -> list[tuple[str, object]]:
    """Two threads released together by a barrier, each writing its own bytes with the same expect."""
    barrier = threading.Barrier(2)
    results: list[tuple[str, object]] = []
    lock = threading.Lock()

    def writer(name: str) -> None:
        barrier.wait()
        try:
            out: object = pointers.write_pointer(url, f"{tag}-{name}".encode(), expect=expect)
        except storage.PreconditionFailed as exc:
            out = exc
        with lock:
            results.append((name, out))

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _check_one_winner(url: str, results: list[tuple[str, object]], tag: str) -> str:
    winners = [(n, tok) for n, tok in results if isinstance(tok, str)]
    losers = [n for n, tok in results if isinstance(tok, storage.PreconditionFailed)]
    assert len(winners) == 1 and len(losers) == 1, results
    name, token = winners[0]
    assert pointers.read_pointer(url) == (f"{tag}-{name}".encode(), token)  # the winner's bytes, whole
    return str(token)


def test_two_writer_race_has_exactly_one_winner(backend):
    kind, root, _ = backend
    if kind == "gcs":
        pytest.skip("gcp-storage-emulator does not enforce ifGenerationMatch, so both writers would win "
                    "there (not on the real service); the GCS check is that every write sends it")
    url = storage.join(root, "heads", "race")
    token = _check_one_winner(url, _race_round(url, None, "create"), "create")
    for i in range(5 if kind == "local" else 3):
        token = _check_one_winner(url, _race_round(url, token, f"r{i}"), f"r{i}")


def _process_writer(url: str, name: str, expect: str | None, barrier, queue) -> None:
    barrier.wait()
    try:
        queue.put((name, pointers.write_pointer(url, name.encode(), expect=expect)))
    except storage.PreconditionFailed:
        queue.put((name, "lost"))


def test_two_processes_race_on_local_disk(tmp_path):
    """flock, not just the in-process lock, serialises writers: two real processes, one winner each round."""
    ctx = mp.get_context("spawn")
    url = str(tmp_path / "heads" / "main")
    token = pointers.write_pointer(url, b"start", expect=None)
    for i in range(3):
        barrier, queue = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_process_writer, args=(url, f"p{i}{n}", token, barrier, queue))
                 for n in "ab"]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        winners = {n: t for n, t in results.items() if t != "lost"}
        assert len(winners) == 1, results
        (name, token), = winners.items()
        assert pointers.read_pointer(url) == (name.encode(), token)


def test_gcs_every_pointer_write_carries_its_generation_precondition(gcs_emulator):
    """The emulator ignores ifGenerationMatch, so check the wire: every pointer upload sends it,
    =0 to create, =<generation read> to replace (the real service answers a mismatch with 412)."""
    root = gcs_emulator.make_bucket(f"gen-{os.getpid()}-{next(_ids)}")
    url = storage.join(root, "heads", "main")
    with emulators.through_proxy(gcs_emulator) as proxy:
        t1 = pointers.write_pointer(url, b"v1", expect=None)
        t2 = pointers.write_pointer(url, b"v2", expect=t1)
        pointers.write_pointer(url, b"v3", expect=t2)
        uploads = [s for s in proxy.requests("/upload/") if s.method == "POST"]
    sent = [parse_qs(urlparse(s.path).query) for s in uploads]
    assert [q.get("name") for q in sent] == [["heads/main"]] * 3
    assert [q.get("ifGenerationMatch") for q in sent] == [["0"], [t1], [t2]]


# ---------------------------------------------------------------------------------------------
# Retries, through a real proxy that injects the provider's own transient and final errors

_ERRORS = {  # (transient, final) response bodies in each provider's error format
    "s3": (b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>",
           b"<Error><Code>AccessDenied</Code><Message>injected</Message></Error>", "application/xml"),
    "gcs": (b'{"error": {"code": 503, "message": "injected"}}',
            b'{"error": {"code": 403, "message": "injected"}}', "application/json"),
    "azure": (b"<?xml version='1.0'?><Error><Code>ServerBusy</Code><Message>injected</Message></Error>",
              b"<?xml version='1.0'?><Error><Code>AuthorizationFailure</Code><Message>injected</Message></Error>",
              "application/xml"),
}


def test_transient_error_is_retried_and_final_error_is_not(backend):
    kind, root, emu = backend
    if kind == "local":
        pytest.skip("local disk has no transient errors; retry() itself is unit-tested in test_storage.py")
    url = storage.join(root, "ptr-retry")
    token = pointers.write_pointer(url, b"v1", expect=None)
    transient, final, ctype = _ERRORS[kind]
    with emulators.through_proxy(emu) as proxy:
        proxy.fail_next(2, 503, match="ptr-retry", body=transient, content_type=ctype)
        assert pointers.read_pointer(url) == (b"v1", token)
        statuses = [s.status for s in proxy.requests("ptr-retry")]
        assert statuses[:2] == [503, 503] and 200 <= statuses[2] < 300  # retried past the injected 503s

        proxy.fail_next(1, 503, match="ptr-retry", body=transient, content_type=ctype)
        t2 = pointers.write_pointer(url, b"v2", expect=token)  # a conditional write is retried too
        assert pointers.read_pointer(url) == (b"v2", t2)

        before = len(proxy.requests("ptr-retry"))
        proxy.fail_next(1, 403, match="ptr-retry", body=final, content_type=ctype)
        with pytest.raises(Exception) as info:
            pointers.read_pointer(url)
        assert not storage.is_transient(info.value)
        assert len(proxy.requests("ptr-retry")) == before + 1  # a denied request is not retried
