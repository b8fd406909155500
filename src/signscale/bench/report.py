"""The rows every benchmark of ``signscale bench`` prints, the ratios read from them side by side, and
the table and one-line summary that show them."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

# Row names (``Row.what``); ratios look rows up by them.
PLAIN = "plain files"


RAW = "raw shards"


ENCODED = "encoded shards"


LOADER = "loader (shuffled)"


LOADER_SEQ = "loader (in order)"


LOADER_CACHED = "loader (shard cache)"


LOADER_UNCHECKED = "loader (shuffled, block sums off)"


LOADER_SEQ_UNCHECKED = "loader (in order, block sums off)"


LOADER_AGAIN = "loader (shuffled, 2nd epoch)"


LOADER_AGAIN_UNCHECKED = "loader (shuffled, 2nd epoch, block sums off)"


LITDATA = "litdata"


AUG_SAMPLE = "augment per sample (torchvision v2)"


AUG_BATCH = "augment per batch (BatchAugment)"


AUG_TORCH = "augment per batch (torch ops)"


PACK_RAW = "pack raw"


PACK_ENCODED = "pack encoded"


PACK_LITDATA = "litdata optimize"


WRITE_PLAIN = "write plain files"


UPLOAD_PLAIN = "upload plain files"
LOCAL, S3, GCS, AZURE = "local", "S3", "GCS", "Azure"  # the "where" column


@dataclass
class Row:
    """One measurement. ``samples_per_s`` is None for a skipped row (``note`` says why)."""

    what: str
    where: str
    workers: int | None
    kind: str = "read"  # "read" | "pack" | "setup"
    samples: int = 0  # samples (or images, files) processed in the measurement
    seconds: float = 0.0
    first_batch_s: float | None = None
    steady_per_s: float | None = None  # samples/s after the first batch (start-up excluded)
    requests: float | None = None  # storage requests per epoch (extrapolated when ``partial``)
    bytes: float | None = None  # bytes fetched per epoch (same)
    partial: bool = False  # the epoch was cut by the time box or a subset: per-epoch counts are estimates
    note: str = ""
    skipped: bool = False
    cpu_per_s: float | None = None  # samples per CPU-second of this process and its workers: load-independent

    @property
    def samples_per_s(self) -> float | None:
        if self.skipped or self.seconds <= 0:
            return None
        return self.samples / self.seconds


@dataclass(frozen=True)
class Ratio:
    label: str
    value: float
    percent: bool = False  # show as an overhead percentage as well


def _find(rows: list[Row], what: str, where: str, workers: int | None = None) -> Row | None:
    for r in rows:
        if r.what == what and r.where == where and (workers is None or r.workers == workers) and not r.skipped \
                and r.samples_per_s:
            return r
    return None


def _ws(w: int) -> str:
    return f"{w} worker{'s' if w != 1 else ''}"


def ratios(rows: list[Row]) -> list[Ratio]:
    """The side-by-side ratios the table is for; a ratio is left out when one of its rows is missing."""
    out: list[Ratio] = []

    def add(label: str, a: Row | None, b: Row | None, *, percent: bool = False) -> None:
        if a is not None and b is not None:
            out.append(Ratio(label, a.samples_per_s / b.samples_per_s, percent))  # type: ignore[operator]

    workers = sorted({r.workers for r in rows if r.kind == "read" and r.workers is not None})
    for w in workers:
        ws = _ws(w)
        for where in (LOCAL, S3, GCS, AZURE):
            add(f"raw shards / plain files ({where}, {ws})", _find(rows, RAW, where, w), _find(rows, PLAIN, where, w))
            add(f"encoded shards / plain files ({where}, {ws})", _find(rows, ENCODED, where, w),
                _find(rows, PLAIN, where, w))
            add(f"loader / raw shards direct ({where}, {ws})", _find(rows, LOADER, where, w),
                _find(rows, RAW, where, w), percent=True)
            add(f"loader in order / raw shards direct ({where}, {ws})", _find(rows, LOADER_SEQ, where, w),
                _find(rows, RAW, where, w), percent=True)
            for what, off, label in ((LOADER, LOADER_UNCHECKED, "loader"),
                                     (LOADER_SEQ, LOADER_SEQ_UNCHECKED, "loader in order"),
                                     (LOADER_AGAIN, LOADER_AGAIN_UNCHECKED, "loader 2nd epoch")):
                a, b = _find(rows, what, where, w), _find(rows, off, where, w)
                add(f"{label}, block sums checked / off ({where}, {ws})", a, b, percent=True)
                if a is not None and b is not None and a.cpu_per_s and b.cpu_per_s:
                    out.append(Ratio(f"{label}, block sums checked / off, per CPU-second ({where}, {ws})",
                                     a.cpu_per_s / b.cpu_per_s, True))
        for remote in (S3, GCS, AZURE):
            add(f"{remote} raw shards / local raw shards ({ws})", _find(rows, RAW, remote, w),
                _find(rows, RAW, LOCAL, w))
        add(f"S3 plain files / local plain files ({ws})", _find(rows, PLAIN, S3, w), _find(rows, PLAIN, LOCAL, w))
        add(f"S3 loader / local loader ({ws})", _find(rows, LOADER, S3, w), _find(rows, LOADER, LOCAL, w))
        add(f"S3 loader with shard cache / local loader ({ws})", _find(rows, LOADER_CACHED, S3, w),
            _find(rows, LOADER, LOCAL, w))
        add(f"S3 loader with shard cache / plain files from S3 ({ws})", _find(rows, LOADER_CACHED, S3, w),
            _find(rows, PLAIN, S3, w))
        add(f"augment per batch / per sample (local, {ws})", _find(rows, AUG_BATCH, LOCAL, w),
            _find(rows, AUG_SAMPLE, LOCAL, w))
        add(f"augment per batch, compiled kernel / torch ops (local, {ws})", _find(rows, AUG_BATCH, LOCAL, w),
            _find(rows, AUG_TORCH, LOCAL, w))
        add(f"raw shards / litdata (local, {ws})", _find(rows, RAW, LOCAL, w), _find(rows, LITDATA, LOCAL, w))
        add(f"loader / litdata (local, {ws})", _find(rows, LOADER, LOCAL, w), _find(rows, LITDATA, LOCAL, w))
    add("pack raw / pack encoded (local)", _find(rows, PACK_RAW, LOCAL), _find(rows, PACK_ENCODED, LOCAL))
    add("pack raw to S3 / pack raw local", _find(rows, PACK_RAW, S3), _find(rows, PACK_RAW, LOCAL))
    for w in workers:
        shuffled = _find(rows, LOADER, S3, w)
        direct = _find(rows, RAW, S3, w)
        if shuffled is not None and direct is not None and shuffled.bytes and direct.bytes:
            out.append(Ratio(f"S3 bytes per epoch, loader (shuffled) / raw shards direct ({_ws(w)})",
                             shuffled.bytes / direct.bytes))
    plain_s3 = next((r for r in rows if r.what == PLAIN and r.where == S3 and r.requests), None)
    raw_s3 = next((r for r in rows if r.what == RAW and r.where == S3 and r.requests), None)
    if plain_s3 is not None and raw_s3 is not None:
        out.append(Ratio("S3 requests per epoch, plain files / raw shards", plain_s3.requests / raw_s3.requests))  # type: ignore[operator]
    return out


def _fmt_rate(r: Row) -> str:
    v = r.samples_per_s
    return "-" if v is None else f"{v:,.0f}"


def _fmt_count(v: float | None, partial: bool) -> str:
    if v is None:
        return "-"
    return ("~" if partial else "") + f"{v:,.0f}"


def _fmt_mb(v: float | None, partial: bool) -> str:
    if v is None:
        return "-"
    return ("~" if partial else "") + f"{v / 2**20:,.1f}"


def summary(rows: list[Row]) -> str:
    """One line: the headline ratios at the largest worker count measured."""
    rs = {r.label: r.value for r in ratios(rows)}
    ws = sorted({r.workers for r in rows if r.kind == "read" and r.workers is not None})
    if not ws:
        return "no read rows were measured"
    w = ws[-1]
    tag = _ws(w)
    parts = []
    if (v := rs.get(f"raw shards / plain files (local, {tag})")) is not None:
        parts.append(f"raw shards read {v:.1f}x faster than plain files locally")
    if (v := rs.get(f"raw shards / plain files (S3, {tag})")) is not None:
        parts.append(f"{v:.1f}x over S3")
    if (v := rs.get(f"loader / raw shards direct (local, {tag})")) is not None:
        parts.append(f"the shuffling loader runs at {v:.0%} of direct raw-shard reads locally")
    if (v := rs.get("S3 requests per epoch, plain files / raw shards")) is not None:
        parts.append(f"plain files need {v:,.0f}x the S3 requests per epoch")
    if (v := rs.get(f"S3 bytes per epoch, loader (shuffled) / raw shards direct ({tag})")) is not None and v > 2:
        parts.append(f"the shuffled loader fetches {v:,.0f}x the bytes of a direct read over S3")
    return (", ".join(parts) or "no ratios could be computed") + f" ({tag})"


def print_report(rows: list[Row], console: Console, *, title: str) -> None:
    table = Table(title=title)
    for col, just in (
        ("what", "left"),
        ("where", "left"),
        ("workers", "right"),
        ("samples", "right"),
        ("samples/s", "right"),
        ("after 1st", "right"),
        ("first batch", "right"),
        ("requests/epoch", "right"),
        ("MiB/epoch", "right"),
        ("note", "left"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    last_kind = None
    for r in sorted(rows, key=lambda r: ({"setup": 0, "pack": 1, "read": 2}[r.kind], r.where != LOCAL)):
        if last_kind is not None and (r.kind, r.where) != last_kind:
            table.add_section()
        last_kind = (r.kind, r.where)
        table.add_row(r.what, r.where, "-" if r.workers is None else str(r.workers), f"{r.samples:,}" if r.samples
                      else "-", _fmt_rate(r), "-" if r.steady_per_s is None else f"{r.steady_per_s:,.0f}",
                      "-" if r.first_batch_s is None else f"{r.first_batch_s * 1000:,.0f} ms",
                      _fmt_count(r.requests, r.partial), _fmt_mb(r.bytes, r.partial), r.note)
    console.print(table)
    console.print("samples/s: images/s for pack rows, files/s for setup rows; read rows count worker start-up, "
                  "'after 1st' is the rate after the first batch. "
                  "Local rows read after a warm-up pass (warm page cache); the S3 server keeps objects in memory. "
                  "'~': per-epoch counts extrapolated from the part read.", style="dim")
    rs = ratios(rows)
    if rs:
        width = max(len(r.label) for r in rs)
        console.print("[bold]ratios[/] (samples/s over samples/s)")
        for r in rs:
            extra = f"  ({1 - r.value:+.0%} overhead)" if r.percent else ""
            value = f"{r.value:8.2f}" if r.value >= 0.1 else f"{r.value:8.4f}"
            console.print(f"  {r.label:<{width}}  {value}x{extra}")
    console.print(summary(rows))


def console_for_tables() -> Console:
    """Rich console; wide when printing to a file or pipe, so the table is not wrapped at 80 columns."""
    con = Console(highlight=False)
    return con if con.is_terminal else Console(highlight=False, width=200)
