"""The shard format and the dataset manifest (see docs/format.md).

A dataset is a folder (local or object store) holding ``manifest.json``, ``shards/*.sgs`` and
``quarantine.jsonl``. The manifest is written last, after every shard is in place and verified,
so a reader that finds a manifest finds every shard it names.

Shard file, format version 1::

    magic  b"SIGNSHRD"              8 bytes
    version  uint32 little-endian   4 bytes
    header_len uint32 little-endian 4 bytes
    header  JSON (utf-8, space-padded so the data starts 64-byte aligned)
    data

``raw`` encoding: ``data`` is ``count`` fixed-size records of a numpy structured dtype (given in
the header) holding the decoded, resized image and the record's metadata. Record ``i`` lives at
``data_offset + i * record_size``: O(1) random access, one ranged GET per block on object storage,
no decode when reading.

``encoded`` encoding: ``data`` is ``count`` metadata records (same dtype without ``image``), then
``count + 1`` uint64 offsets into the blob, then the blob of original image bytes, then (if any)
``count + 1`` offsets and a blob of per-record JSON (boxes for scenes).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from signscale import storage
from signscale.labels import LabelSpace

MAGIC = b"SIGNSHRD"
SHARD_FORMAT = 1
MANIFEST_FORMAT = 1
ALIGN = 64
PREFIX = struct.Struct("<8sII")

Encoding = Literal["raw", "encoded"]

# Metadata every record carries, whatever the encoding. ``id`` is the sample's index in its
# source (stable across re-packs); ``track`` a 63-bit hash of the track name (-1: unknown).
META_FIELDS: list[tuple[str, str]] = [
    ("id", "<i8"), ("label", "<i4"), ("track", "<i8"), ("roi", "<i2", (4,)),  # type: ignore[list-item]
    ("condition", "u1"), ("country", "u1"), ("source", "<u2"),
]


class ShardError(ValueError):
    """A shard or manifest that is corrupt, truncated or of an unknown version; names the file."""


def record_dtype(encoding: Encoding, image_shape: Sequence[int] | None) -> np.dtype:
    fields: list[Any] = []
    if encoding == "raw":
        if image_shape is None:
            raise ValueError("raw encoding needs an image shape")
        fields.append(("image", "u1", tuple(image_shape)))
    fields += [f if len(f) == 3 else (f[0], f[1]) for f in META_FIELDS]  # type: ignore[misc]
    return np.dtype(fields)


def dtype_to_json(dt: np.dtype) -> list[list[Any]]:
    return [[name, dt.fields[name][0].base.str, list(dt.fields[name][0].shape)] for name in dt.names]


def dtype_from_json(d: list[list[Any]]) -> np.dtype:
    return np.dtype([(n, s, tuple(shape)) if shape else (n, s) for n, s, shape in d])


def track_hash(track: str | None) -> int:
    if not track:
        return -1
    return int.from_bytes(hashlib.blake2b(track.encode(), digest_size=8).digest(), "little") >> 1


def content_hash(data: bytes | np.ndarray) -> int:
    """64-bit hash of a sample's original content, for duplicate detection."""
    blob = data.tobytes() if isinstance(data, np.ndarray) else data
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little")


def pack_uint64(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype="<u8").tobytes()).decode()


