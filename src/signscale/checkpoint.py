"""Training checkpoints and model artefacts: tensors and plain data only, atomic, safe to load.

Both are written with ``torch.save`` into memory and published with one atomic storage write,
and read back with ``torch.load(weights_only=True)``, which refuses anything but tensors and
plain containers: loading a file from a bucket never executes code (timm and torchvision once
pickled argparse namespaces and now carry workarounds for it).

A run folder holds ``checkpoints/step-000123.pt`` files, ``checkpoints/best.pt``, and
``checkpoints/latest.json`` naming the newest complete one (written after it, so it never points
at a partial file). A model artefact is a folder with ``model.pt`` and ``model.json`` (metadata
plus the sha256 of ``model.pt``, checked on load).
"""

from __future__ import annotations

import io
import json
import random
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


def save_checkpoint(run_dir: str, step: int, state: dict[str, Any], *, keep_last: int = 3, best: bool = False
                    ) -> str:
    """Write ``checkpoints/step-N.pt`` atomically, update ``latest.json`` after it, prune old ones."""
    ck_dir = storage.join(run_dir, "checkpoints")
    url = storage.join(ck_dir, f"step-{step:09d}.pt")
    payload = {"format": CHECKPOINT_FORMAT, "step": step, **state}
    sha = storage.write_bytes(url, to_bytes(payload))
    if best:
        storage.write_bytes(storage.join(ck_dir, "best.pt"), to_bytes(payload))
    storage.write_json(storage.join(ck_dir, "latest.json"), {"path": f"step-{step:09d}.pt", "step": step,
                                                             "sha256": sha})
    _prune(ck_dir, keep_last)
    return url


def _prune(ck_dir: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    steps = sorted(u for u in storage.listdir(ck_dir) if u.rsplit("/", 1)[-1].startswith("step-")
                   and u.endswith(".pt"))
    for old in steps[:-keep_last]:
        storage.delete(old)


def latest_checkpoint(run_dir: str) -> str | None:
    """URL of the newest complete checkpoint in ``run_dir``, or None."""
    ptr = storage.join(run_dir, "checkpoints", "latest.json")
    if not storage.exists(ptr):
        return None
    info = storage.read_json(ptr)
    return storage.join(run_dir, "checkpoints", info["path"])


def load_checkpoint(url: str) -> dict[str, Any]:
    if not storage.exists(url):
        raise CheckpointError(f"{url}: no such checkpoint")
    obj = from_bytes(storage.read_bytes(url), url)
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
    import hashlib

    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"{url}/model.pt: sha256 does not match model.json (corrupt or replaced)")
    obj = from_bytes(data, storage.join(url, "model.pt"))
    return obj["state_dict"], meta
