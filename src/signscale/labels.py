"""Sign catalogues and the label space a dataset or model is defined over.

A *catalogue* lists one country's sign classes with a stable semantic key (``speed_limit_30``),
so that datasets numbered differently can later be merged by meaning. A :class:`LabelSpace` is
the ordered list of classes a dataset or model uses; it is saved with every manifest and model
so that an id is never interpreted against the wrong catalogue.

Flip rules matter for augmentation: a horizontally flipped ``keep_right`` is a valid
``keep_left``, a flipped ``speed_limit_30`` is not a sign at all.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal

import numpy as np

FlipRule = Literal["invariant", "mirror", "never"]
Category = Literal["prohibitory", "danger", "mandatory", "other"]
CATEGORIES: tuple[str, ...] = ("prohibitory", "danger", "mandatory", "other")

LABEL_SPACE_FORMAT = 1


@dataclass(frozen=True)
class SignClass:
    """One class of one country's catalogue."""

    key: str  # semantic key shared across countries with the same meaning
    name: str
    country: str
    country_id: int  # the class id in that country's own numbering
    category: Category
    shape: str  # circle | triangle | inverted_triangle | octagon | diamond
    colours: tuple[str, ...]
    flip: FlipRule
    mirror: str | None = None  # key of the class a horizontal flip produces (flip == "mirror")
    uncertain: bool = False  # meaning identified by eye, not from an official list

    def __post_init__(self) -> None:
        if self.flip not in ("invariant", "mirror", "never"):
            raise ValueError(f"class {self.key!r}: flip must be invariant|mirror|never, got {self.flip!r}")
        if (self.flip == "mirror") != (self.mirror is not None):
            raise ValueError(f"class {self.key!r}: 'mirror' must be set exactly when flip == 'mirror'")
        if self.category not in CATEGORIES:
            raise ValueError(f"class {self.key!r}: category must be one of {CATEGORIES}")


def _de(cid: int, key: str, name: str, cat: Category, shape: str, colours: str, flip: FlipRule = "never",
        mirror: str | None = None) -> SignClass:
    return SignClass(key=key, name=name, country="de", country_id=cid, category=cat, shape=shape,
                     colours=tuple(colours.split(",")), flip=flip, mirror=mirror)


_PROHIB = "white,red,black"
_DANGER = "white,red,black"
_MAND = "blue,white"
_END = "white,black,grey"

# GTSRB's 43 classes (ids are GTSRB's ClassId). Flip rules: symmetric pictograms are invariant;
# direction pairs mirror each other; digits, text, vehicles, people, animals and one-sided
# shapes would become a sign that does not exist, so they are never flipped.
GTSRB: tuple[SignClass, ...] = (
    _de(0, "speed_limit_20", "Speed limit (20km/h)", "prohibitory", "circle", _PROHIB),
    _de(1, "speed_limit_30", "Speed limit (30km/h)", "prohibitory", "circle", _PROHIB),
    _de(2, "speed_limit_50", "Speed limit (50km/h)", "prohibitory", "circle", _PROHIB),
    _de(3, "speed_limit_60", "Speed limit (60km/h)", "prohibitory", "circle", _PROHIB),
    _de(4, "speed_limit_70", "Speed limit (70km/h)", "prohibitory", "circle", _PROHIB),
    _de(5, "speed_limit_80", "Speed limit (80km/h)", "prohibitory", "circle", _PROHIB),
    _de(6, "end_speed_limit_80", "End of speed limit (80km/h)", "other", "circle", _END),
    _de(7, "speed_limit_100", "Speed limit (100km/h)", "prohibitory", "circle", _PROHIB),
    _de(8, "speed_limit_120", "Speed limit (120km/h)", "prohibitory", "circle", _PROHIB),
    _de(9, "no_passing", "No passing", "prohibitory", "circle", _PROHIB),
    _de(10, "no_passing_trucks", "No passing for vehicles over 3.5 t", "prohibitory", "circle", _PROHIB),
    _de(11, "right_of_way_next_intersection", "Right-of-way at the next intersection", "danger",
        "triangle", _DANGER, "invariant"),
    _de(12, "priority_road", "Priority road", "other", "diamond", "white,yellow", "invariant"),
    _de(13, "yield", "Yield", "other", "inverted_triangle", "white,red", "invariant"),
    _de(14, "stop", "Stop", "other", "octagon", "red,white"),
    _de(15, "no_vehicles", "No vehicles", "prohibitory", "circle", "white,red", "invariant"),
    _de(16, "no_trucks", "Vehicles over 3.5 t prohibited", "prohibitory", "circle", _PROHIB),
    _de(17, "no_entry", "No entry", "other", "circle", "red,white", "invariant"),
    _de(18, "general_caution", "General caution", "danger", "triangle", _DANGER, "invariant"),
    _de(19, "dangerous_curve_left", "Dangerous curve to the left", "danger", "triangle", _DANGER,
        "mirror", "dangerous_curve_right"),
    _de(20, "dangerous_curve_right", "Dangerous curve to the right", "danger", "triangle", _DANGER,
        "mirror", "dangerous_curve_left"),
    _de(21, "double_curve", "Double curve (first left)", "danger", "triangle", _DANGER),
    _de(22, "bumpy_road", "Bumpy road", "danger", "triangle", _DANGER, "invariant"),
    _de(23, "slippery_road", "Slippery road", "danger", "triangle", _DANGER),
    _de(24, "road_narrows_right", "Road narrows on the right", "danger", "triangle", _DANGER),
    _de(25, "road_work", "Road work", "danger", "triangle", _DANGER),
    _de(26, "traffic_signals", "Traffic signals", "danger", "triangle", "white,red,black,yellow,green",
        "invariant"),
    _de(27, "pedestrians", "Pedestrians", "danger", "triangle", _DANGER),
    _de(28, "children_crossing", "Children crossing", "danger", "triangle", _DANGER),
    _de(29, "bicycles_crossing", "Bicycles crossing", "danger", "triangle", _DANGER),
    _de(30, "ice_snow", "Beware of ice/snow", "danger", "triangle", _DANGER, "invariant"),
    _de(31, "wild_animals", "Wild animals crossing", "danger", "triangle", _DANGER),
    _de(32, "end_all_limits", "End of all speed and passing limits", "other", "circle", _END),
    _de(33, "turn_right_ahead", "Turn right ahead", "mandatory", "circle", _MAND, "mirror",
        "turn_left_ahead"),
    _de(34, "turn_left_ahead", "Turn left ahead", "mandatory", "circle", _MAND, "mirror",
        "turn_right_ahead"),
    _de(35, "ahead_only", "Ahead only", "mandatory", "circle", _MAND, "invariant"),
    _de(36, "straight_or_right", "Go straight or right", "mandatory", "circle", _MAND, "mirror",
        "straight_or_left"),
    _de(37, "straight_or_left", "Go straight or left", "mandatory", "circle", _MAND, "mirror",
        "straight_or_right"),
    _de(38, "keep_right", "Keep right", "mandatory", "circle", _MAND, "mirror", "keep_left"),
    _de(39, "keep_left", "Keep left", "mandatory", "circle", _MAND, "mirror", "keep_right"),
    _de(40, "roundabout", "Roundabout mandatory", "mandatory", "circle", _MAND),
    _de(41, "end_no_passing", "End of no passing", "other", "circle", _END),
    _de(42, "end_no_passing_trucks", "End of no passing by vehicles over 3.5 t", "other", "circle", _END),
)

