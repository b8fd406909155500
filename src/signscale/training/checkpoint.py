"""Training checkpoints and model artefacts: tensors and plain data only, atomic, safe to load.

Both are written with ``torch.save`` into memory and published with one atomic storage write,
and read back with ``torch.load(weights_only=True)``, which refuses anything but tensors and
plain containers: loading a file from a bucket never executes code (timm and torchvision once
pickled argparse namespaces and now carry workarounds for it).

A run folder holds ``checkpoints/step-000123.pt`` files, ``checkpoints/best.pt``, and
``checkpoints/latest.json``, the index naming each with the sha256 of its bytes (written after them,
so it never points at a partial file; checked on load, so a damaged file is never trained on). A
model artefact is a folder with ``model.pt`` and ``model.json`` (metadata
plus the sha256 of ``model.pt``, checked on load).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import warnings
from typing import Any

import numpy as np
import torch

from signscale import storage

CHECKPOINT_FORMAT = 1
MODEL_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint or model that cannot be used; the message names the file and what to do."""


def to_bytes(obj: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_bytes(data: bytes, url: str) -> dict[str, Any]:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"{url}: not a readable signscale checkpoint/model ({type(exc).__name__}: {exc}); "
                              "the file is corrupt or was not written by signscale") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{url}: unexpected content (not a mapping)")
    return obj


# ---------------------------------------------------------------------------------------------
# RNG state as plain data


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                      *np_state[2:]],
            "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Training checkpoints
#
# ``latest.json`` is the folder's index, written after every file it names: the newest checkpoint
# (``path``, ``step``, ``sha256``), every kept one (``checkpoints``, oldest first) and ``best``, each
# with the sha256 of its bytes as written. Loading checks that sha256, so a flipped byte is caught
# before it is trained on, and ``--resume=auto`` can fall back to the newest checkpoint still intact.

INDEX = "latest.json"


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped or could not be verified; training goes on from another one."""


def save_checkpoint(run_dir: str, step: int, state: dict[str, Any], *, keep_last: int = 3, best: bool = False
                    ) -> str:
    """Write ``checkpoints/step-N.pt`` (and ``best.pt``) atomically, then the index, then delete the files it
    dropped: those beyond ``keep_last``, and later steps of a timeline this run abandoned by resuming from
    an older checkpoint."""
    ck_dir = storage.join(run_dir, "checkpoints")
    name = f"step-{step:09d}.pt"
    data = to_bytes({"format": CHECKPOINT_FORMAT, "step": step, **state})
    entry = {"path": name, "step": step, "sha256": storage.write_bytes(storage.join(ck_dir, name), data)}
    old = _read_index_quietly(ck_dir)
    best_entry = old.get("best")
    if best:
        best_entry = {"path": "best.pt", "step": step,
                      "sha256": storage.write_bytes(storage.join(ck_dir, "best.pt"), data)}
    kept = [e for e in _entries(old) if e["step"] < step] + [entry]
    if keep_last > 0:
        kept = kept[-keep_last:]
    index: dict[str, Any] = {**entry, "checkpoints": kept}
    if best_entry:
        index["best"] = best_entry
    storage.write_json(storage.join(ck_dir, INDEX), index)
    # only files the index named go: after an unreadable index nothing says which files are whose
    for e in _entries(old):
        if e["path"] not in {k["path"] for k in kept}:
            storage.delete(storage.join(ck_dir, e["path"]))
    return storage.join(ck_dir, name)


def repair_best(run_dir: str) -> str:
    """Check ``best.pt`` against the index; a damaged or missing one is written back from the kept checkpoint
    of the same step (the same bytes). Returns what was found and done ('' when it is intact or absent).

    Called when a run starts in its folder, so a flipped byte in ``best.pt`` is not carried to the end of
    the run unnoticed. When no kept checkpoint holds its bytes, the message is a warning naming the file.
    """
    ck_dir = storage.join(run_dir, "checkpoints")
    index = _read_index_quietly(ck_dir)
    entry, url = index.get("best"), storage.join(ck_dir, "best.pt")
    if not entry or (storage.exists(url) and hashlib.sha256(storage.read_bytes(url)).hexdigest() == entry["sha256"]):
        return ""
    for e in _entries(index):
        if e["sha256"] == entry["sha256"] and storage.exists(storage.join(ck_dir, e["path"])):
            data = storage.read_bytes(storage.join(ck_dir, e["path"]))
            if hashlib.sha256(data).hexdigest() == entry["sha256"]:
                storage.write_bytes(url, data)
                return f"{url} was damaged or missing: written back from {e['path']} (the same step, intact)"
    return (f"warning: {url} (step {entry['step']}) is damaged or missing and no kept checkpoint holds its "
            "bytes: the run's next better validation writes a new one; the model folder written at the end is "
            "unaffected")


def _entries(index: dict[str, Any]) -> list[dict[str, Any]]:
    """The kept checkpoints, oldest first (an index written before the list existed names only the newest)."""
    if "checkpoints" in index:
        return sorted(index["checkpoints"], key=lambda e: int(e["step"]))
    return [{k: index[k] for k in ("path", "step", "sha256")}] if "path" in index else []


def _read_index(ck_dir: str) -> dict[str, Any] | None:
    """The folder's index, None when there is none; CheckpointError when it cannot be read."""
    url = storage.join(ck_dir, INDEX)
    if not storage.exists(url):
        return None
    try:
        index = json.loads(storage.read_bytes(url))
        if not isinstance(index, dict):
            raise TypeError("not a mapping")
        _entries(index)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{url}: unreadable ({exc}); the checkpoints it indexes cannot be verified. "
                              "Resume from one of them explicitly with --resume=URL (loaded unverified), or "
                              "start a new run") from None
    return index


