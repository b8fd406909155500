import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

import signscale.data.pack as packing
from signscale import storage
from signscale.data import shards
from signscale.data.manifest import Manifest, verify
from signscale.data.pack import PackConfig, pack
from signscale.data.sources import open_source

SPEC = "synthetic:?n=240&size=16&seed=3"


def _pack(out, **kw):
    kw = {"image_size": 16, "shard_mb": 0.04, "workers": 0, "progress": False, **kw}
    return pack(PackConfig(source=kw.pop("source", SPEC), out=str(out), **kw))


def test_pack_manifest_and_readback(tmp_path):
    res = _pack(tmp_path / "ds")
    assert res.finalized and res.count == 240 and res.quarantined == 0 and res.shards > 2
    m = Manifest.load(str(tmp_path / "ds"))
    assert m.count == 240 and m.label_space.name == "de"
    assert sum(m.class_histogram()) == 240
    assert verify(str(tmp_path / "ds")) == []
    src = open_source(SPEC)
    first = shards.ShardReader(m.shard_url(0)).records(0, 5)
    for rec in first:
        s = src.read(int(rec["id"]))
        assert rec["label"] == s.label
        assert np.array_equal(rec["image"], s.image)  # already 16x16: stored unchanged


def test_verify_names_flipped_and_truncated_shards(tmp_path):
    out = tmp_path / "ds"
    _pack(out)
    m = Manifest.load(str(out))
    p1 = out / m.shards[1].path
    data = bytearray(p1.read_bytes())
    data[len(data) // 2] ^= 0x01
    p1.write_bytes(bytes(data))
    p2 = out / m.shards[2].path
    p2.write_bytes(p2.read_bytes()[:-10])
    problems = verify(str(out))
    assert len(problems) == 2
    assert m.shards[1].path in problems[0] and "sha256" in problems[0]
    assert m.shards[2].path in problems[1] and "truncated" in problems[1]
    cli = subprocess.run([sys.executable, "-m", "signscale", "data", "verify", str(out)], capture_output=True,
                         text=True)
    assert cli.returncode == 1 and m.shards[1].path in cli.stdout


_KILLER = r"""
import os, signal, sys
import signscale.data.pack as p
orig = p._pack_range
def dying(start, stop):
    if start >= int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # a real crash: nothing gets to clean up
    return orig(start, stop)
p._pack_range = dying
p.pack(p.PackConfig(source=sys.argv[1], out=sys.argv[2], image_size=16, shard_mb=0.04, workers=0, progress=False))
"""


def test_killed_pack_resumes_to_the_same_dataset(tmp_path):
    ref = _pack(tmp_path / "ref")
    out = tmp_path / "crashed"
    rps = Manifest.load(str(tmp_path / "ref")).data["records_per_chunk"]
    proc = subprocess.run([sys.executable, "-c", _KILLER, SPEC, str(out), str(2 * rps)])
    assert proc.returncode == -9
    assert not (out / "manifest.json").exists()
    assert not [f for f in os.listdir(out / "shards") if ".tmp" in f]  # nothing half-written in place
    resumed = _pack(out)
    assert resumed.chunks_reused == 2
    assert resumed.checksum == ref.checksum


def _proc_stat(pid):
    """(state, ppid, start time) of a live process from /proc, or None once it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in "ZX" else (fields[0], int(fields[1]), fields[19])


def _children(pid):
    """{child pid: start time} of ``pid``, from one scan of /proc."""
    kids = {}
    for name in os.listdir("/proc"):
        st = _proc_stat(name) if name.isdigit() else None
        if st is not None and st[1] == pid:
            kids[int(name)] = st[2]
    return kids


def _wait_until(condition, timeout_s=60.0, poll_s=0.05):
    """Poll ``condition`` until it holds; False if ``timeout_s`` passes first (a bound, not a sleep)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


@pytest.mark.skipif(not os.path.isdir("/proc/self") or not hasattr(os, "mkfifo"), reason="needs /proc and FIFOs")
def test_kill_9_of_pack_takes_its_decode_workers_with_it(tmp_path):
    """A real `signscale pack` with three decode workers, killed mid-run: no worker outlives it.

    One "image" is a FIFO nobody writes to, so the worker that reads it blocks and the pack cannot
    finish before the kill: the kill always lands mid-run, with every worker alive.
    """
    root = tmp_path / "imgs" / "keep_right"
    root.mkdir(parents=True)
    for i in range(40):
        (root / f"img{i:02d}.png").write_bytes(_png((i, 50, 60), (12, 12)))
    os.mkfifo(root / "stuck.png")
    proc = subprocess.Popen([sys.executable, "-m", "signscale", "pack", f"folder:{tmp_path / 'imgs'}",
                             str(tmp_path / "ds"), "--image-size", "8", "--workers", "3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = {}
    try:
        assert _wait_until(lambda: len(_children(proc.pid)) >= 3 or proc.poll() is not None)
        workers = _children(proc.pid)
        assert proc.poll() is None and len(workers) == 3
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL

        def alive():
            return [pid for pid, start in workers.items() if (_proc_stat(pid) or (0, 0, None))[2] == start]

        assert _wait_until(lambda: not alive(), timeout_s=30), f"decode workers outlived the pack: {alive()}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, start in workers.items():  # on failure: end what this test started, by pid
            st = _proc_stat(pid)
            if st is not None and st[2] == start:
                os.kill(pid, signal.SIGKILL)


def test_the_next_run_removes_only_old_temp_files_of_ours(tmp_path):
    out = tmp_path / "ds"
    (out / "shards").mkdir(parents=True)
    (out / "_pack").mkdir()
    old = time.time() - packing.STALE_TMP_S - 60  # older than the age pack documents
    stale = [out / "shards" / ".shard-00001.sgs.tmp-0a1b2c3d", out / "_pack" / ".chunk-00000.json.tmp-deadbeef",
             out / ".manifest.json.tmp-01234567"]
    kept = [out / "shards" / ".shard-00002.sgs.tmp-cafef00d",  # fresh: perhaps another rank's write in progress
            out / "shards" / "notes.tmp-01234567", out / ".x.tmp-zzzzzzzz", out / ".x.tmp-0123456789",
            out / "mine.txt", tmp_path / ".elsewhere.tmp-01234567"]  # not ours, or not in the dataset
    for i, f in enumerate(stale + kept):
        f.write_bytes(b"partial")
        if i != len(stale):  # everything but the fresh temp file is old
            os.utime(f, (old, old))
    res = _pack(out)
    assert res.finalized and res.count == 240
    assert [f.name for f in stale if f.exists()] == []
    assert [f.name for f in kept if not f.exists()] == []
    assert verify(str(out)) == []


def test_two_ranks_equal_one_rank(tmp_path):
    ref = _pack(tmp_path / "one")
    out = tmp_path / "two"
    procs = [subprocess.Popen([sys.executable, "-m", "signscale", "pack", SPEC, str(out), "--image-size", "16",
                               "--shard-mb", "0.04", "--workers", "0", "--rank", str(r), "--world-size", "2"])
             for r in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    m = Manifest.load(str(out))
    assert m.checksum() == ref.checksum and m.count == ref.count


def _png(color, size=(20, 20)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _truncated_jpeg():
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buf, format="JPEG")
    data = buf.getvalue()
    return data[: len(data) * 2 // 3]  # headers intact, scan data cut


def _pixel_bomb():
    """A valid PNG whose header claims 60000 x 60000 pixels."""
    data = bytearray(_png((1, 2, 3)))
    ihdr = data[12:29]  # type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", 60000, 60000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


BAD_FILES = {
    # file name: (bytes or None for "not on disk", label, expected quarantine reason)
    "empty.png": (b"", "1", "empty"),
    "random.png": (bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)), "1", "not_an_image"),
    "notes.png": (b"this is a text file, not an image\n", "1", "not_an_image"),
    "truncated.png": (_png((200, 0, 0), (64, 64))[:60], "1", "truncated"),
    "truncated.jpg": (_truncated_jpeg(), "1", "truncated"),
    "bomb.png": (_pixel_bomb(), "1", "too_many_pixels"),
    "label99.png": (_png((9, 9, 9)), "99", "unknown_label"),
    "badkey.png": (_png((8, 8, 8)), "not_a_sign", "unknown_label"),
    "missing.png": (None, "1", "missing_file"),
    "dup.png": (_png((10, 20, 30)), "1", "duplicate"),
}


def test_ten_kinds_of_bad_files_are_quarantined(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    rows = ["path,label"]
    for i in range(12):
        (d / f"good{i}.png").write_bytes(_png((10 + i, 20, 30)))  # good0 is dup.png's original
        rows.append(f"good{i}.png,{i % 43}")
    for name, (data, label, _) in BAD_FILES.items():
        if data is not None:
            (d / name).write_bytes(data)
        rows.append(f"{name},{label}")
    (d / "list.csv").write_text("\n".join(rows) + "\n")
    res = _pack(tmp_path / "ds", source=f"folder:{d}/list.csv")
    assert res.count == 12
    lines = [json.loads(x) for x in (tmp_path / "ds" / "quarantine.jsonl").read_text().splitlines()]
    got = {os.path.basename(q["key"]): q["reason"] for q in lines}
    assert got == {name: reason for name, (_, _, reason) in BAD_FILES.items()}
    assert all(q["detail"] for q in lines)
    assert sorted(os.listdir(d)) == sorted([f"good{i}.png" for i in range(12)] + ["list.csv"]
                                           + [n for n, v in BAD_FILES.items() if v[0] is not None])  # untouched
    strict = subprocess.run([sys.executable, "-m", "signscale", "pack", f"folder:{d}/list.csv",
                             str(tmp_path / "strict"), "--workers", "0", "--strict"], capture_output=True, text=True)
    assert strict.returncode != 0 and "quarantined" in strict.stdout


def test_pack_to_s3_info_verify_and_read_back(tmp_path, s3_bucket):
    url = f"{s3_bucket}/datasets/syn"
    local = _pack(tmp_path / "local")
    remote = _pack(url, workers=2)
    assert remote.checksum == local.checksum
    assert storage.exists(f"{url}/manifest.json")
    assert verify(url) == []
    m = Manifest.load(url)
    r = shards.ShardReader(m.shard_url(1))
    lm = Manifest.load(str(tmp_path / "local"))
    assert np.array_equal(r.records(3, 9), shards.ShardReader(lm.shard_url(1)).records(3, 9))
    for cmd in (["data", "info", url], ["data", "verify", url]):
        cli = subprocess.run([sys.executable, "-m", "signscale", *cmd], capture_output=True, text=True)
        assert cli.returncode == 0, cli.stdout + cli.stderr


def test_torchrun_two_ranks_equal_one_rank(tmp_path):
    ref = _pack(tmp_path / "one")
    out = tmp_path / "tr"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "signscale", "pack", SPEC, str(out), "--image-size", "16", "--shard-mb", "0.04",
                           "--workers", "0"], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Manifest.load(str(out)).checksum() == ref.checksum
