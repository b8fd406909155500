"""Fault injection: real ``python -m signscale`` processes SIGKILLed at seeded points, then resumed.

Each command (``pack``, ``train``, ``ingest``) first runs uninterrupted (the reference) while its output
folder is watched; the watch counts E observable changes (files appearing, growing, being replaced).
Then ``SIGNSCALE_FAULT_KILLS`` fault runs (default 2) each start the same command on a fresh output,
SIGKILL it at the k-th observed change (k drawn from a seeded generator, 1 <= k <= E: a kill point
chosen by progress, not by wall-clock), re-run the same command until it completes, and compare the
result with the reference: byte-identical shards, manifests equal except timestamps, the same metrics
lines (wall-clock fields excluded), tensor-equal weights, the same dataset version with every upload
once, and no temporary file left behind. The last fault run also kills its first resume, so a resume
of a resume is exercised too.

``SIGNSCALE_FAULT_SEED`` changes the kill points; each fault run prints what it did (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import signscale
from signscale import images, storage

KILLS = int(os.environ.get("SIGNSCALE_FAULT_KILLS", "2"))
SEED = int(os.environ.get("SIGNSCALE_FAULT_SEED", "19"))
# keys whose values are wall-clock readings, the only ones allowed to differ from the reference
WALL_CLOCK = frozenset({"created", "changed", "seconds", "samples_per_s", "data_wait_frac", "data_wait_s",
                        "loop_s", "peak_memory_mb"})
TIMEOUT_S = 240  # a bound on one process, not a synchronisation: a hung process fails the test

# each case runs 3 + 2 x KILLS real processes (a few seconds each on an idle machine, minutes on a loaded one)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600 + 300 * KILLS)]


# ---------------------------------------------------------------------------------------------
# Running, watching and killing real processes


def _env() -> dict[str, str]:
    """The child runs the same signscale as this test (the worktree's src/ when PYTHONPATH points there)."""
    src = str(Path(signscale.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "signscale", *args]


@dataclass
class Watched:
    """One watched process: how many changes were seen, whether it was killed, and the state it died in."""

    changes: int
    killed: bool
    rc: int
    state: str


def _tree(root: Path) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime) of every file under root: any write, rename or deletion changes it."""
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue  # renamed or pruned while we looked
            out.append((os.path.relpath(p, root), st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


def _watch(cmd: list[str], observe: Callable[[], Hashable], log: Path, kill_at: int = 0, *,
           describe: Callable[[Hashable], str] | None = None, pause: float = 0.002) -> Watched:
    """Run ``cmd``; count changes of ``observe()``; SIGKILL at the ``kill_at``-th one (0: never).

    ``pause``: the short yield between looks (not a timed wait): the child needs the CPU more than the
    watcher, but a kill must land within the few milliseconds a crash window lasts.
    """
    describe = describe or _describe
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env())
    last, changes = observe(), 0
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{cmd[3]} ran longer than {TIMEOUT_S}s; log: {log.read_text()[-2000:]}")
            cur = observe()
            if cur != last:
                changes, last = changes + 1, cur
                if changes == kill_at:
                    proc.kill()  # SIGKILL: nothing in the child gets to clean up
                    proc.wait()
                    return Watched(changes, True, proc.returncode, describe(cur))
            select.select([], [], [], pause)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Watched(changes, False, proc.returncode, describe(last))


def _describe(state: Hashable) -> str:
    if isinstance(state, tuple) and state and isinstance(state[0], tuple) and isinstance(state[0][0], str):
        names = [s[0] for s in state]
        tmp = [n for n in names if ".tmp-" in n]
        return (
            f"{len(names)} files" + (f", temp {tmp}" if tmp else "") + f", newest {max(state, key=lambda s: s[2])[0]}"
        )
    return repr(state)


def _complete(cmd: list[str], log: Path) -> None:
    with open(log, "ab") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), timeout=TIMEOUT_S,
                              check=False)
    assert proc.returncode == 0, log.read_text()[-3000:]


def fault_runs(name: str, tmp_path: Path, *, reference: Path, prepare: Callable[[Path], list[str]],
               observe: Callable[[Path], Hashable], compare: Callable[[Path, Path], None],
               describe: Callable[[Path], str] | None = None, pause: float = 0.002) -> list[str]:
    """The reference run, then KILLS fault runs (kill at a seeded point, resume, compare).

    ``prepare(out)`` readies a fresh output and returns the command; ``observe(out)`` is what a kill
    point is counted on; ``compare(ref, out)`` asserts equality. A kill point is a seeded fraction of
    the reference's observed changes (k = 1 + floor(fraction x E)). Prints and returns one line per run.
    """
    cmd = prepare(reference)
    ref = _watch(cmd, lambda: observe(reference), tmp_path / f"{name}-ref.log", pause=pause)
    assert ref.rc == 0 and ref.changes > 0, (tmp_path / f"{name}-ref.log").read_text()[-3000:]
    rng = np.random.default_rng([SEED, sum(map(ord, name))])
    lines = [f"{name}: reference run, {ref.changes} observed changes"]
    print(lines[0])
    for i in range(KILLS):
        out = tmp_path / f"{name}-fault{i}"
        cmd = prepare(out)
        log = tmp_path / f"{name}-fault{i}.log"
        fractions = [rng.random()] + ([rng.random()] if i == KILLS - 1 else [])  # the last also kills a resume
        events = []
        for f in fractions:
            k = 1 + int(f * ref.changes)
            w = _watch(cmd, lambda out=out: observe(out), log, kill_at=k, pause=pause,
                       describe=(lambda _, out=out: describe(out)) if describe else None)
            assert w.rc in (0, -9), log.read_text()[-3000:]
            events.append(f"k={k} ({f:.0%}): " + (f"SIGKILL at {w.state}" if w.killed else
                                                  f"no kill, finished after {w.changes} changes"))
        _complete(cmd, log)  # resume / re-run to completion
        head = f"{name} fault run {i}: " + "; ".join(events) + " -> resumed to completion"
        try:
            compare(reference, out)
        except AssertionError as exc:
            print(head + ": DIFFERS")
            raise AssertionError(f"{head}: differs from the uninterrupted run: {exc}") from None
        lines.append(head + ": equal to the reference")
        print(lines[-1])
    return lines


# ---------------------------------------------------------------------------------------------
# Comparing outputs


def _without_wall_clock(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_wall_clock(v) for k, v in obj.items() if k not in WALL_CLOCK}
    if isinstance(obj, list):
        return [_without_wall_clock(v) for v in obj]
    return obj


def _text(p: Path, root: Path | None) -> str:
    """The file's text with its output folder's own path replaced (a manifest records where it was written)."""
    text = p.read_text()
    return text.replace(str(root), "<out>") if root is not None else text


def _json(p: Path, root: Path | None = None) -> Any:
    return _without_wall_clock(json.loads(_text(p, root)))


def _jsonl(p: Path, root: Path | None = None) -> list[Any]:
    return [_without_wall_clock(json.loads(line)) for line in _text(p, root).splitlines() if line.strip()]


def _files(root: Path, under: str = "", *, temps: bool = False) -> dict[str, Path]:
    """Files under root (relative path -> path); temporary files (``.NAME.tmp-*``) only with temps=True."""
    base = root / under if under else root
    return {str(p.relative_to(root)): p for p in sorted(base.rglob("*"))
            if p.is_file() and (temps or ".tmp-" not in p.name)}


def _temp_files(root: Path) -> list[str]:
    return [n for n in _files(root, temps=True) if ".tmp-" in n]


def _same_bytes(ref: Path, out: Path, under: str) -> None:
    a, b = _files(ref, under), _files(out, under)
    assert sorted(a) == sorted(b), f"{under}: files differ: {sorted(set(a) ^ set(b))}"
    for rel, p in a.items():
        assert p.read_bytes() == b[rel].read_bytes(), f"{rel}: bytes differ from the uninterrupted run"


# ---------------------------------------------------------------------------------------------
# pack


PACK_SPEC = "synthetic:?n=600&size=16&seed=3"


def test_pack_killed_anywhere_resumes_to_the_same_dataset(tmp_path):
    """24 shards; kills land between and inside shard and chunk-record writes."""

    def prepare(out: Path) -> list[str]:
        # workers=0: decode in the packing process (a killed pack's orphaned decode workers are issue 19 item 4)
        return _cli("pack", PACK_SPEC, str(out), "--image-size", "16", "--shard-mb", "0.02", "--workers", "0",
                    "progress=false")

    def compare(ref: Path, out: Path) -> None:
        assert (out / "manifest.json").exists()
        _same_bytes(ref, out, "shards")
        assert _json(out / "manifest.json", out) == _json(ref / "manifest.json", ref)
        assert (out / "quarantine.jsonl").read_bytes() == (ref / "quarantine.jsonl").read_bytes()
        # stale temp files of the killed run are not compared: removing them is issue 19 item 4
        assert set(_files(out)) == set(_files(ref)), sorted(set(_files(out)) ^ set(_files(ref)))

    fault_runs("pack", tmp_path, reference=tmp_path / "pack-ref", prepare=prepare, observe=_tree, compare=compare)


# ---------------------------------------------------------------------------------------------
# train


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> tuple[str, str]:
    from signscale.data.pack import PackConfig, pack

    root = tmp_path_factory.mktemp("faults-data")
    for name, n, seed in (("train", 256, 1), ("val", 400, 2)):
        pack(
            PackConfig(
                source=f"synthetic:?n={n}&size=16&seed={seed}",
                out=str(root / name),
                image_size=16,
                shard_mb=0.2,
                workers=0,
                progress=False,
            )
        )
    return str(root / "train"), str(root / "val")


def _stat(p: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def _checkpoints(out: Path) -> Hashable:
    """Each checkpoint (latest.json replaced): a kill lands right after one, where a crash costs the most
    (its metrics lines not yet flushed, or its epoch's validation not yet run)."""
    return _stat(out / "checkpoints" / "latest.json")


def _train_progress(out: Path) -> str:
    step = json.loads((out / "checkpoints" / "latest.json").read_text())["step"]
    lines = (out / "metrics.jsonl").read_text().count("\n") if (out / "metrics.jsonl").exists() else 0
    return f"checkpoint step {step}, {lines} metrics lines on disk"


def _weights(p: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(p, map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else obj


def _tensor_equal(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: different tensors"
    for k, t in a.items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, b[k]), f"{what}: {k} differs from the uninterrupted run"


def _compare_train(ref: Path, out: Path) -> None:
    ref_lines, out_lines = _jsonl(ref / "metrics.jsonl"), _jsonl(out / "metrics.jsonl")
    assert out_lines == ref_lines, (
        f"metrics.jsonl: {len(out_lines)} lines vs {len(ref_lines)}; steps missing: "
        f"{sorted({json.dumps(x) for x in ref_lines} - {json.dumps(x) for x in out_lines})[:4]}"
    )
    _tensor_equal(_weights(ref / "model" / "model.pt"), _weights(out / "model" / "model.pt"), "model/model.pt")
    _tensor_equal(_weights(ref / "checkpoints" / "best.pt"), _weights(out / "checkpoints" / "best.pt"), "best.pt")
    assert _json(out / "model" / "model.json")["metrics"] == _json(ref / "model" / "model.json")["metrics"]
    r_ref, r_out = _json(ref / "result.json"), _json(out / "result.json")
    for key in ("steps", "epochs", "curve", "best_val_acc", "final_val_acc"):
        assert r_out[key] == r_ref[key], f"result.json {key}: {r_out[key]} vs {r_ref[key]}"
    assert not _temp_files(out), _temp_files(out)


def _train_prepare(train_data: tuple[str, str]) -> Callable[[Path], list[str]]:
    data, val = train_data

    def prepare(out: Path) -> list[str]:
        # 16 steps per epoch; a checkpoint every 4 steps, so also at each epoch's last step just before its
        # validation, and one after the validation
        return _cli("train", f"data={data}", f"val={val}", f"out={out}", "model=small_cnn", "batch_size=16",
                    "epochs=2", "checkpoint_every=4", "log_every=1", "workers=0", "threads=1", "ema=0.99",
                    "lr=0.01", "progress=false", "resume=auto")
    return prepare


def test_train_killed_after_checkpoints_resumes_to_the_same_run(train_data, tmp_path):
    """Kills land right after a checkpoint (before its metrics are flushed, or before its epoch's
    validation); the resumed run must equal the uninterrupted one: metrics lines, curve, weights."""
    fault_runs("train", tmp_path, reference=tmp_path / "train-ref", prepare=_train_prepare(train_data),
               observe=_checkpoints, compare=_compare_train, describe=_train_progress, pause=0.0002)


# ---------------------------------------------------------------------------------------------
# ingest


def _upload(inbox: Path, n: int, seed: int) -> list[str]:
    """n labelled uploads (PNG + sidecar), two re-sent copies and one broken file; returns the good keys."""
    from signscale.data.sources import open_source

    src = open_source(f"synthetic:?n={n}&size=16&seed={seed}&weather=0")
    keys = []
    for i in range(n):
        s = src.read(i)
        key = f"veh-{i % 3:02d}/{i:04d}.png"
        storage.write_bytes(str(inbox / key), images.encode_png(s.image))
        storage.write_json(str(inbox / key).replace(".png", ".json"),
                           {"label": int(s.label), "vehicle": f"veh-{i % 3:02d}", "condition": "snow"})
        keys.append(key)
    os.makedirs(inbox / "resent")
    for j in (0, 1):  # re-sent copies: dropped as duplicates
        shutil.copy(inbox / keys[j], inbox / "resent" / f"{j}.png")
    (inbox / "resent" / "broken.png").write_bytes(b"\x89PNG truncated")  # quarantined
    return keys


def _compare_ingest(ref: Path, out: Path, good_keys: list[str]) -> None:
    from signscale.continual.ingest import key_id, list_inbox
    from signscale.data import datasets
    from signscale.data.manifest import Manifest

    assert not _temp_files(out), f"temporary files left: {_temp_files(out)}"
    assert sorted(_files(out, temps=True)) == sorted(_files(ref)), sorted(set(_files(out)) ^ set(_files(ref)))
    h_ref, h_out = datasets.head(str(ref)), datasets.head(str(out))
    assert (h_out.version, h_out.count, h_out.checksum) == (h_ref.version, h_ref.count, h_ref.checksum) \
        and h_out.version == 2
    # every file: byte-identical, or (JSON) equal except wall-clock fields
    for rel, p in _files(ref).items():
        q = out / rel
        if rel.endswith((".json", "HEAD")):
            assert _json(q, out) == _json(p, ref), rel
        elif rel.endswith(".jsonl"):
            assert _jsonl(q, out) == _jsonl(p, ref), rel
        else:
            assert q.read_bytes() == p.read_bytes(), rel
    # nothing lost, nothing twice: every inbox object is either a kept record or a quarantine line, once
    batch_dir = out / "batches" / "b000002"
    rows = _jsonl(batch_dir / "records.jsonl")  # kept uploads, labelled or not (unlabelled: not trained on)
    dropped = [q["key"] for q in _jsonl(batch_dir / "quarantine.jsonl")]
    assert sorted([r["key"] for r in rows] + dropped) == sorted(list_inbox(str(out.parent / "inbox")))
    assert set(good_keys) <= {r["key"] for r in rows} | set(dropped)
    ids = datasets.read_records(Manifest.load(str(batch_dir)))["id"]
    assert sorted(ids.tolist()) == sorted(key_id(r["key"]) for r in rows if r["label"] >= 0)
    again = subprocess.run(_cli("ingest", str(out.parent / "inbox"), "--dataset", str(out)), capture_output=True,
                           text=True, env=_env(), timeout=TIMEOUT_S, check=False)
    assert again.returncode == 0 and "nothing new" in again.stdout, again.stdout + again.stderr


def test_ingest_killed_anywhere_publishes_every_upload_exactly_once(base_dataset, tmp_path):
    """A local inbox of 40 uploads (+2 re-sent, 1 broken) in chunks of 4; kills land in the claim, in
    chunk writes, in the finalisation and around the publish."""
    inbox = tmp_path / "inbox"
    good = _upload(inbox, 40, seed=600)

    def prepare(out: Path) -> list[str]:
        shutil.copytree(base_dataset, out)
        return _cli("ingest", str(inbox), "--dataset", str(out), "--chunk", "4")

    fault_runs("ingest", tmp_path, reference=tmp_path / "ingest-ref", prepare=prepare, observe=_tree,
               compare=lambda ref, out: _compare_ingest(ref, out, good))