CATALOGUES: dict[str, tuple[SignClass, ...]] = {"de": GTSRB}

# Country codes a record can carry (shards store the index into this table; append only).
COUNTRIES: tuple[str, ...] = ("de", "cn", "be", "fr", "nl", "us", "other")


class LabelError(ValueError):
    """A label, key or country that the label space cannot place."""


@dataclass(frozen=True)
class LabelSpace:
    """The ordered classes a dataset or model predicts; output id ``i`` is ``classes[i]``."""

    classes: tuple[SignClass, ...]
    name: str = "de"
    _index: dict[str, int] = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        index: dict[str, int] = {}
        for i, c in enumerate(self.classes):
            if c.key in index:
                raise LabelError(f"label space {self.name!r}: key {c.key!r} appears twice (ids {index[c.key]}, {i})")
            index[c.key] = i
        for c in self.classes:
            if c.mirror is not None and c.mirror not in index:
                raise LabelError(f"class {c.key!r} mirrors to {c.mirror!r}, which is not in label space {self.name!r}")
        object.__setattr__(self, "_index", index)

    @classmethod
    def for_country(cls, country: str) -> "LabelSpace":
        if country not in CATALOGUES:
            raise LabelError(f"unknown country {country!r}; known catalogues: {', '.join(sorted(CATALOGUES))}")
        return cls(classes=CATALOGUES[country], name=country)

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, i: int) -> SignClass:
        return self.classes[i]

    @property
    def keys(self) -> list[str]:
        return [c.key for c in self.classes]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def index(self, key: str) -> int:
        try:
            return self._index[key]
        except KeyError:
            raise LabelError(f"key {key!r} is not in label space {self.name!r}") from None

    def check_id(self, label: int, where: str = "") -> int:
        """Return ``label`` if it is a valid id, else raise an error naming ``where``."""
        at = f"{where}: " if where else ""
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise LabelError(f"{at}class id {label!r} is not an integer")
        if not 0 <= int(label) < len(self.classes):
            raise LabelError(f"{at}class id {label} is outside label space {self.name!r} (0..{len(self) - 1})")
        return int(label)

    def flip_map(self) -> np.ndarray:
        """``m[i]`` is the class a horizontally flipped image of class ``i`` shows, or -1 if it must not flip."""
        m = np.full(len(self.classes), -1, dtype=np.int64)
        for i, c in enumerate(self.classes):
            if c.flip == "invariant":
                m[i] = i
            elif c.flip == "mirror":
                m[i] = self._index[c.mirror]  # type: ignore[index]
        return m

    def to_dict(self) -> dict[str, Any]:
        return {"format": LABEL_SPACE_FORMAT, "name": self.name,
                "classes": [{**asdict(c), "colours": list(c.colours)} for c in self.classes]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LabelSpace":
        if d.get("format") != LABEL_SPACE_FORMAT:
            raise LabelError(f"label space format {d.get('format')!r} is not supported (expected {LABEL_SPACE_FORMAT})")
        classes = tuple(SignClass(**{**c, "colours": tuple(c["colours"])}) for c in d["classes"])
        return cls(classes=classes, name=d["name"])

    def fingerprint(self) -> str:
        """Short stable hash: two label spaces with the same fingerprint number classes the same way."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def table(self) -> list[tuple[int, str, str, str, str]]:
        return [(i, c.key, c.name, c.category, c.flip if c.flip != "mirror" else f"-> {c.mirror}")
                for i, c in enumerate(self.classes)]


def category_ids(space: LabelSpace, keys: Iterable[str] = CATEGORIES) -> np.ndarray:
    """Map each class id to the index of its category (prohibitory, danger, mandatory, other)."""
    order = list(keys)
    return np.array([order.index(c.category) for c in space.classes], dtype=np.int64)