def unpack_uint64(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<u8")


# ---------------------------------------------------------------------------------------------
# Writing


def _header_bytes(header: dict[str, Any]) -> tuple[bytes, int]:
    """Serialise the header with the data offset filled in and padded to ALIGN."""
    for _ in range(3):  # data_offset is part of the header, so iterate until its length is stable
        blob = json.dumps(header, separators=(",", ":")).encode()
        total = PREFIX.size + len(blob)
        data_offset = -(-total // ALIGN) * ALIGN
        if header.get("data_offset") == data_offset:
            break
        header["data_offset"] = data_offset
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob = blob + b" " * (header["data_offset"] - PREFIX.size - len(blob))
    return PREFIX.pack(MAGIC, SHARD_FORMAT, len(blob)) + blob, header["data_offset"]


def encode_raw_shard(records: np.ndarray) -> bytes:
    """A complete ``raw`` shard from a structured record array (dtype from :func:`record_dtype`)."""
    header = {"encoding": "raw", "count": int(len(records)), "dtype": dtype_to_json(records.dtype),
              "record_size": records.dtype.itemsize}
    head, _ = _header_bytes(header)
    return head + np.ascontiguousarray(records).tobytes()


def encode_encoded_shard(meta: np.ndarray, blobs: Sequence[bytes], extras: Sequence[bytes] | None = None) -> bytes:
    """A complete ``encoded`` shard: metadata records, then image bytes (and optional JSON extras)."""
    count = len(meta)
    if len(blobs) != count or (extras is not None and len(extras) != count):
        raise ValueError("one blob (and one extra, if given) per metadata record")
    img_off = np.zeros(count + 1, dtype="<u8")
    img_off[1:] = np.cumsum([len(b) for b in blobs])
    meta_bytes = np.ascontiguousarray(meta).tobytes()
    header: dict[str, Any] = {"encoding": "encoded", "count": count, "dtype": dtype_to_json(meta.dtype),
                              "record_size": meta.dtype.itemsize, "blob_bytes": int(img_off[-1])}
    parts = [meta_bytes, img_off.tobytes(), *blobs]
    if extras is not None:
        ex_off = np.zeros(count + 1, dtype="<u8")
        ex_off[1:] = np.cumsum([len(e) for e in extras])
        header["extra_bytes"] = int(ex_off[-1])
        parts += [ex_off.tobytes(), *extras]
    head, _ = _header_bytes(header)
    return head + b"".join(parts)


# ---------------------------------------------------------------------------------------------
# Reading


def parse_header(prefix: bytes, url: str = "<shard>") -> dict[str, Any]:
    """Parse the header from the first bytes of a shard (at least PREFIX.size + header_len)."""
    if len(prefix) < PREFIX.size:
        raise ShardError(f"{url}: truncated shard (only {len(prefix)} bytes)")
    magic, version, hlen = PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise ShardError(f"{url}: not a signscale shard (bad magic {magic!r})")
    if version != SHARD_FORMAT:
        raise ShardError(f"{url}: shard format {version} is not supported by this signscale "
                         f"(reads format {SHARD_FORMAT}); upgrade signscale or re-pack the dataset")
    if len(prefix) < PREFIX.size + hlen:
        raise ShardError(f"{url}: truncated shard header")
    try:
        header = json.loads(prefix[PREFIX.size:PREFIX.size + hlen])
    except json.JSONDecodeError as exc:
        raise ShardError(f"{url}: corrupt shard header ({exc})") from None
    header["_dtype"] = dtype_from_json(header["dtype"])
    return header


def expected_size(header: dict[str, Any]) -> int:
    n, rs = header["count"], header["record_size"]
    size = header["data_offset"] + n * rs
    if header["encoding"] == "encoded":
        size += 8 * (n + 1) + header["blob_bytes"]
        if "extra_bytes" in header:
            size += 8 * (n + 1) + header["extra_bytes"]
    return size


def _mapped(path: str) -> np.ndarray:
    """The file's bytes, memory-mapped read-only, as a plain ndarray: slices and gathers of an
    np.memmap are memmaps too, whose per-view bookkeeping cost more than gathering a batch's fields."""
    return np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))


