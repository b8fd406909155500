"""Ingest and dataset versions: exactly-once (also across a SIGKILL), validation, dedup, immutable versions."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from signscale import images, storage
from signscale.continual.ingest import IngestConfig, IngestError, ingest, list_inbox, pending
from signscale.continual.labelling import import_labels
from signscale.data import datasets
from signscale.data.manifest import Manifest
from signscale.data.sources import open_source

# modules these tests exercise through the ones they import (tests/test_layout.py)
COVERS = ("signscale.continual.dedup", "signscale.continual.label_noise", "signscale.continual.labelling")


def _copy(base: str, tmp_path, name: str = "ds") -> str:
    dst = str(tmp_path / name)
    shutil.copytree(base, dst)
    return dst


def upload(inbox: str, n: int, *, seed: int, prefix: str = "veh-01", label: bool = True,
           condition: str = "snow", vehicle: str | None = None) -> list[str]:
    """Write n synthetic sign images (PNG) with JSON sidecars into the inbox; returns their keys."""
    src = open_source(f"synthetic:?n={n}&size=16&seed={seed}&weather=0")
    keys = []
    for i in range(n):
        s = src.read(i)
        key = f"{prefix}/{seed}-{i:04d}.png"
        storage.write_bytes(storage.join(inbox, key), images.encode_png(s.image))
        side = {"vehicle": vehicle or prefix, "condition": condition, "time": f"2026-11-25T10:{i % 60:02d}:00Z",
                "gps": [52.5, 13.4]}
        if label:
            side["label"] = int(s.label)
        storage.write_json(storage.join(inbox, key[:-4] + ".json"), side)
        keys.append(key)
    return keys


def _file_sha(url: str) -> str:
    return hashlib.sha256(storage.read_bytes(url)).hexdigest()


def test_versions_are_appended_and_old_ones_never_change(base_dataset, tmp_path):
    ds, inbox = _copy(base_dataset, tmp_path), str(tmp_path / "inbox")
    v1_file, v1_sum = _file_sha(storage.join(ds, "manifest.json")), Manifest.load(ds).checksum()
    upload(inbox, 30, seed=100)
    r = ingest(IngestConfig(inbox=inbox, dataset=ds, chunk=8))
    assert (r.state, r.kept, r.version, r.new) == ("published", 30, 2, 30)
    v2 = datasets.head(ds)
    v2_file = _file_sha(storage.join(ds, "_versions", v2.name))
    assert v2.count == 120 + 30 and v2.counts["condition"] == {"clear": 120, "snow": 30}

    upload(inbox, 20, seed=200, prefix="veh-02", condition="fog")
    r3 = ingest(IngestConfig(inbox=inbox, dataset=ds, chunk=8))
    assert (r3.state, r3.kept, r3.version) == ("published", 20, 3)
    vs = datasets.versions(ds)
    assert [v.version for v in vs] == [1, 2, 3] and [v.count for v in vs] == [120, 150, 170]
    # old versions: same bytes, same checksums, still readable record for record
    assert _file_sha(storage.join(ds, "manifest.json")) == v1_file and vs[0].checksum == v1_sum
    assert _file_sha(storage.join(ds, "_versions", v2.name)) == v2_file and vs[1].checksum == v2.checksum
    assert datasets.resolve(f"{ds}@v2").checksum == v2.checksum
    assert vs[2].counts["condition"] == {"clear": 120, "snow": 30, "fog": 20}
    assert len(vs[2].parts) == 3 and vs[2].parts[0] == ds
    from signscale.data.stream import open_stream

    loader = open_stream(list(vs[2].parts), num_workers=0, batch_size=17, remainder="pad", shuffle=False)
    ids = np.concatenate([b["id"][~b["pad"]].numpy() for b in loader])
    assert len(ids) == 170
    m3 = vs[2].manifest()
    assert m3.count == 170 and len(m3.shards) == sum(len(Manifest.load(p).shards) for p in vs[2].parts)
    # the head pointer is the only thing that moved; nothing new: a no-op
    again = ingest(IngestConfig(inbox=inbox, dataset=ds))
    assert again.state == "empty" and datasets.head(ds).version == 3


def test_validation_dedup_and_protected_sets(base_dataset, tmp_path):
    ds, inbox = _copy(base_dataset, tmp_path), str(tmp_path / "inbox")
    protected = _copy(base_dataset, tmp_path, "golden")
    keys = upload(inbox, 12, seed=300)
    storage.write_bytes(storage.join(inbox, "veh-01/copy.png"), storage.read_bytes(storage.join(inbox, keys[0])))
    storage.write_json(storage.join(inbox, "veh-01/copy.json"), {"label": 3})
    storage.write_bytes(storage.join(inbox, "veh-01/broken.png"), b"\x89PNG not really")
    storage.write_bytes(storage.join(inbox, "veh-01/badside.png"), storage.read_bytes(storage.join(inbox, keys[1]))[:-1]
                        + b"\x00")
    storage.write_bytes(storage.join(inbox, "veh-01/badside.json"), b"{not json")
    storage.write_bytes(
        storage.join(inbox, "veh-01/badlabel.png"), images.encode_png(np.full((16, 16, 3), 90, np.uint8))
    )
    storage.write_json(storage.join(inbox, "veh-01/badlabel.json"), {"label": "speed_limit_999"})
    # a record of the existing dataset re-uploaded (near-duplicate), and one from the protected set
    rec = datasets.read_records(Manifest.load(ds))
    storage.write_bytes(storage.join(inbox, "veh-01/seen.png"), images.encode_png(rec["image"][5]))
    storage.write_json(storage.join(inbox, "veh-01/seen.json"), {"label": int(rec["label"][5])})
    storage.write_bytes(
        storage.join(inbox, "veh-01/nolabel.png"), images.encode_png(np.full((16, 16, 3), 30, np.uint8))
    )
    assert pending(IngestConfig(inbox=inbox, dataset=ds)) == 12 + 6
    r = ingest(IngestConfig(inbox=inbox, dataset=ds, protected=(protected,), chunk=5))
    assert r.by_reason == {"duplicate": 1, "not_an_image": 1, "bad_sidecar": 1, "label_out_of_range": 1,
                           "protected_set": 1}, r.by_reason
    assert (r.kept, r.unlabelled, r.state) == (12, 1, "published")
    q = [json.loads(x) for x in storage.read_text(storage.join(r.batch_url, "quarantine.jsonl")).splitlines()]
    assert {x["key"]: x["reason"] for x in q}["veh-01/broken.png"] == "not_an_image"
    # without the protected set the re-upload of an existing record is a near-duplicate
    ds2 = _copy(base_dataset, tmp_path, "ds2")
    r2 = ingest(IngestConfig(inbox=inbox, dataset=ds2, chunk=5))
    assert r2.by_reason.get("near_duplicate") == 1 and r2.kept == 12
    # unlabelled -> labelling queue -> re-imported once labelled -> ingested exactly once
    rows = [json.loads(x) for x in storage.read_text(r.queue).splitlines()]
    assert [x["key"] for x in rows] == ["veh-01/nolabel.png"]
    rows[0]["label"] = "stop"
    storage.write_bytes(str(tmp_path / "labelled.jsonl"), (json.dumps(rows[0]) + "\n").encode())
    assert import_labels(str(tmp_path / "labelled.jsonl"), inbox) == 1
    r3 = ingest(IngestConfig(inbox=inbox, dataset=ds))
    assert (r3.new, r3.kept, r3.version) == (1, 1, 3)
    assert ingest(IngestConfig(inbox=inbox, dataset=ds)).state == "empty"


def test_a_batch_over_the_quarantine_limit_is_never_published(base_dataset, tmp_path):
    ds, inbox = _copy(base_dataset, tmp_path), str(tmp_path / "inbox")
    upload(inbox, 2, seed=400)
    for i in range(5):
        storage.write_bytes(storage.join(inbox, f"junk/{i}.png"), b"garbage")
    r = ingest(IngestConfig(inbox=inbox, dataset=ds, max_quarantine=0.5))
    assert r.state == "rejected" and "5 of 7 objects unusable" in r.reason
    assert datasets.head(ds).version == 1 and datasets.versions(ds)[-1].count == 120


def test_publish_against_a_moved_head_fails(base_dataset, tmp_path):
    ds, inbox = _copy(base_dataset, tmp_path), str(tmp_path / "inbox")
    upload(inbox, 4, seed=500)
    a = ingest(IngestConfig(inbox=inbox, dataset=ds, publish=False))
    upload(inbox, 4, seed=501, prefix="veh-02")
    b = ingest(IngestConfig(inbox=inbox, dataset=ds, publish=False))
    assert (a.state, b.state) == ("staged", "staged") and a.batch != b.batch
    datasets.publish(ds, b.batch_url, expect=1)
    with pytest.raises(datasets.HeadMoved, match="head is version 2, expected 1"):
        datasets.publish(ds, a.batch_url, expect=1)
    assert datasets.publish(ds, a.batch_url).version == 3  # re-validated against the new head
    assert datasets.publish(ds, a.batch_url).version == 3  # idempotent


_KILLED_INGEST = textwrap.dedent("""
    import sys
    from signscale.continual.ingest import IngestConfig, ingest
    def on_chunk(done, total):
        print(f"chunk {done}/{total}", flush=True)
    ingest(IngestConfig(inbox=sys.argv[1], dataset=sys.argv[2], chunk=6, threads=2), on_chunk=on_chunk)
    print("finished", flush=True)
