"""What each TT100K sign code means: the rows of the ``tt100k`` catalogue.

Tsinghua-Tencent 100K names its classes by code: ``i`` mandatory (blue), ``p`` prohibitory, ``w``
warning (yellow triangles), plus ``io``/``po``/``wo`` catch-alls of mixed signs. Seven families carry
their value in the code and have no fixed list: ``pl<N>`` speed limit, ``il<N>`` minimum speed,
``pr<N>`` end of speed limit, ``ph<N>`` height limit (m), ``pw<N>`` width limit (m), ``pm<N>`` weight
limit (t), ``pa<N>`` axle-load limit (t). A family code's key, name, category, shape, colours and flip
rule come from its family here, so ``pl60`` is ``speed_limit_60`` exactly as in GTSRB's catalogue
and the two merge by meaning.

The rows live in ``tt100k_codes.tsv`` (package data, one line per code, the line's position is the
class id): a user adds a value seen in their copy of TT100K by appending one line, and ``labels.py``
stays the place for the hand-written catalogues. This module knows nothing of :class:`SignClass`
(``labels`` builds its classes from these rows and imports this module, not the other way round).

A code is never guessed: a family code whose value is not a number (``plx``) or any code without a
row (``pl45`` while no row says ``pl45``, ``p99``) raises :class:`CodeError`, which the source turns
into a ``Problem`` naming the file and the code.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources

TABLE = "tt100k_codes.tsv"
COLUMNS: tuple[str, ...] = ("code", "key", "category", "shape", "colours", "flip", "mirror", "uncertain", "name")
NEGATIVE = "negative"  # TT100K's crops of background: the "not a sign" class, not a catalogue row


@dataclass(frozen=True)
class Family:
    """A code prefix whose value is part of the code (``pl`` + ``40``)."""

    prefix: str
    key: str  # format string over the value: "speed_limit_{}"
    name: str
    category: str
    shape: str
    colours: str


_PROHIB = "white,red,black"
FAMILIES: dict[str, Family] = {f.prefix: f for f in (
    Family("pl", "speed_limit_{}", "Speed limit ({}km/h)", "prohibitory", "circle", _PROHIB),
    Family("il", "minimum_speed_{}", "Minimum speed ({}km/h)", "mandatory", "circle", "blue,white"),
    Family("pr", "end_speed_limit_{}", "End of speed limit ({}km/h)", "other", "circle", "white,black,grey"),
    Family("ph", "height_limit_{}m", "Height limit ({} m)", "prohibitory", "circle", _PROHIB),
    Family("pw", "width_limit_{}m", "Width limit ({} m)", "prohibitory", "circle", _PROHIB),
    Family("pm", "weight_limit_{}t", "Weight limit ({} t)", "prohibitory", "circle", _PROHIB),
    Family("pa", "axle_load_limit_{}t", "Axle-load limit ({} t)", "prohibitory", "circle", _PROHIB),
)}
_FAMILY_CODE = re.compile(r"^(?P<prefix>[a-z]{2})(?P<value>.*)$")
_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")


@dataclass(frozen=True)
class CodeRow:
    """One catalogue row: a code and the sign class it stands for."""

    code: str
    key: str
    name: str
    category: str
    shape: str
    colours: tuple[str, ...]
    flip: str
    mirror: str | None
    uncertain: bool


class CodeError(ValueError):
    """A code the catalogue cannot place; ``reason`` is ``unknown_code`` or ``bad_value``."""

    def __init__(self, code: str, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.reason, self.detail = code, reason, detail


def family_of(code: str) -> tuple[Family, str] | None:
    """(family, canonical value) for a value-family code, None for any other code.

    The value is canonical (``pl040`` -> ``40``, ``ph3.50`` -> ``3.5``) so that one sign has one
    code; a family prefix followed by anything but a number is a ``bad_value`` CodeError.
    """
    m = _FAMILY_CODE.match(code)
    if not m or m["prefix"] not in FAMILIES:
        return None
    family, value = FAMILIES[m["prefix"]], m["value"]
    if not _NUMBER.match(value):
        raise CodeError(code, "bad_value", f"code {code!r}: {family.name.format('N')} needs a number after "
                        f"{family.prefix!r} (e.g. {family.prefix}40 or {family.prefix}3.5), got {value!r}")
    try:
        canonical = format(Decimal(value).normalize(), "f")
    except InvalidOperation:  # unreachable for _NUMBER matches; kept so a bad value never passes as a class
        raise CodeError(code, "bad_value", f"code {code!r}: value {value!r} is not a number") from None
    return family, canonical


def _row(fields: list[str], where: str) -> CodeRow:
    fields = (fields + [""] * len(COLUMNS))[:len(COLUMNS)]
    d = dict(zip(COLUMNS, (f.strip() for f in fields)))
    code = d["code"]
    fam = family_of(code)  # no fixed TT100K code starts with a family prefix
    if fam is not None:
        family, value = fam
        if f"{family.prefix}{value}" != code:
            raise ValueError(f"{where}: family code {code!r} is not canonical; write {family.prefix}{value}")
        derived = {"key": family.key.format(value), "name": family.name.format(value), "category": family.category,
                   "shape": family.shape, "colours": family.colours, "flip": "never"}
        d = {k: d[k] or derived.get(k, "") for k in COLUMNS}
    missing = [k for k in ("key", "category", "shape", "flip", "name") if not d[k]]
    if missing:
        raise ValueError(f"{where}: code {code!r} has no {', '.join(missing)}; only value-family codes may "
                         f"leave columns empty")
    return CodeRow(code=code, key=d["key"], name=d["name"], category=d["category"], shape=d["shape"],
                   colours=tuple(c for c in d["colours"].split(",") if c), flip=d["flip"],
                   mirror=d["mirror"] or None, uncertain=d["uncertain"].lower() in ("yes", "true", "1"))


def parse_table(text: str, where: str = TABLE) -> tuple[CodeRow, ...]:
    """The rows of a catalogue table (tab-separated, ``#`` comments, one header line)."""
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.startswith("#")]
    if not lines or lines[0][1].split("\t")[:len(COLUMNS)] != list(COLUMNS):
        raise ValueError(f"{where}: the first line must be the header {chr(9).join(COLUMNS)!r}")
    rows, seen = [], {}
    for n, line in lines[1:]:
        row = _row(line.split("\t"), f"{where} line {n}")
        for kind, ident in (("code", row.code), ("key", row.key)):
            if (kind, ident) in seen:
                raise ValueError(f"{where} line {n}: {kind} {ident!r} already on line {seen[(kind, ident)]}")
            seen[(kind, ident)] = n
        rows.append(row)
    return tuple(rows)


@functools.cache
def rows() -> tuple[CodeRow, ...]:
    """The shipped catalogue, in id order."""
    return parse_table(resources.files("signscale").joinpath(TABLE).read_text(encoding="utf-8"))


@functools.cache
def _index() -> dict[str, int]:
    return {r.code: i for i, r in enumerate(rows())}


def lookup(code: str) -> int:
    """The tt100k class id of ``code``; CodeError (``unknown_code`` or ``bad_value``) if none."""
    if code in _index():
        return _index()[code]
    fam = family_of(code)
    if fam is None:
        raise CodeError(code, "unknown_code", f"code {code!r} is not in the tt100k catalogue "
                        f"({len(rows())} codes, e.g. pl40, pne, i5, w57); add a row to signscale/{TABLE}")
    family, value = fam
    canonical = f"{family.prefix}{value}"
    if canonical in _index():
        return _index()[canonical]
    raise CodeError(code, "unknown_code", f"code {code!r} reads as {family.name.format(value)}, which has no class "
                    f"in the tt100k catalogue: append the line {canonical!r} to signscale/{TABLE}")
