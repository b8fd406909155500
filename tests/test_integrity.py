"""Integrity on read (#19): shards carry per-block CRC32C sums and every read checks them.

Each test corrupts real files (one flipped byte, as a bad disk or a bad copy would) and reads them
through the real reader, stream, loader, cache or CLI.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from signscale import storage
from signscale.data import shards
from signscale.data.manifest import Manifest, verify
from signscale.data.shards import ShardError, ShardReader
from signscale.data.stream import open_stream


def _copy(dataset: str, tmp_path: Path, name: str = "ds") -> str:
    out = tmp_path / name
    shutil.copytree(dataset, out)
    return str(out)


def _shard(url: str, k: int = 0) -> Path:
    return Path(Manifest.load(url).shard_url(k))


def _flip(path: Path, offset: int, xor: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= xor
    path.write_bytes(bytes(data))


def _field_offset(path: Path, record: int, name: str) -> int:
    r = ShardReader(str(path))
    return r.header["data_offset"] + record * r.dtype.itemsize + r.dtype.fields[name][1]


def _ids(url: str, shard: int, start: int, stop: int) -> list[int]:
    r = ShardReader(Manifest.load(url).shard_url(shard))
    return [int(i) for i in r.records(start, stop, check=False)["id"]]


def _all_ids(url: str) -> list[int]:
    m = Manifest.load(url)
    return [i for k, s in enumerate(m.shards) for i in _ids(url, k, 0, s.count)]


def _read_everything(r: ShardReader) -> None:
    r.records()
    if r.encoding == "encoded":
        r.blobs()
        r.extras()


# ---------------------------------------------------------------------------------------------
# The reader: one flipped byte anywhere


def _raw_shard(n: int = 150) -> bytes:
    recs = np.zeros(n, dtype=shards.record_dtype("raw", (16, 16, 3)))  # 798-byte records: 64 per block
    recs["image"] = np.arange(recs["image"].size).reshape(recs["image"].shape) % 251
    recs["id"] = np.arange(n)
    recs["label"] = np.arange(n) % 43
    return shards.encode_raw_shard(recs)


def _encoded_shard() -> bytes:
    meta = np.zeros(6, dtype=shards.record_dtype("encoded", None))
    meta["id"] = np.arange(6)
    blobs = [bytes([i]) * (5 + i) for i in range(6)]
    extras = [json.dumps({"boxes": [[i, i, i + 1, i + 1]]}).encode() for i in range(6)]
    return shards.encode_encoded_shard(meta, blobs, extras)


@pytest.mark.parametrize("make", [_raw_shard, _encoded_shard], ids=["raw", "encoded"])
def test_every_single_byte_flip_in_a_shard_is_caught(make):
    data = make()
    r = ShardReader("mem://s.sgs", data=data)
    assert r.checked and (r.sums.blocks > 1 or r.encoding == "encoded")
    _read_everything(r)  # the intact shard reads
    # every byte of the prefix, header and offset tables, and every 7th of the records and images
    # (CRC32C catches any one-byte change of a block; this checks each byte is in some checked span)
    start = r.header["data_offset"]
    positions = [*range(start), *range(start, len(data), 7), *range(max(start, len(data) - 64), len(data))]
    if r.encoding == "encoded":
        positions = range(len(data))
    missed = []
    for p in positions:
        flipped = bytearray(data)
        flipped[p] ^= 0x01
        try:
            _read_everything(ShardReader("mem://s.sgs", data=bytes(flipped)))
        except ShardError:
            continue
        missed.append(p)
    assert missed == []  # header, prefix, offsets, records, images, extras: every byte is covered


def test_a_corrupt_block_names_the_shard_the_block_and_its_records(tmp_path):
    data = bytearray(_raw_shard())
    r = ShardReader("x", data=bytes(data))
    per = r.sums.per
    data[r.header["data_offset"] + (per + 3) * r.dtype.itemsize] ^= 0x10  # a pixel of record per + 3
    path = tmp_path / "DS" / "shards" / "shard-00000.sgs"
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(data))
    r = ShardReader(str(path))
    assert len(r.records(0, per)) == per  # block 0 is good
    with pytest.raises(shards.CorruptBlock, match=rf"block 1 \(records {per}\.\.{2 * per - 1}\).*data verify .*DS"):
        r.records(per, per + 1)
    assert list(r.bad_blocks(np.arange(r.sums.blocks))) == [1] and r.scan() == [1]


# ---------------------------------------------------------------------------------------------
# The stream: the table's rows


@pytest.mark.parametrize("workers", [0, 2])
def test_flipped_pixel_byte_stops_the_stream_naming_dataset_shard_and_block(synthetic_dataset, tmp_path, workers):
    url = _copy(synthetic_dataset, tmp_path)
    shard = _shard(url, 1)
    _flip(shard, _field_offset(shard, 5, "image") + 40)
    with pytest.raises(ShardError) as err:
        for _ in open_stream(url, num_workers=workers, batch_size=16):
            pass
    msg = str(err.value)
    assert msg.startswith(url) and "shards/shard-00001.sgs, block 0 (records 0.." in msg
    assert f"signscale data verify {url}" in msg and "re-pack" in msg
    assert "Traceback" not in msg  # a worker's error arrives as its one line


def test_flipped_header_byte_stops_the_stream(synthetic_dataset, tmp_path):
    url = _copy(synthetic_dataset, tmp_path)
    shard = _shard(url, 0)
    # a padding space after the header's JSON turned into a tab: the JSON still parses, so only a
    # checksum can tell (the compact JSON has no "} " inside, so its first one is where it ends)
    padding = shard.read_bytes().index(b"} ") + 2
    assert shard.read_bytes()[padding:padding + 1] == b" "
    _flip(shard, padding, 0x20 ^ 0x09)
    with pytest.raises(ShardError, match=r"shard-00000\.sgs: corrupt shard header \(checksum mismatch\).*data verify"):
        for _ in open_stream(url, num_workers=0, batch_size=16):
            pass


def test_flipped_label_byte_is_caught_in_its_block(synthetic_dataset, tmp_path):
    url = _copy(synthetic_dataset, tmp_path)
    shard = _shard(url, 0)
    _flip(shard, _field_offset(shard, 70, "label"), 0x80)  # label 128+: beyond the 43 classes
    with pytest.raises(ShardError) as err:
        for _ in open_stream(url, num_workers=0, batch_size=16, shuffle=False):
            pass
    per = ShardReader(str(shard)).sums.per
    b = 70 // per
    assert f"shards/shard-00000.sgs, block {b} (records {b * per}.." in str(err.value)


def _downgrade_to_format_1(url: str) -> None:
    """Rewrite every shard as signscale wrote it before block sums (format 1), manifest updated (and
    without the ``shard_format`` it did not record then)."""
    mpath = Path(url) / "manifest.json"
    m = json.loads(mpath.read_text())
    del m["shard_format"]
    for s in m["shards"]:
        path = Path(url) / s["path"]
        data = path.read_bytes()
        header = shards.parse_header(data, str(path))
        plain = {k: v for k, v in header.items() if not k.startswith("_") and k != "sums"}
        blob = json.dumps(plain, separators=(",", ":")).encode()
        blob += b" " * (header["data_offset"] - 16 - len(blob))
        data = shards.PREFIX.pack(shards.MAGIC, 1, len(blob)) + blob + data[header["data_offset"]:]
        path.write_bytes(data)
        s["sha256"], s["bytes"] = storage.sha256_of(str(path)), len(data)
    mpath.write_text(json.dumps(m))


def test_format_1_shards_read_unchecked_with_a_note_and_bad_labels_name_the_record(synthetic_dataset, tmp_path,
                                                                                   caplog):
    url = _copy(synthetic_dataset, tmp_path)
    _downgrade_to_format_1(url)
    assert not ShardReader(str(_shard(url))).checked
    with caplog.at_level(logging.WARNING, logger="signscale.data.stream"):
        ids = [i for b in open_stream(url, num_workers=0, batch_size=16) for i in b["id"].tolist()]
    assert sorted(ids) == sorted(_all_ids(url))
    notes = [r.message for r in caplog.records if "format 1" in r.message]
    assert len(notes) == 1 and url in notes[0] and "unchecked" in notes[0] and "re-pack" in notes[0]
    shard = _shard(url, 1)
    _flip(shard, _field_offset(shard, 7, "label"), 0x80)
    with pytest.raises(ShardError, match=r"shards/shard-00001\.sgs, record 7: label 1\d\d is outside the label "
                                         r"space \(43 classes\).*data verify"):
        for _ in open_stream(url, num_workers=2, batch_size=16):
            pass


def test_skip_mode_quarantines_counts_and_keeps_every_good_record_exactly_once(synthetic_dataset, tmp_path, caplog):
    url = _copy(synthetic_dataset, tmp_path)
    shard = _shard(url, 0)
    _flip(shard, _field_offset(shard, 70, "image"))
    per = ShardReader(str(shard)).sums.per
    b = 70 // per
    lost = set(_ids(url, 0, b * per, (b + 1) * per))
    good = sorted(set(_all_ids(url)) - lost)
    kw = {"batch_size": 16, "seed": 3, "on_corrupt": "skip"}
    loader = open_stream(url, num_workers=2, **kw)
    with caplog.at_level(logging.WARNING, logger="signscale.data.stream"):
        for epoch in range(2):  # the second epoch's workers share the first's verdicts: the block stays out
            ids = [i for batch in loader for i in batch["id"].tolist()]
            assert sorted(ids) == good, epoch  # every good record once, none of the block's
    assert loader.skipped_records == 2 * per
    assert loader.quarantine == [{"dataset": url, "shard": "shards/shard-00000.sgs", "block": b,
                                  "records": [b * per, (b + 1) * per], "reason": "checksum mismatch (records)"}]
    report = [r.message for r in caplog.records if "skipped" in r.message]
    assert len(report) == 2 and f"skipped {per} record(s)" in report[0] and f"data verify {url}" in report[0]
    # resumed mid-epoch (a new process would do the same): still every good record exactly once
    first = open_stream(url, num_workers=0, **kw)
    it = iter(first)
    head = [i for _ in range(6) for i in next(it)["id"].tolist()]
    state = first.state_dict()
    it.close()
    rest = open_stream(url, num_workers=0, **kw)
    rest.load_state_dict(state)
    tail = [i for batch in rest for i in batch["id"].tolist()]
    assert sorted(head + tail) == good


def test_remote_ranged_reads_check_each_block_and_skip_it(synthetic_dataset, tmp_path, s3_bucket):
    local = _copy(synthetic_dataset, tmp_path)
    shard = _shard(local, 0)
    _flip(shard, _field_offset(shard, 3, "image"))
    remote = f"{s3_bucket}/ds"
    for path in Path(local).rglob("*"):
        if path.is_file():
            storage.write_bytes(f"{remote}/{path.relative_to(local).as_posix()}", path.read_bytes())
    kw = {"num_workers": 0, "batch_size": 16, "block_size": 32}
    with pytest.raises(ShardError, match=rf"^{remote}: shard shards/shard-00000\.sgs, block 0 "):
        for _ in open_stream(remote, **kw):
            pass
    per = ShardReader(str(shard)).sums.per
    loader = open_stream(remote, on_corrupt="skip", **kw)
    ids = [i for b in loader for i in b["id"].tolist()]
    assert sorted(ids) == sorted(set(_all_ids(local)) - set(_ids(local, 0, 0, per)))
    assert loader.skipped_records == per and [e["block"] for e in loader.quarantine] == [0]


def test_shard_cache_refuses_a_download_that_does_not_match_the_manifest(synthetic_dataset, tmp_path, s3_bucket):
    remote = f"{s3_bucket}/ds"
    for path in Path(synthetic_dataset).rglob("*"):
        if path.is_file():
            storage.write_bytes(f"{remote}/{path.relative_to(synthetic_dataset).as_posix()}", path.read_bytes())
    m = Manifest.load(remote)
    data = bytearray(storage.read_bytes(m.shard_url(1)))
    data[-1] ^= 0x01  # the object changed in storage after the manifest was written
    storage.write_bytes(m.shard_url(1), bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(ShardError, match=rf"shard-00001\.sgs: downloaded shard does not match its manifest sha256"
                                         rf".*signscale data verify {remote}"):
        for _ in open_stream(remote, num_workers=0, batch_size=64, cache_dir=str(cache)):
            pass
    assert not list(cache.glob("*.sgs")) or all(p.name != f"{m.shards[1].sha256}.sgs" for p in cache.glob("*.sgs"))


def test_data_verify_names_the_corrupt_blocks(synthetic_dataset, tmp_path):
    url = _copy(synthetic_dataset, tmp_path)
    shard = _shard(url, 0)
    per = ShardReader(str(shard)).sums.per
    _flip(shard, _field_offset(shard, 2 * per + 1, "roi"))
    problems = verify(url)
    assert len(problems) == 1
    assert "shard-00000.sgs: sha256 mismatch" in problems[0]
    assert f"corrupt block(s) 2 (records {2 * per}..{3 * per - 1})" in problems[0]


# ---------------------------------------------------------------------------------------------
# The commands


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "signscale", *args], capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_train_and_evaluate_stop_with_the_message_on_a_corrupt_dataset(synthetic_dataset, tmp_path):
    from signscale.training.train import TrainConfig, train

    model = train(TrainConfig(data=(synthetic_dataset,), out=str(tmp_path / "run"), model="small_cnn", batch_size=32,
                              max_steps=1, workers=0, progress=False)).model_url
    url = _copy(synthetic_dataset, tmp_path)
    shard = _shard(url, 1)
    _flip(shard, _field_offset(shard, 9, "image"))
    expect = f"{url}: shard shards/shard-00001.sgs, block 0"
    r = _cli("train", f"--data={url}", f"--out={tmp_path / 'bad'}", "--model=small_cnn", "--batch_size=32",
             "--max_steps=20", "--workers=2", "--progress=false")
    assert r.returncode == 2 and expect in r.stdout, r.stdout + r.stderr[-2000:]
    r = _cli("evaluate", model, url, "workers=0", "progress=false")
    assert r.returncode == 2 and expect in r.stdout, r.stdout + r.stderr[-2000:]
    # with on_corrupt=skip, training goes on without the block and says what it left out
    r = _cli("train", f"--data={url}", f"--out={tmp_path / 'skip'}", "--model=small_cnn", "--batch_size=32",
             "--epochs=1", "--workers=2", "--progress=false", "--on_corrupt=skip")
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert "skipped" in r.stderr and f"data verify {url}" in r.stderr