""")


@pytest.mark.slow
def test_exactly_once_across_a_sigkill(base_dataset, tmp_path, s3_bucket):
    """A real ingest process (inbox on the S3 server) is SIGKILLed mid-batch; the re-run resumes the same
    batch and the result equals an uninterrupted ingest: every object once, none lost, none twice."""
    inbox = s3_bucket + "/inbox"
    keys = upload(inbox, 48, seed=600)
    killed, reference = _copy(base_dataset, tmp_path, "killed"), _copy(base_dataset, tmp_path, "reference")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_INGEST, inbox, killed], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ))
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("chunk 3/"):
            proc.send_signal(signal.SIGKILL)  # dies somewhere inside chunk 4
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert datasets.head(killed).version == 1  # nothing published by the dead process
    r = ingest(IngestConfig(inbox=inbox, dataset=killed, chunk=6))
    assert r.resumed_chunks >= 3 and r.new == 48 and r.kept == 48 and r.version == 2
    ref = ingest(IngestConfig(inbox=inbox, dataset=reference, chunk=6))
    assert ref.resumed_chunks == 0
    a, b = Manifest.load(r.batch_url), Manifest.load(ref.batch_url)
    assert a.checksum() == b.checksum()  # byte-identical shards
    ids = datasets.read_records(a)["id"]
    assert len(ids) == len(set(ids.tolist())) == 48
    assert ingest(IngestConfig(inbox=inbox, dataset=killed)).state == "empty"
    assert sorted(list_inbox(inbox)) == sorted(keys)


_DIES_AT_RENAME = textwrap.dedent("""
    import os, signal, sys
    real, seen = os.replace, [0]
    def dying(src, dst, *args, **kwargs):
        # a real crash between writing a file's temp copy and renaming it into place
        if str(dst).endswith(sys.argv[3]):
            seen[0] += 1
            if seen[0] == int(sys.argv[4]):
                os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *args, **kwargs)
    os.replace = dying
    from signscale.continual.ingest import IngestConfig, ingest
    ingest(IngestConfig(inbox=sys.argv[1], dataset=sys.argv[2], chunk=4, threads=2))