def _read_index_quietly(ck_dir: str) -> dict[str, Any]:
    """The index a save extends ({} when there is none, or it cannot be read: the save replaces it)."""
    try:
        return _read_index(ck_dir) or {}
    except CheckpointError:
        return {}


def _problem(url: str, sha256: str) -> str:
    """Why the file at ``url`` is not the one recorded with ``sha256`` ("" when it is)."""
    if not storage.exists(url):
        return "missing"
    actual = storage.sha256_of(url)
    if actual != sha256:
        return f"corrupt: sha256 {actual[:12]}... differs from {sha256[:12]}... recorded when it was written"
    return ""


def latest_checkpoint(run_dir: str) -> str | None:
    """URL of the newest intact checkpoint in ``run_dir``, or None when the run has none.

    Each kept checkpoint is checked against the sha256 the index recorded; a damaged one is named in a
    warning and the next older one is tried. When none is intact, CheckpointError names each file.
    """
    ck_dir = storage.join(run_dir, "checkpoints")
    index = _read_index(ck_dir)
    if index is None:
        return None
    bad: list[str] = []
    for e in reversed(_entries(index)):
        url = storage.join(ck_dir, e["path"])
        why = _problem(url, e["sha256"])
        if not why:
            if bad:
                warnings.warn(f"{'; '.join(bad)}; resuming from {url} instead, the newest intact checkpoint",
                              CheckpointWarning, stacklevel=2)
            return url
        bad.append(f"{url} is {why}")
    raise CheckpointError(f"no intact checkpoint in {ck_dir}: {'; '.join(bad) or 'the index lists none'}. "
                          "Restore the files from a copy, or start a new run (without --resume, or with another "
                          "--out)")


def _recorded_sha(url: str) -> str | None:
    """The sha256 the index beside ``url`` recorded for it, or None (no index, or not listed there)."""
    ck_dir, name = url.rsplit("/", 1) if "/" in url else (".", url)
    try:
        index = _read_index(ck_dir)
    except CheckpointError as exc:
        warnings.warn(f"{url}: loaded unverified: {exc}", CheckpointWarning, stacklevel=3)
        return None
    if index is None:
        return None
    for e in [*_entries(index), index.get("best") or {}]:
        if e.get("path") == name:
            return str(e["sha256"])
    return None


def load_checkpoint(url: str) -> dict[str, Any]:
    """A checkpoint's state, checked against the sha256 its folder's index recorded when it was written."""
    if not storage.exists(url):
        raise CheckpointError(f"{url}: no such checkpoint")
    data = storage.read_bytes(url)
    expect = _recorded_sha(url)
    if expect is not None and hashlib.sha256(data).hexdigest() != expect:
        raise CheckpointError(f"{url}: corrupt: its sha256 differs from the one {INDEX} recorded when it was "
                              "written. Resume with --resume=auto (the newest intact checkpoint) or from another "
                              "checkpoint of the run")
    if expect is None:
        warnings.warn(f"{url}: no sha256 recorded for it in {INDEX}; loaded unverified", CheckpointWarning,
                      stacklevel=2)
    obj = from_bytes(data, url)
    if obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{url}: checkpoint format {obj.get('format')!r} is not supported by this signscale "
                              f"(reads {CHECKPOINT_FORMAT}); resume with the version that wrote it")
    return obj


# ---------------------------------------------------------------------------------------------
# Model artefacts


def save_model(url: str, *, state_dict: dict[str, torch.Tensor], model_config: dict[str, Any],
               label_space: dict[str, Any], preprocess: dict[str, Any], metrics: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> str:
    """Write a model artefact folder (``model.pt`` then ``model.json``); returns the folder URL."""
    meta = {"format": "signscale.model", "format_version": MODEL_FORMAT, "model_config": model_config,
            "label_space": label_space, "preprocess": preprocess, "metrics": metrics or {}, **(extra or {})}
    weights = to_bytes({"format": MODEL_FORMAT, "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
                        "meta_json": json.dumps(meta)})
    sha = storage.write_bytes(storage.join(url, "model.pt"), weights)
    storage.write_json(storage.join(url, "model.json"), {**meta, "sha256": sha, "bytes": len(weights)})
    return url


def load_model_artefact(url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata) of a model artefact, checksum-verified."""
    url = url[: -len("/model.pt")] if url.endswith("/model.pt") else url.rstrip("/")
    meta_url = storage.join(url, "model.json")
    if not storage.exists(meta_url):
        raise CheckpointError(f"{url}: no model.json; is this a signscale model folder?")
    meta = storage.read_json(meta_url)
    if meta.get("format") != "signscale.model" or meta.get("format_version") != MODEL_FORMAT:
        raise CheckpointError(f"{meta_url}: model format {meta.get('format_version')!r} is not supported "
                              f"(this signscale reads {MODEL_FORMAT})")
    data = storage.read_bytes(storage.join(url, "model.pt"))
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"{url}/model.pt: sha256 does not match model.json (corrupt or replaced)")
    obj = from_bytes(data, storage.join(url, "model.pt"))
    return obj["state_dict"], meta


def load_model(url: str, *, classifier: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(network in eval mode, metadata) of a model artefact, checksum-verified: the one loader that
    predict, evaluate, the gate, the detector's second stage and the benchmarks build on.

    ``classifier``: refuse a detector's folder (the caller needs a classifier), naming it.
    """
    from signscale.models import rebuild

    state, meta = load_model_artefact(url)
    if classifier and meta.get("kind") == "signscale.detector":
        raise CheckpointError(f"{url} is a detector model; give a classifier model folder")
    model = rebuild(meta["model_config"])
    model.load_state_dict(state)
    return model.eval(), meta