class ShardReader:
    """Random access to one shard. Local files are memory-mapped; remote ones use ranged reads."""

    HEAD_GUESS = 4096

    def __init__(self, url: str, local: str | None = None) -> None:
        self.url = url
        self._local = local if local is not None else storage.local_path(url)
        self._mm: np.ndarray | None = None
        if self._local is not None:
            self._mm = _mapped(self._local)
            head = bytes(self._mm[: self.HEAD_GUESS])
        else:
            head = storage.read_bytes(url, 0, self.HEAD_GUESS)
        if len(head) >= PREFIX.size:
            hlen = PREFIX.unpack_from(head)[2]
            if PREFIX.size + hlen > len(head):
                head = self._read(0, PREFIX.size + hlen)
        self.header = parse_header(head, url)
        self.dtype: np.dtype = self.header["_dtype"]
        self.count: int = self.header["count"]
        self.encoding: Encoding = self.header["encoding"]
        self._data = self.header["data_offset"]
        self._offsets: np.ndarray | None = None
        if self._mm is not None and len(self._mm) < expected_size(self.header):
            raise ShardError(f"{url}: truncated shard ({len(self._mm)} of {expected_size(self.header)} bytes)")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_mm"] = None  # re-mapped lazily in the receiving process
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._local is not None:
            self._mm = _mapped(self._local)

    @property
    def mapped(self) -> bool:
        """True when the shard is memory-mapped (local or cached): random access costs no request."""
        return self._mm is not None

    def _read(self, start: int, stop: int) -> bytes | np.ndarray:
        if self._mm is not None:
            if stop > len(self._mm):
                raise ShardError(f"{self.url}: truncated shard (needs byte {stop}, has {len(self._mm)})")
            return self._mm[start:stop]
        data = storage.read_bytes(self.url, start, stop)
        if len(data) != stop - start:
            raise ShardError(f"{self.url}: truncated shard (short read at {start}..{stop})")
        return data

    def records(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Records [start, stop) as a structured array (a zero-copy view for local raw shards)."""
        stop = self.count if stop is None else min(stop, self.count)
        rs = self.dtype.itemsize
        buf = self._read(self._data + start * rs, self._data + stop * rs)
        return np.frombuffer(buf, dtype=self.dtype) if isinstance(buf, bytes) else buf.view(self.dtype)

    def _image_offsets(self) -> np.ndarray:
        if self._offsets is None:
            base = self._data + self.count * self.dtype.itemsize
            self._offsets = np.frombuffer(bytes(self._read(base, base + 8 * (self.count + 1))), dtype="<u8")
        return self._offsets

    def blobs(self, start: int = 0, stop: int | None = None) -> list[bytes]:
        """Original image bytes of records [start, stop) (encoded shards), with one ranged read."""
        if self.encoding != "encoded":
            raise ShardError(f"{self.url}: blobs() needs an encoded shard")
        stop = self.count if stop is None else min(stop, self.count)
        off = self._image_offsets()
        blob_base = self._data + self.count * self.dtype.itemsize + 8 * (self.count + 1)
        chunk = bytes(self._read(blob_base + int(off[start]), blob_base + int(off[stop])))
        rel = off[start:stop + 1] - off[start]
        return [chunk[int(rel[i]):int(rel[i + 1])] for i in range(stop - start)]

    def blobs_at(self, indices: np.ndarray) -> list[bytes]:
        """Original image bytes of the given records, one slice each (no span copied)."""
        off = self._image_offsets()
        base = self._data + self.count * self.dtype.itemsize + 8 * (self.count + 1)
        return [bytes(self._read(base + int(off[i]), base + int(off[i + 1]))) for i in indices]

    def extras(self, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        """Per-record JSON metadata (e.g. boxes); empty dicts when the shard has none."""
        stop = self.count if stop is None else min(stop, self.count)
        if "extra_bytes" not in self.header:
            return [{} for _ in range(stop - start)]
        off = self._image_offsets()
        base = self._data + self.count * self.dtype.itemsize + 8 * (self.count + 1) + int(off[-1])
        ex_off = np.frombuffer(bytes(self._read(base, base + 8 * (self.count + 1))), dtype="<u8")
        blob_base = base + 8 * (self.count + 1)
        chunk = bytes(self._read(blob_base + int(ex_off[start]), blob_base + int(ex_off[stop])))
        rel = ex_off[start:stop + 1] - ex_off[start]
        return [json.loads(chunk[int(rel[i]):int(rel[i + 1])] or b"{}") for i in range(stop - start)]


# ---------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset root
    sha256: str
    bytes: int
    count: int
    class_histogram: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes, "count": self.count,
                "class_histogram": list(self.class_histogram)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardInfo":
        return cls(path=d["path"], sha256=d["sha256"], bytes=int(d["bytes"]), count=int(d["count"]),
                   class_histogram=tuple(int(x) for x in d["class_histogram"]))


class Manifest:
    """A dataset's manifest: the shards, their checksums and what the records mean."""

    NAME = "manifest.json"

    def __init__(self, root: str, data: dict[str, Any]) -> None:
        self.root = root.rstrip("/")
        self.data = data
        self.shards = [ShardInfo.from_dict(s) for s in data["shards"]]
        self.label_space = LabelSpace.from_dict(data["label_space"])
        counts = np.array([s.count for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @classmethod
    def load(cls, url: str) -> "Manifest":
        root = url[: -len(cls.NAME)].rstrip("/") if url.endswith(cls.NAME) else url.rstrip("/")
        murl = storage.join(root, cls.NAME)
        if not storage.exists(murl):
            raise ShardError(f"{murl}: no manifest. Is {root!r} a signscale dataset? "
                             f"Create one with `signscale pack SOURCE {root}`")
        data = storage.read_json(murl)
        if data.get("format") != "signscale.dataset":
            raise ShardError(f"{murl}: not a signscale dataset manifest")
        if data.get("format_version") != MANIFEST_FORMAT:
            raise ShardError(f"{murl}: manifest format {data.get('format_version')} is not supported "
                             f"(this signscale reads {MANIFEST_FORMAT})")
        return cls(root, data)

    @property
    def count(self) -> int:
        return int(self.starts[-1])

    @property
    def encoding(self) -> Encoding:
        return self.data["encoding"]

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        s = self.data.get("image_shape")
        return tuple(s) if s else None

    @property
    def conditions(self) -> list[str]:
        return list(self.data["conditions"])

    @property
    def countries(self) -> list[str]:
        return list(self.data["countries"])

    @property
    def name(self) -> str:
        return str(self.data.get("name", ""))

    def shard_url(self, i: int) -> str:
        return storage.join(self.root, self.shards[i].path)

    def class_histogram(self) -> np.ndarray:
        return np.sum([s.class_histogram for s in self.shards], axis=0) if self.shards else np.zeros(0, np.int64)

    def locate(self, position: int) -> tuple[int, int]:
        """(shard index, record index within the shard) of dataset position ``position``."""
        shard = int(np.searchsorted(self.starts, position, side="right") - 1)
        return shard, position - int(self.starts[shard])

    def checksum(self) -> str:
        """One hash over every shard's sha256: equal datasets have equal checksums."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.path}:{s.sha256}:{s.count}\n".encode())
        return h.hexdigest()


def verify(url: str, *, progress: Any = None) -> list[str]:
    """Re-hash every shard and check headers and counts; returns a list of problems (empty: OK)."""
    m = Manifest.load(url)
    problems: list[str] = []
    for i, s in enumerate(m.shards):
        surl = m.shard_url(i)
        try:
            if not storage.exists(surl):
                problems.append(f"{s.path}: missing")
                continue
            size = storage.size(surl)
            if size != s.bytes:
                problems.append(f"{s.path}: size {size} bytes, manifest says {s.bytes} (truncated or replaced)")
                continue
            digest = storage.sha256_of(surl)
            if digest != s.sha256:
                problems.append(f"{s.path}: sha256 mismatch (content changed or corrupt)")
                continue
            header = ShardReader(surl).header
            if header["count"] != s.count:
                problems.append(f"{s.path}: header count {header['count']} != manifest count {s.count}")
        except ShardError as exc:
            problems.append(str(exc))
        finally:
            if progress is not None:
                progress(i)
    return problems