""")


def _temps(root: str) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if ".tmp-" in f]


@pytest.mark.slow
@pytest.mark.parametrize("target,nth", [("chunk-00002.sgs", 1), ("/HEAD", 1), ("b000002.status.json", 2)],
                         ids=["inside-a-chunk", "publishing", "recording-the-publish"])
def test_a_run_killed_mid_write_is_finished_by_the_next_without_leftovers(base_dataset, tmp_path, target, nth):
    """SIGKILL with a temp file written but not yet renamed: inside a chunk, while moving HEAD (the batch is
    staged, not yet a version), and while recording 'published' (HEAD moved, status still 'staged'). The
    next run publishes the batch exactly once, records it and removes the dead run's temp files."""
    ds, inbox = _copy(base_dataset, tmp_path), str(tmp_path / "inbox")
    upload(inbox, 16, seed=800)
    proc = subprocess.run([sys.executable, "-c", _DIES_AT_RENAME, inbox, ds, target, str(nth)],
                          env=dict(os.environ), capture_output=True, text=True, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _temps(ds), "the kill should have left a temp file"
    r = ingest(IngestConfig(inbox=inbox, dataset=ds, chunk=4))
    assert (r.state, r.version, r.kept) == ("published", 2, 16), r.summary()
    assert [v.version for v in datasets.versions(ds)] == [1, 2] and datasets.head(ds).count == 120 + 16
    st = json.loads(storage.read_text(storage.join(ds, "_ingest", "b000002.status.json")))
    assert (st["state"], st["version"]) == ("published", 2)
    assert _temps(ds) == []
    ids = datasets.read_records(Manifest.load(r.batch_url))["id"]
    assert len(set(ids.tolist())) == len(ids) == 16
    assert ingest(IngestConfig(inbox=inbox, dataset=ds)).state == "empty"


def test_a_batch_staged_for_the_gate_is_not_published_by_a_later_run(base_dataset, tmp_path):
    """Only a batch whose plan asked for publishing is finished by the next run; one staged with
    publish=False (the continual loop) waits for the gate."""
    ds, inbox = _copy(base_dataset, tmp_path), str(tmp_path / "inbox")
    upload(inbox, 4, seed=900)
    a = ingest(IngestConfig(inbox=inbox, dataset=ds, publish=False))
    assert a.state == "staged"
    assert ingest(IngestConfig(inbox=inbox, dataset=ds)).state == "empty"
    assert datasets.head(ds).version == 1


class _Crash(Exception):
    pass


def test_a_batch_claimed_for_the_gate_is_not_published_past_it_by_a_run_that_resumes_it(base_dataset, tmp_path):
    """The continual loop claims its batches with publish=False: the gate decides. When it dies mid-batch, a
    plain (publishing) ingest must not finish that batch and publish it without the gate; it says whose
    batch it is, and the loop's own re-run still finishes it, staged for the gate."""
    ds, inbox = _copy(base_dataset, tmp_path), str(tmp_path / "inbox")
    upload(inbox, 8, seed=950)

    def dies_after_the_first_chunk(done: int, total: int) -> None:
        raise _Crash

    with pytest.raises(_Crash):
        ingest(IngestConfig(inbox=inbox, dataset=ds, chunk=4, publish=False), on_chunk=dies_after_the_first_chunk)
    with pytest.raises(IngestError, match="b000002 .*publish=False.*signscale continual run"):
        ingest(IngestConfig(inbox=inbox, dataset=ds, chunk=4))
    assert datasets.head(ds).version == 1
    r = ingest(IngestConfig(inbox=inbox, dataset=ds, chunk=4, publish=False))
    assert (r.batch, r.state, r.resumed_chunks, r.kept) == ("b000002", "staged", 1, 8), r.summary()
    assert datasets.head(ds).version == 1


def test_label_noise_estimates_the_share_of_wrong_labels_and_names_the_vehicle():
    rng = np.random.default_rng(0)
    n = 600
    truth = rng.integers(0, 43, n)
    vehicles = [f"veh-{i % 3}" for i in range(n)]  # veh-0, veh-1, veh-2 evenly
    labels = truth.copy()
    bad = np.array([v == "veh-2" for v in vehicles]) & (rng.random(n) < 0.9)
    labels[bad] = (truth[bad] + rng.integers(1, 43, bad.sum())) % 43  # veh-2 mislabels 90% of its images
    conf = np.where(rng.random(n) < 0.5, 0.95, 0.4).astype(np.float32)  # the model is sure of half
    from signscale.continual.label_noise import label_noise

    r = label_noise(labels, truth, conf, vehicles, confidence=0.9)
    assert r["suspicious"] == ["veh-2"]
    assert r["rate"] == pytest.approx(bad.mean(), abs=0.05)  # ~30% of the batch, measured on the confident half
    assert r["per_vehicle"]["veh-0"]["flagged"] == 0 and r["per_vehicle"]["veh-2"]["rate"] > 0.8
    assert r["flags"].sum() == r["flagged"] and not (r["flags"] & (conf < 0.9)).any()
    unlabelled = np.full(n, -1)
    assert label_noise(unlabelled, truth, conf, vehicles, confidence=0.9)["rate"] == 0.0


def test_an_unknown_noise_condition_is_refused_not_dropped(tmp_path):
    # a typo used to be dropped silently: ("snwo",) trusted no condition, so nothing was ever flagged
    from signscale.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        IngestConfig(inbox=str(tmp_path / "in"), dataset=str(tmp_path / "ds"), noise_conditions=("clear", "snwo"))
    msg = str(exc.value)
    assert "noise_conditions" in msg and "'snwo'" in msg and "'clear'" not in msg and "snow" in msg
    with pytest.raises(ConfigError, match="noise_conditions: a tuple of condition names, got the string 'clear'"):
        IngestConfig(inbox=str(tmp_path / "in"), dataset=str(tmp_path / "ds"), noise_conditions="clear")  # type: ignore[arg-type]
    ok = IngestConfig(inbox=str(tmp_path / "in"), dataset=str(tmp_path / "ds"), noise_conditions=("clear", "snow"))
    assert ok.noise_conditions == ("clear", "snow")


def test_cli_ingest_and_data_versions(base_dataset, tmp_path, capsys):
    from signscale.cli import main

    ds, inbox = _copy(base_dataset, tmp_path), str(tmp_path / "inbox")
    upload(inbox, 6, seed=700)
    assert main(["ingest", inbox, "--dataset", ds]) == 0
    assert "6 kept" in capsys.readouterr().out
    assert main(["data", "versions", ds]) == 0
    out = capsys.readouterr().out
    assert "v2" in out and "126" in out and "snow" in out
    assert main(["ingest", inbox, "--dataset", str(tmp_path / "nowhere")]) == 2
    assert "no manifest.json" in capsys.readouterr().out
