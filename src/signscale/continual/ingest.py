"""``ingest(IngestConfig) -> IngestResult``: new objects in an inbox -> a validated, deduplicated batch.

The inbox is a prefix on any storage URL where vehicles upload sign images (PNG/JPEG/PPM), each
optionally with a JSON sidecar of the same name (``img_001.png`` + ``img_001.json``)::

    {"label": 14 | "stop", "vehicle": "veh-07", "time": "...", "gps": [52.5, 13.4], "condition": "snow",
     "country": "de", "track": "...", "roi": [x1, y1, x2, y2], "prediction": 14, "confidence": 0.93,
     "unsure": false}

Every field is optional; an image without a label is kept for the labelling queue (:mod:`.labelling`), not
for training.
Unlabelled images go to the queue when a model is unsure of them: the server's (calibrated)
confidence is below ``queue_confidence``, the on-board model disagrees with the server, or the
vehicle's predictor answered ``"unsure": true`` (``predict``/``serve --min-confidence``): an edge
case is exactly where the models are unsure.

**Exactly once.** Before any work, a batch *claims* the inbox keys it will process by writing its
plan (``DATASET/_ingest/b000002.plan.json``) with a create-only conditional write; the ledger is the
union of all plans, so every key belongs to exactly one batch, a re-run finds nothing new (a no-op),
and a crashed batch is resumed from its plan: chunks whose sidecar exists are kept, the rest redone.
Chunk output is deterministic, so a resumed batch is byte-identical to an uninterrupted one.

**Validation and deduplication** as in ``pack``: undecodable images, bad sidecars and unknown labels
are quarantined with a reason; exact duplicates (content hash of the uploaded bytes, against earlier
batches and within this one) and near-duplicates (64-bit difference hash within ``near_dup_bits``
of a record already in the dataset) are dropped and counted; anything matching a *protected* set (the
golden and never-regress evaluation sets) is dropped so uploads can never leak into them.

**Staging.** The batch is written as a packed dataset under ``DATASET/batches/<id>/`` (plus
``records.jsonl``: vehicle, time, GPS, condition, on-board and server predictions). It becomes part of
the dataset only when :func:`datasets.publish` moves the head; a rejected batch is never published.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np

from signscale import config as config_mod
from signscale import images, pointers, storage
from signscale.continual import label_noise, labelling
from signscale.continual.dedup import HashIndex, dataset_hashes, dhash, protected_index
from signscale.data import datasets, shards
from signscale.data.sources import CONDITIONS
from signscale.labels import COUNTRIES, LabelError, LabelSpace

INGEST_DIR = "_ingest"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".webp")
_BATCH_RE = re.compile(r"^(b\d{6})\.plan\.json$")


class IngestError(ValueError):
    """An ingest that cannot run as asked; the message names the inbox, dataset or batch."""


@dataclass(frozen=True)
class IngestConfig:
    """What to ingest, into which dataset, and how strictly."""

    inbox: str
    dataset: str
    max_objects: int = 0  # objects per batch (0: everything new)
    chunk: int = 256  # records per staging chunk: the resume granularity
    # difference-hash distance that counts as a near-duplicate (-1: off); at 32 px, 2 bits already matched
    # other tracks of the same class on GTSRB, so only a re-encoded or re-scaled copy (<= 1 bit) counts
    near_dup_bits: int = 1
    protected: tuple[str, ...] = ()  # packed datasets uploads may never enter (golden / never-regress sets)
    publish: bool = True  # publish a valid batch as a new dataset version at once
    max_quarantine: float = 0.5  # reject the batch when more of it than this is unusable
    model: str = ""  # model artefact or REGISTRY@alias: server predictions, label-noise check, labelling queue
    noise_confidence: float = 0.9  # label contradicted by the model at >= this confidence: flagged
    # conditions the model is reliable in (those of its training data); uploads in other conditions
    # (a first snow batch) are not used to estimate label noise: there the model is confidently wrong
    # for lack of data, not because the labels are. Empty: every condition.
    noise_conditions: tuple[str, ...] = ()
    max_noise: float = 0.1  # reject the batch when more than this fraction is flagged (needs model)
    queue_confidence: float = 0.6  # unlabelled below this confidence go to the labelling queue
    threads: int = 8  # parallel object reads (object stores)

    def __post_init__(self) -> None:
        if not self.inbox or not self.dataset:
            raise config_mod.ConfigError("inbox and dataset: both are required (signscale ingest INBOX --dataset URL)")
        if self.chunk < 1:
            raise config_mod.ConfigError(f"chunk: must be >= 1, got {self.chunk}")
        for name in ("max_quarantine", "max_noise", "noise_confidence", "queue_confidence"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise config_mod.ConfigError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        # an unknown name used to be dropped, which could switch the label-noise check off unnoticed
        if isinstance(self.noise_conditions, str):
            raise config_mod.ConfigError(f"noise_conditions: a tuple of condition names, got the string "
                                         f"{self.noise_conditions!r} (write ({self.noise_conditions!r},))")
        bad = [c for c in self.noise_conditions if c not in CONDITIONS]
        if bad:
            raise config_mod.ConfigError(f"noise_conditions: unknown condition(s) {', '.join(map(repr, bad))}; give a "
                                         f"tuple of: {', '.join(CONDITIONS)} (empty: every condition)")


@dataclass
class IngestResult:
    batch: str = ""  # batch id ("" when the inbox had nothing new)
    batch_url: str = ""
    listed: int = 0
    new: int = 0
    kept: int = 0
    unlabelled: int = 0
    quarantined: int = 0
    duplicates: int = 0
    near_duplicates: int = 0
    protected: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    resumed_chunks: int = 0
    state: str = "empty"  # empty | staged | published | rejected
    reason: str = ""
    version: int = 0  # the published dataset version
    noise: dict[str, Any] = field(default_factory=dict)  # flag rates per batch and per vehicle
    queue: str = ""  # labelling queue file (JSONL), if any
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def summary(self) -> str:
        if self.state == "empty":
            return f"nothing new in the inbox ({self.listed} object(s) listed, all already ingested)"
        drops = ", ".join(f"{k}={v}" for k, v in sorted(self.by_reason.items())) or "none"
        tail = f" -> dataset version {self.version}" if self.state == "published" else \
            (f": {self.reason}" if self.reason else "")
        noise = ""
        if self.noise:
            noise = f"; label-noise flags {self.noise['rate']:.1%}"
            if self.noise.get("suspicious"):
                noise += f" (suspicious: {', '.join(self.noise['suspicious'])})"
        return (f"batch {self.batch}: {self.new} new object(s), {self.kept} kept, {self.unlabelled} unlabelled, "
                f"dropped/quarantined: {drops}{noise}; {self.state}{tail}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def key_id(key: str) -> int:
    """Stable 63-bit record id of an inbox key (the record's ``id`` field)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


# ---------------------------------------------------------------------------------------------
# The ledger


def _ingest_dir(dataset: str) -> str:
    return storage.join(dataset, INGEST_DIR)


def _plans(dataset: str) -> dict[str, dict[str, Any]]:
    """Every batch plan (batch id -> plan), i.e. the ledger of claimed inbox keys."""
    try:
        urls = storage.listdir(_ingest_dir(dataset))
    except FileNotFoundError:
        return {}
    out = {}
    for u in urls:
        m = _BATCH_RE.match(u.rsplit("/", 1)[-1])
        if m:
            out[m.group(1)] = storage.read_json(u)
    return dict(sorted(out.items()))


def _status_url(dataset: str, batch: str) -> str:
    return storage.join(_ingest_dir(dataset), f"{batch}.status.json")


def batch_status(dataset: str, batch: str) -> dict[str, Any] | None:
    url = _status_url(dataset, batch)
    return storage.read_json(url) if storage.exists(url) else None


def set_status(dataset: str, batch: str, state: str, **fields: Any) -> None:
    """Record a batch's state (staged, published, rejected) with why."""
    prev = batch_status(dataset, batch) or {}
    storage.write_json(_status_url(dataset, batch), {**prev, **fields, "state": state, "batch": batch,
                                                      "changed": _now()})


def list_inbox(inbox: str) -> list[str]:
    """Image keys (relative to the inbox), sorted."""
    inbox = inbox.rstrip("/")
    try:
        found = storage.glob(storage.join(inbox, "**"))
    except FileNotFoundError:
        return []
    base = storage.filesystem(inbox)[1].rstrip("/") + "/"
    keys = []
    for u in found:
        path = storage.filesystem(u)[1]
        if path.startswith(base) and path.lower().endswith(IMAGE_EXTS):
            keys.append(path[len(base):])
    return sorted(set(keys))


def pending(cfg: IngestConfig) -> int:
    """How many inbox objects no batch has claimed yet (what ``continual watch`` polls)."""
    claimed = {k for p in _plans(cfg.dataset).values() for k in p["keys"]}
    return sum(1 for k in list_inbox(cfg.inbox) if k not in claimed)


def _claim(cfg: IngestConfig, keys: list[str]) -> tuple[str, dict[str, Any]]:
    """Claim ``keys`` as the next batch with a create-only plan; retries when another writer won the id."""
    while True:
        plans = _plans(cfg.dataset)
        claimed = {k for p in plans.values() for k in p["keys"]}
        todo = [k for k in keys if k not in claimed]
        if cfg.max_objects:
            todo = todo[: cfg.max_objects]
        n = max((int(b[1:]) for b in plans), default=1) + 1
        batch = f"b{n:06d}"
        # "publish": a run that dies between staging and publishing leaves the intent here, so the next
        # run finishes the publish (a batch staged with publish=False waits for the gate instead)
        plan = {"batch": batch, "inbox": cfg.inbox.rstrip("/"), "keys": todo, "created": _now(),
                "chunk": cfg.chunk, "publish": cfg.publish}
        try:
            pointers.write_pointer(storage.join(_ingest_dir(cfg.dataset), f"{batch}.plan.json"),
                                  json.dumps(plan).encode(), expect=None)
            return batch, plan
        except storage.PreconditionFailed:
            continue


# ---------------------------------------------------------------------------------------------
# One object -> one record (or a quarantine line)


@dataclass(frozen=True)
class _Item:
    key: str
    image: bytes | None
    sidecar: bytes | None
    error: str = ""


def _read_item(inbox: str, key: str) -> _Item:
    url = storage.join(inbox, key)
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        return _Item(key, None, None, "missing_file")
    side_url = storage.join(inbox, key.rsplit(".", 1)[0] + ".json")
    try:
        side = storage.read_bytes(side_url)
    except FileNotFoundError:
        side = None
    return _Item(key, data, side)


def _parse_label(value: Any, space: LabelSpace) -> int:
    if isinstance(value, bool):
        raise LabelError(f"label {value!r} is not a class id or key")
    if isinstance(value, int):
        return space.check_id(value, "sidecar 'label'")
    if isinstance(value, str):
        return space.check_id(int(value), "sidecar 'label'") if value.lstrip("-").isdigit() else space.index(value)
    raise LabelError(f"label {value!r} is not a class id or key")


def _process(item: _Item, dtype: np.dtype, size: int, space: LabelSpace) -> tuple[np.ndarray | None, dict[str, Any]]:
    """(record or None, info): info carries the sidecar fields, or the quarantine reason."""
    info: dict[str, Any] = {"key": item.key}
    if item.error:
        return None, {**info, "reason": item.error, "detail": ""}
    meta: dict[str, Any] = {}
    if item.sidecar is not None:
        try:
            meta = json.loads(item.sidecar)
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            return None, {**info, "reason": "bad_sidecar", "detail": f"{item.key.rsplit('.', 1)[0]}.json: {exc}"}
    try:
        arr = images.decode(item.image or b"")
        if meta.get("roi"):
            arr = images.crop_box(arr, tuple(float(v) for v in meta["roi"]))  # type: ignore[arg-type]
    except images.ImageError as exc:
        return None, {**info, "reason": exc.reason, "detail": exc.detail}
    condition = str(meta.get("condition", "clear"))
    country = str(meta.get("country", "de"))
    if condition not in CONDITIONS:
        return None, {**info, "reason": "unknown_condition", "detail": f"{condition!r}; known: {', '.join(CONDITIONS)}"}
    if country not in COUNTRIES:
        return None, {**info, "reason": "unknown_country", "detail": f"{country!r}; known: {', '.join(COUNTRIES)}"}
    label = -1
    if meta.get("label") is not None:
        try:
            label = _parse_label(meta["label"], space)
        except (LabelError, ValueError) as exc:
            return None, {**info, "reason": "label_out_of_range", "detail": str(exc)}
    onboard = meta.get("prediction")
    if onboard is not None:
        try:
            onboard = _parse_label(onboard, space)
        except (LabelError, ValueError):
            onboard = None
    rec = np.zeros((), dtype=dtype)
    rec["image"] = images.resize(arr, size)
    rec["id"] = key_id(item.key)
    rec["label"] = label
    rec["track"] = shards.track_hash(meta.get("track"))
    rec["roi"] = (-1, -1, -1, -1)
    rec["condition"] = CONDITIONS.index(condition)
    rec["country"] = COUNTRIES.index(country)
    rec["source"] = 0
    info.update(vehicle=str(meta.get("vehicle", "")), time=meta.get("time"), gps=meta.get("gps"),
                condition=condition, country=country, label=label, onboard=onboard,
                onboard_confidence=meta.get("confidence"), onboard_unsure=meta.get("unsure") is True,
                sha=hashlib.blake2b(item.image or b"", digest_size=8).hexdigest())
    return rec, info


# ---------------------------------------------------------------------------------------------
# Chunks: the resume unit


def _work_dir(batch_url: str) -> str:
    return storage.join(batch_url, "_work")


def _chunk_done(batch_url: str, c: int) -> dict[str, Any] | None:
    side = storage.join(_work_dir(batch_url), f"chunk-{c:05d}.json")
    if not storage.exists(side):
        return None
    d = storage.read_json(side)
    shard = storage.join(_work_dir(batch_url), f"chunk-{c:05d}.sgs")
    if not storage.exists(shard) or storage.sha256_of(shard) != d["sha256"]:
        return None
    return d


def _run_chunk(cfg: IngestConfig, batch_url: str, c: int, keys: list[str], dtype: np.dtype, size: int,
               space: LabelSpace, pool: ThreadPoolExecutor) -> dict[str, Any]:
    items = list(pool.map(lambda k: _read_item(cfg.inbox.rstrip("/"), k), keys))
    recs, infos = [], []
    for it in items:
        rec, info = _process(it, dtype, size, space)
        infos.append(info)
        if rec is not None:
            recs.append(rec)
    arr = np.array(recs, dtype=dtype) if recs else np.zeros(0, dtype=dtype)
    data = shards.encode_raw_shard(arr)
    sha = storage.write_bytes(storage.join(_work_dir(batch_url), f"chunk-{c:05d}.sgs"), data)
    side = {"chunk": c, "sha256": sha, "count": int(len(arr)), "infos": infos}
    storage.write_json(storage.join(_work_dir(batch_url), f"chunk-{c:05d}.json"), side)  # after the shard
    return side


def _chunk_records(batch_url: str, c: int) -> np.ndarray:
    return np.array(shards.ShardReader(storage.join(_work_dir(batch_url), f"chunk-{c:05d}.sgs")).records())


# ---------------------------------------------------------------------------------------------
# Dedup and predictions


def _known_hashes(dataset: str, plans: dict[str, dict[str, Any]], current: str) -> set[str]:
    """Content hashes of uploads kept by earlier batches (exact-duplicate check)."""
    out: set[str] = set()
    for b in plans:
        if b == current:
            continue
        url = storage.join(dataset, datasets.BATCHES_DIR, b, "records.jsonl")
        if storage.exists(url):
            rows = [json.loads(line) for line in storage.read_text(url).splitlines() if line.strip()]
            out.update(r["sha"] for r in rows if r["label"] >= 0)  # a relabelled copy of an unlabelled upload is new
    return out


def _model_url(spec: str) -> str:
    if "@" in spec and not storage.exists(storage.join(spec, "model.json")):
        from signscale.serving import registry

        return registry.resolve(spec)[1]
    return spec


# ---------------------------------------------------------------------------------------------
# ingest()


def ingest(cfg: IngestConfig, *, on_chunk: Callable[[int, int], None] | None = None) -> IngestResult:
    """Ingest new inbox objects into ``cfg.dataset`` as one batch; see the module docstring.

    ``on_chunk(done, total)`` is called after each staging chunk is written (progress; tests use it
    to know when to kill the process).
    """
    dataset = cfg.dataset.rstrip("/")
    head = datasets.head(dataset)
    base = head.manifest()
    if base.encoding != "raw" or not base.image_shape:
        raise IngestError(f"{dataset}: ingest appends raw-encoded records; the dataset is {base.encoding}")
    space, size = base.label_space, int(base.image_shape[0])
    dtype = shards.record_dtype("raw", base.image_shape)
    plans = _plans(dataset)
    result = IngestResult()
    statuses = {b: batch_status(dataset, b) for b in plans}
    # a valid batch whose run died before its publish was recorded: publishing it is all that is left
    for b, st in statuses.items():
        if st is not None and st["state"] == "staged" and plans[b].get("publish") and st.get("kept"):
            return _publish_staged(dataset, b, plans[b], st)
    # resume an unfinished batch before claiming new keys: its keys are already taken
    unfinished = [b for b, st in statuses.items() if st is None]
    if unfinished:
        batch, plan = unfinished[0], plans[unfinished[0]]
        if plan["inbox"] != cfg.inbox.rstrip("/"):
            raise IngestError(f"{dataset}: batch {batch} from inbox {plan['inbox']} is unfinished; "
                              f"finish it first: signscale ingest {plan['inbox']} --dataset {dataset}")
        if cfg.publish and not plan.get("publish", True):  # else it would be published past the gate
            raise IngestError(f"{dataset}: batch {batch} is unfinished and was claimed with publish=False, for the "
                              "gate to decide; finish it with the run that claimed it (signscale continual run)")
        result.listed = len(plan["keys"])
    else:
        keys = list_inbox(cfg.inbox)
        result.listed = len(keys)
        claimed = {k for p in plans.values() for k in p["keys"]}
        if not any(k not in claimed for k in keys):
            return result
        batch, plan = _claim(cfg, keys)
        if not plan["keys"]:
            return result
    keys = plan["keys"]
    chunk = int(plan.get("chunk", cfg.chunk))
    batch_url = storage.join(dataset, datasets.BATCHES_DIR, batch)
    result.batch, result.batch_url, result.new = batch, batch_url, len(keys)
    n_chunks = -(-len(keys) // chunk)
    sides = []
    with ThreadPoolExecutor(max(1, cfg.threads)) as pool:
        for c in range(n_chunks):
            side = _chunk_done(batch_url, c)
            if side is not None:
                result.resumed_chunks += 1
            else:
                side = _run_chunk(cfg, batch_url, c, keys[c * chunk:(c + 1) * chunk], dtype, size, space, pool)
            sides.append(side)
            if on_chunk is not None:
                on_chunk(c + 1, n_chunks)
    return _finalize(cfg, dataset, batch, batch_url, plans, sides, head, space, result)


def _finalize(cfg: IngestConfig, dataset: str, batch: str, batch_url: str, plans: dict[str, Any],
              sides: list[dict[str, Any]], head: datasets.DatasetVersion, space: LabelSpace,
              result: IngestResult) -> IngestResult:
    """Staged chunks -> the batch: dedup, predict, write its files, then judge (and publish) it. A run killed
    in here leaves no status, so the next run redoes this step from the same chunks, to the same bytes."""
    recs = [_chunk_records(batch_url, s["chunk"]) for s in sides]  # read back: a resumed batch sees the same
    records = np.concatenate(recs) if recs else np.zeros(0, dtype=shards.record_dtype("raw", (32, 32, 3)))
    good = [i for s in sides for i in s["infos"] if "reason" not in i]
    quarantine = [i for s in sides for i in s["infos"] if "reason" in i]
    assert len(good) == len(records)
    keep = _dedup(cfg, dataset, plans, batch, head, records, good, quarantine)
    labelled = keep & (records["label"] >= 0)
    unlabelled = keep & (records["label"] < 0)
    pred, conf = _server_predictions(cfg, records, keep)
    infos_kept = [{**info, "id": int(records["id"][i]), "server_prediction": int(pred[i]),
                   "server_confidence": round(float(conf[i]), 4)} for i, info in enumerate(good) if keep[i]]
    if cfg.model and labelled.any():
        result.noise = label_noise.flag_noise(records, labelled, pred, conf, good, infos_kept,
                                              confidence=cfg.noise_confidence, conditions=cfg.noise_conditions)
    storage.write_bytes(storage.join(batch_url, "records.jsonl"),
                        "".join(json.dumps(i) + "\n" for i in infos_kept).encode())
    result.queue = labelling.write_queue(batch_url, infos_kept, space, inbox=cfg.inbox, with_model=bool(cfg.model),
                                         queue_confidence=cfg.queue_confidence)
    dropped = ("duplicate", "near_duplicate", "protected_set")  # also in good: counted once as an object
    m = datasets.write_dataset(batch_url, records[labelled], label_space=space, name=f"{head.manifest().name}-{batch}",
                               source={"kind": "ingest", "inbox": cfg.inbox, "batch": batch, "objects": len(good)
                                       + len([q for q in quarantine if q["reason"] not in dropped])},
                               quarantine=quarantine)
    _count(result, labelled, unlabelled, quarantine, datasets.record_counts(m))
    return _judge(cfg, dataset, batch, batch_url, head, m, result)


def _dedup(cfg: IngestConfig, dataset: str, plans: dict[str, Any], batch: str, head: datasets.DatasetVersion,
           records: np.ndarray, good: list[dict[str, Any]], quarantine: list[dict[str, Any]]) -> np.ndarray:
    """Which records to keep; each one dropped gets a line in ``quarantine``: exact duplicates (uploaded bytes)
    of earlier batches or this one, near-duplicates (dHash) of the head, anything near a protected set."""
    known = _known_hashes(dataset, plans, batch)
    existing = HashIndex(dataset_hashes(head.manifest())) if cfg.near_dup_bits >= 0 else HashIndex(np.zeros(0))
    protected = protected_index(cfg.protected)
    hashes = dhash(records["image"]) if len(records) else np.zeros(0, np.uint64)
    keep = np.ones(len(records), dtype=bool)
    seen: set[str] = set()
    for i, info in enumerate(good):
        reason = None
        if len(protected) and protected.near(int(hashes[i]), max(cfg.near_dup_bits, 0)):
            reason = "protected_set"
        elif info["sha"] in known or info["sha"] in seen:
            reason = "duplicate"
        elif existing.near(int(hashes[i]), cfg.near_dup_bits):
            reason = "near_duplicate"
        seen.add(info["sha"])
        if reason:
            keep[i] = False
            quarantine.append({"key": info["key"], "reason": reason, "detail": f"sha {info['sha']}"})
    return keep


def _server_predictions(cfg: IngestConfig, records: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class, confidence) per record from ``cfg.model`` (-1, 0 without): for the noise check and the queue."""
    pred = np.full(len(records), -1, dtype=np.int64)
    conf = np.zeros(len(records), dtype=np.float32)
    if cfg.model and keep.any():
        from signscale.continual import gate

        p, cf = gate.predict(_model_url(cfg.model), records["image"][keep])
        pred[keep], conf[keep] = p, cf
    return pred, conf


def _count(result: IngestResult, labelled: np.ndarray, unlabelled: np.ndarray, quarantine: list[dict[str, Any]],
           counts: dict[str, dict[str, int]]) -> None:
    """Fill in the result's counts; duplicates and protected-set hits are drops, not unusable objects."""
    by_reason = dict(Counter(q["reason"] for q in quarantine))  # in first-seen order, as the JSON shows it
    result.kept, result.unlabelled = int(labelled.sum()), int(unlabelled.sum())
    result.duplicates = by_reason.get("duplicate", 0)
    result.near_duplicates = by_reason.get("near_duplicate", 0)
    result.protected = by_reason.get("protected_set", 0)
    result.quarantined = len(quarantine) - result.duplicates - result.near_duplicates - result.protected
    result.by_reason, result.counts = by_reason, counts


def _judge(cfg: IngestConfig, dataset: str, batch: str, batch_url: str, head: datasets.DatasetVersion,
           m: Any, result: IngestResult) -> IngestResult:
    """Record the batch as rejected or staged (with its figures), then publish it if asked. The status is
    written after every file of the batch: it is what tells the next run this batch is finished."""
    reason = _invalid(cfg, result)
    stats = {"kept": result.kept, "unlabelled": result.unlabelled, "by_reason": result.by_reason, "noise": result.noise,
             "counts": result.counts, "checksum": m.checksum(), "head": head.version, "queue": result.queue}
    if reason:
        result.state, result.reason = "rejected", reason
        set_status(dataset, batch, "rejected", reason=reason, **stats)
        remove_stale_temps(dataset, batch)
        return result
    set_status(dataset, batch, "staged", **stats)
    result.state = "staged"
    if cfg.publish and result.kept:
        note = f"ingest {batch} from {cfg.inbox.rstrip('/')}"
        v = datasets.publish(dataset, batch_url, counts=result.counts, note=note)
        set_status(dataset, batch, "published", version=v.version)
        result.state, result.version = "published", v.version
    remove_stale_temps(dataset, batch)
    return result


def _publish_staged(dataset: str, batch: str, plan: dict[str, Any], st: dict[str, Any]) -> IngestResult:
    """Publish a batch that was staged for publishing by a run that died before the publish was recorded.

    ``datasets.publish`` is idempotent for a batch already in the version chain, so a run killed after
    moving HEAD but before writing ``published`` gets the same version back, not a second one.
    """
    batch_url = storage.join(dataset, datasets.BATCHES_DIR, batch)
    v = datasets.publish(dataset, batch_url, counts=st.get("counts"), note=f"ingest {batch} from {plan['inbox']}")
    set_status(dataset, batch, "published", version=v.version)
    remove_stale_temps(dataset, batch)
    by_reason = dict(st.get("by_reason", {}))
    r = IngestResult(batch=batch, batch_url=batch_url, listed=len(plan["keys"]), new=len(plan["keys"]),
                     kept=int(st["kept"]), unlabelled=int(st.get("unlabelled", 0)), by_reason=by_reason,
                     state="published", version=v.version, noise=st.get("noise") or {}, queue=st.get("queue", ""),
                     counts=st.get("counts", {}), duplicates=by_reason.get("duplicate", 0),
                     near_duplicates=by_reason.get("near_duplicate", 0), protected=by_reason.get("protected_set", 0))
    r.quarantined = sum(by_reason.values()) - r.duplicates - r.near_duplicates - r.protected
    return r


def remove_stale_temps(dataset: str, batch: str) -> int:
    """Remove the temporary files a killed run left for ``batch``; returns how many.

    Every one under the batch's folder and among the batch's own ledger files (only the one run working
    on a batch writes them); for the dataset's shared files (``_versions/HEAD``, version manifests) only
    those :func:`storage.superseded`.
    """
    mine = storage.remove_temps(storage.join(dataset, datasets.BATCHES_DIR, batch), recursive=True)
    ledger = storage.remove_temps(storage.join(dataset, INGEST_DIR), stale=lambda tmp, target: (
        os.path.basename(target).startswith(f"{batch}.") or storage.superseded(tmp, target)))
    shared = storage.remove_temps(storage.join(dataset, datasets.VERSIONS_DIR), stale=storage.superseded)
    return len(mine) + len(ledger) + len(shared)


def _invalid(cfg: IngestConfig, r: IngestResult) -> str:
    """Why the batch must not be published, or ''."""
    usable = r.kept + r.unlabelled
    total = usable + r.quarantined
    if total and r.quarantined / total > cfg.max_quarantine:
        return f"{r.quarantined} of {total} objects unusable (> {cfg.max_quarantine:.0%}): {r.by_reason}"
    if r.noise and r.noise["rate"] > cfg.max_noise:
        who = f"; suspicious vehicle(s): {', '.join(r.noise['suspicious'])}" if r.noise["suspicious"] else ""
        return (f"label noise: {r.noise['flagged']} of {r.noise['confident']} confidently predicted labels "
                f"({r.noise['rate']:.1%}) contradicted by the model at >= {cfg.noise_confidence:.0%} confidence "
                f"(> {cfg.max_noise:.0%}){who}")
    return ""


def publish_batch(dataset: str, batch: str, *, note: str = "") -> datasets.DatasetVersion:
    """Publish a staged batch (the continual cycle calls this after the gate accepted the model)."""
    st = batch_status(dataset, batch)
    if st is None or st["state"] not in ("staged", "published"):
        raise IngestError(f"{dataset}: batch {batch} is {st['state'] if st else 'unfinished'}, not staged; "
                          "only a validated batch can be published")
    v = datasets.publish(dataset, storage.join(dataset.rstrip("/"), datasets.BATCHES_DIR, batch),
                         counts=st.get("counts"), note=note)
    set_status(dataset, batch, "published", version=v.version)
    return v
