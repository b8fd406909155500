"""The labelling queue: unlabelled uploads a person should label, and their way back into the inbox.

Ingest writes the queue next to a batch (``batches/<id>/queue.jsonl``, one row per image, with the
models' guesses and an empty ``label``); a person fills in ``label``; :func:`import_labels` copies each
labelled image back into the inbox with a sidecar, so the next ingest takes it in exactly once like any
upload. Only uploads a model is unsure of are queued: an edge case is exactly where the models are unsure.
"""

from __future__ import annotations

import json
from typing import Any

from signscale import storage
from signscale.labels import LabelSpace


def _wants_label(info: dict[str, Any], *, with_model: bool, queue_confidence: float) -> bool:
    """An unlabelled upload with no model to ask, or where the server or the vehicle is unsure, or the two
    models disagree."""
    return info["label"] < 0 and bool(not with_model or info["server_confidence"] < queue_confidence
                                      or info.get("onboard_unsure")
                                      or (info.get("onboard") is not None
                                          and info["onboard"] != info["server_prediction"]))


def write_queue(batch_url: str, infos_kept: list[dict[str, Any]], space: LabelSpace, *, inbox: str,
                with_model: bool, queue_confidence: float) -> str:
    """Write the labelling queue (``queue.jsonl``, rows a person fills in ``label`` of); its URL, or '' if empty.

    ``infos_kept`` are the batch's kept records (``records.jsonl`` rows); ``with_model`` says whether the
    server predictions in them come from a model (without one every unlabelled upload is queued).
    """
    queue = [i for i in infos_kept if _wants_label(i, with_model=with_model, queue_confidence=queue_confidence)]
    if not queue:
        return ""
    url = storage.join(batch_url, "queue.jsonl")
    rows = [{"url": storage.join(inbox.rstrip("/"), i["key"]), "key": i["key"], "vehicle": i["vehicle"],
             "condition": i["condition"], "server_prediction": space[i["server_prediction"]].key
             if i["server_prediction"] >= 0 else None, "server_confidence": i["server_confidence"],
             "onboard_prediction": space[i["onboard"]].key if i.get("onboard") is not None else None,
             "onboard_unsure": bool(i.get("onboard_unsure")), "label": None} for i in queue]
    storage.write_bytes(url, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return url


def import_labels(queue_file: str, inbox: str) -> int:
    """Re-import a labelled queue (JSONL rows with ``url`` and ``label``) as new inbox objects.

    Each labelled row becomes a copy of its image under ``INBOX/relabelled/`` with a sidecar carrying
    the label (and the original metadata), so the next ingest picks it up exactly once like any upload.
    """
    n = 0
    for line in storage.read_text(queue_file).splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("label") in (None, ""):
            continue
        key = f"relabelled/{row['key']}"
        data = storage.read_bytes(row["url"])
        side = {"label": row["label"], "vehicle": row.get("vehicle", ""), "condition": row.get("condition", "clear"),
                "relabelled_from": row["url"]}
        storage.write_bytes(storage.join(inbox, key), data)
        storage.write_json(storage.join(inbox, key.rsplit(".", 1)[0] + ".json"), side)
        n += 1
    return n
