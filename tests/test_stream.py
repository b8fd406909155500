import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from signscale.data import shards
from signscale.data.manifest import Manifest
from signscale.data.pack import PackConfig, pack
from signscale.data.plan import plan_epoch, subtract
from signscale.data.reader import ShardCache
from signscale.data.stream import ShardStream, StreamConfig, open_stream

# modules these tests exercise through the ones they import (tests/test_layout.py)
COVERS = ("signscale.data.world", "signscale.data.reader")

SCRIPT = str(Path(__file__).parent / "scripts" / "stream_worker.py")


def _all_ids(url):
    m = Manifest.load(url)
    return sorted(int(i) for k in range(len(m.shards)) for i in shards.ShardReader(m.shard_url(k)).records()["id"])


def _torchrun(n, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           SCRIPT, *args]
    if n == 1:
        cmd = [sys.executable, SCRIPT, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("world,workers,remainder", [(1, 0, "drop"), (3, 2, "pad"), (2, 3, "drop"), (4, 1, "pad")])
def test_every_sample_once_across_ranks_and_workers(synthetic_dataset, world, workers, remainder):
    ids, pads = [], 0
    for r in range(world):
        loader = open_stream(synthetic_dataset, num_workers=workers, rank=r, world_size=world, batch_size=16,
                             block_size=8, window_blocks=2, remainder=remainder)
        n_batches = 0
        for b in loader:
            ids += b["id"][~b["pad"]].tolist()
            pads += int(b["pad"].sum())
            n_batches += 1
        assert n_batches == len(loader)
    total = 300
    if remainder == "pad":
        assert sorted(ids) == _all_ids(synthetic_dataset)
        assert pads == (-total) % world
    else:
        assert len(ids) == len(set(ids)) == total - total % world


def test_ranks_get_equal_counts(synthetic_dataset):
    counts = []
    for r in range(7):
        loader = open_stream(synthetic_dataset, num_workers=0, rank=r, world_size=7, batch_size=10)
        counts.append(sum(len(b["id"]) for b in loader))
    assert len(set(counts)) == 1 and counts[0] == 300 // 7


def test_two_processes_gloo_two_workers(synthetic_dataset, tmp_path):
    out = tmp_path / "out.json"
    _torchrun(2, synthetic_dataset, str(out), "epochs")
    res = json.loads(out.read_text())
    e0 = [i for r in res for i in r["epoch0"]]
    e1 = [i for r in res for i in r["epoch1"]]
    assert sorted(e0) == sorted(e1) == _all_ids(synthetic_dataset)  # 300 % 2 == 0: nothing dropped
    assert [r["epoch0"] for r in res] != [r["epoch1"] for r in res]  # a new order every epoch
    assert all(r["epoch0"] == r["again0"] for r in res)  # the same seed gives the same order
    assert set(res[0]["epoch0"]).isdisjoint(res[1]["epoch0"])


def test_resume_in_new_process_and_elastic_2_to_1(synthetic_dataset, tmp_path):
    everything = _all_ids(synthetic_dataset)
    for world_before in (1, 2):
        out, state = tmp_path / f"a{world_before}.json", tmp_path / f"s{world_before}.json"
        _torchrun(world_before, synthetic_dataset, str(out), "partial", "-", "5")
        res = json.loads(out.read_text())
        before = [i for r in res for i in r["ids"]]
        state.write_text(json.dumps(res[0]["state"]))
        out2 = tmp_path / f"b{world_before}.json"
        _torchrun(1, synthetic_dataset, str(out2), "resume", str(state))
        after = json.loads(out2.read_text())[0]["ids"]
        assert len(before) == 5 * 8 * world_before
        assert not set(before) & set(after)
        assert sorted(before + after) == everything


def test_mixing_70_30(tmp_path):
    urls = []
    for name, seed in (("a", 1), ("b", 2)):
        url = str(tmp_path / name)
        pack(PackConfig(source=f"synthetic:?n=400&size=8&seed={seed}", out=url, image_size=8, shard_mb=0.02, workers=0,
                        progress=False))
        urls.append(url)
    loader = open_stream(urls, num_workers=0, weights=(0.7, 0.3), epoch_size=10_000, batch_size=500,
                         block_size=32)
    ds = np.concatenate([b["dataset"].numpy() for b in loader])
    assert len(ds) == 10_000
    assert abs((ds == 0).mean() - 0.7) <= 0.02
    for chunk in np.array_split(ds, 5):  # proportions hold locally, not only over the epoch
        assert abs((chunk == 0).mean() - 0.7) <= 0.05


def test_plan_partitions_records_exactly(synthetic_dataset):
    cfg = StreamConfig(datasets=(synthetic_dataset,), block_size=7, window_blocks=3)
    plan = plan_epoch([300], cfg, epoch=4)
    _, rec = plan.lookup(np.arange(plan.total))
    assert sorted(rec.tolist()) == list(range(300))
    assert subtract([(0, 10), (20, 30)], [(5, 25)]) == [(0, 5), (25, 30)]


def test_different_label_spaces_refused(tmp_path, synthetic_dataset):
    import json as _json

    other = tmp_path / "other"
    pack(PackConfig(source="synthetic:?n=20&size=16", out=str(other), image_size=16, workers=0, progress=False))
    mpath = other / "manifest.json"
    m = _json.loads(mpath.read_text())
    m["label_space"]["name"] = "xx"
    mpath.write_text(_json.dumps(m))
    with pytest.raises(shards.ShardError, match="different label spaces"):
        ShardStream(StreamConfig(datasets=(synthetic_dataset, str(other))))


def test_s3_reads_match_local_and_cache_is_bounded(tmp_path, s3_bucket):
    spec = "synthetic:?n=300&size=16&seed=1"
    url = f"{s3_bucket}/syn"
    local = str(tmp_path / "local")
    for out in (url, local):
        pack(PackConfig(source=spec, out=out, image_size=16, shard_mb=0.02, workers=0, progress=False))
    kw = dict(num_workers=2, batch_size=16, block_size=8, seed=5)
    ids_local = [i for b in open_stream(local, **kw) for i in b["id"].tolist()]
    ids_range = [i for b in open_stream(url, **kw) for i in b["id"].tolist()]
    assert ids_range == ids_local
    m = Manifest.load(url)
    bound = int(max(s.bytes for s in m.shards) * 2.5)
    cache = tmp_path / "cache"
    loader = open_stream(url, cache_dir=str(cache), cache_bytes=bound, **kw)
    assert [i for b in loader for i in b["id"].tolist()] == ids_local
    files = [f for f in os.listdir(cache) if f.endswith(".sgs")]
    assert 0 < sum(os.path.getsize(cache / f) for f in files) <= bound
    assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]
    # corrupt one cached shard: it is detected and fetched again
    victim = cache / files[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    big = open_stream(url, cache_dir=str(cache), cache_bytes=10 * bound, **kw)
    assert [i for b in big for i in b["id"].tolist()] == ids_local
    import hashlib

    assert hashlib.sha256(victim.read_bytes()).hexdigest() == victim.name[:-4]


def test_a_cached_shard_evicted_by_another_process_is_fetched_again(tmp_path, s3_bucket):
    url = f"{s3_bucket}/evict"
    pack(PackConfig(source="synthetic:?n=40&size=16&seed=2", out=url, image_size=16, workers=0, progress=False))
    m = Manifest.load(url)
    info = m.shards[0]
    cache = ShardCache(str(tmp_path / "cache"), 10 * info.bytes)
    first = cache.path(m.shard_url(0), info.sha256, info.bytes)
    os.remove(first)  # what another worker's eviction does between this one's check and its open
    again = cache.path(m.shard_url(0), info.sha256, info.bytes)
    assert again == first and shards.ShardReader(url, local=again).count == info.count


def test_encoded_shards_stream_the_same_pixels_locally_and_from_s3(tmp_path, s3_bucket):
    spec = "synthetic:?n=90&size=16&seed=4"
    raw, enc_local, enc_s3 = str(tmp_path / "raw"), str(tmp_path / "enc"), f"{s3_bucket}/enc"
    pack(PackConfig(source=spec, out=raw, image_size=16, shard_mb=0.02, workers=0, progress=False))
    for out in (enc_local, enc_s3):
        pack(PackConfig(source=spec, out=out, encoding="encoded", shard_mb=0.01, workers=0, progress=False))
    kw = dict(num_workers=0, batch_size=16, block_size=8, seed=2)
    ref = list(open_stream(raw, **kw))
    for url in (enc_local, enc_s3):
        got = list(open_stream(url, image_size=16, **kw))
        assert [b["id"].tolist() for b in got] == [b["id"].tolist() for b in ref]
        assert all(np.array_equal(a["image"].numpy(), b["image"].numpy()) for a, b in zip(got, ref))


def test_planning_50m_records_for_64_ranks_x_8_workers_is_cheap_and_exact():
    """Scale check of the epoch plan: no per-sample structure, every record exactly once, equal ranks."""
    import tracemalloc

    from signscale.data.plan import rank_share

    n, ranks, workers, bs = 50_000_000, 64, 8, 256
    cfg = StreamConfig(datasets=("unused",), batch_size=bs, block_size=256, window_blocks=8)
    tracemalloc.start()
    plan = plan_epoch([n], cfg, epoch=1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # no per-sample structure: a per-record array alone would be 400 MB; segments are a few MB
    assert peak < 64 * 2**20 and len(plan.seg_start) < n // 100
    # segments cover [0, n) exactly once
    order = np.argsort(plan.seg_start)
    starts = plan.seg_start[order]
    lengths = np.diff(plan.seg_pos)[order]
    assert starts[0] == 0 and np.array_equal(starts[1:], (starts + lengths)[:-1]) and starts[-1] + lengths[-1] == n
    # every window is a bijection of its positions (checked on a sample of windows, first and last included)
    W = plan.window
    for w in [0, 1, 777, 12_345, n // W - 1, n // W]:
        pos = np.arange(w * W, min(n, (w + 1) * W))
        _, rec = plan.lookup(pos)
        assert len(np.unique(rec)) == len(pos)
    # ranks: equal counts, disjoint, covering the epoch minus the dropped remainder; workers split the batches
    shares = [rank_share(n, r, ranks, "drop", bs, workers) for r in range(ranks)]
    assert len({s.count for s in shares}) == 1
    assert [s.start for s in shares] == [r * shares[0].count for r in range(ranks)]
    assert n - ranks * shares[0].count < ranks
    batches = sorted(j for w in range(workers) for j in shares[0].worker_batches(w))
    assert batches == list(range(shares[0].num_batches))
