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
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Literal

import numpy as np

from signscale import tt100k_codes

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

def _cn(cid: int, key: str, name: str, cat: Category, shape: str, colours: str, flip: FlipRule = "never",
        mirror: str | None = None, uncertain: bool = False) -> SignClass:
    return SignClass(key=key, name=name, country="cn", country_id=cid, category=cat, shape=shape,
                     colours=tuple(colours.split(",")), flip=flip, mirror=mirror, uncertain=uncertain)


_CN_WARN = "yellow,black"
_CN_MAND = "blue,white"

# The 23 classes of the shared TSRD23 crops (ids are the file names' labels). The dataset has no
# class-name file: these meanings were identified by eye (shared/data/README.md). Class 15, which
# the README doubted ("no U-turn?"), shows TT100K's p1 design by eye (two arrows, one passing the
# other), whose code table says no overtaking. Keys equal GTSRB's where the meaning is the same,
# whatever the design (cn yield carries the character "让", cn pedestrians is a yellow triangle).
# Slashed prohibitions never flip: the slash would run the wrong way. Class 11, first called a
# T-junction, shows a side road joining from the right (by eye, the same design as TT100K's w22).
TSRD23: tuple[SignClass, ...] = (
    _cn(0, "motor_vehicle_lane", "Motor-vehicle lane", "mandatory", "circle", _CN_MAND),
    _cn(1, "no_stopping", "No stopping / no parking", "prohibitory", "circle", "blue,red"),
    _cn(2, "speed_limit_40", "Speed limit (40km/h)", "prohibitory", "circle", _PROHIB),
    _cn(3, "no_left_turn", "No left turn", "prohibitory", "circle", _PROHIB),
    _cn(4, "keep_right", "Keep right", "mandatory", "circle", _CN_MAND, "mirror", "keep_left"),
    _cn(5, "speed_limit_60", "Speed limit (60km/h)", "prohibitory", "circle", _PROHIB),
    _cn(6, "no_entry", "No entry", "other", "circle", "red,white", "invariant"),
    _cn(7, "no_motor_vehicles", "No motor vehicles", "prohibitory", "circle", _PROHIB),
    _cn(8, "no_honking", "No honking", "prohibitory", "circle", _PROHIB),
    _cn(9, "speed_limit_80", "Speed limit (80km/h)", "prohibitory", "circle", _PROHIB),
    _cn(10, "pedestrians", "Pedestrian crossing ahead", "danger", "triangle", _CN_WARN),
    _cn(11, "side_road_right", "Side road on the right (T-junction)", "danger", "triangle", _CN_WARN, "mirror",
        "side_road_left"),
    _cn(12, "bicycle_lane", "Bicycle lane", "mandatory", "circle", _CN_MAND),
    _cn(13, "speed_limit_50", "Speed limit (50km/h)", "prohibitory", "circle", _PROHIB),
    _cn(14, "yield", "Yield (让)", "other", "inverted_triangle", "white,red,black"),
    _cn(15, "no_passing", "No overtaking (two arrows)", "prohibitory", "circle", _PROHIB),
    _cn(16, "speed_limit_30", "Speed limit (30km/h)", "prohibitory", "circle", _PROHIB),
    _cn(17, "speed_limit_5", "Speed limit (5km/h)", "prohibitory", "circle", _PROHIB),
    _cn(18, "no_straight_ahead", "No straight ahead", "prohibitory", "circle", _PROHIB),
    _cn(19, "no_right_turn", "No right turn", "prohibitory", "circle", _PROHIB),
    _cn(20, "turn_right_ahead", "Turn right", "mandatory", "circle", _CN_MAND, "mirror", "turn_left_ahead"),
    _cn(21, "no_left_or_right_turn", "No left and no right turn", "prohibitory", "circle", _PROHIB),
    _cn(22, "speed_limit_70", "Speed limit (70km/h)", "prohibitory", "circle", _PROHIB),
)


def _be(cid: int, key: str, name: str, cat: Category, shape: str, colours: str, checked: bool) -> SignClass:
    return SignClass(key=key, name=name, country="be", country_id=cid, category=cat, shape=shape,
                     colours=tuple(colours.split(",")), flip="never", uncertain=not checked)


_SQUARE = "blue,white"
_BE = (  # (key, name, category, shape, colours, checked by eye), in BelgiumTSC folder order 00000..00061
    ("bumpy_road", "Uneven road", "danger", "triangle", _DANGER, True),
    ("speed_bump", "Single speed hump", "danger", "triangle", _DANGER, True),
    ("slippery_road", "Slippery road", "danger", "triangle", _DANGER, True),
    ("dangerous_curve_left", "Dangerous curve to the left", "danger", "triangle", _DANGER, True),
    ("dangerous_curve_right", "Dangerous curve to the right", "danger", "triangle", _DANGER, True),
    ("double_curve", "Double curve", "danger", "triangle", _DANGER, True),
    # a key names one class of a catalogue: the second double-curve class keeps its own key
    ("double_curve_be6", "Double curve (BelgiumTSC's second class of them)", "danger", "triangle", _DANGER, True),
    ("children_crossing", "Children", "danger", "triangle", _DANGER, True),
    ("bicycles_crossing", "Cyclists", "danger", "triangle", _DANGER, True),
    ("cattle", "Cattle", "danger", "triangle", _DANGER, False),
    ("road_work", "Road works", "danger", "triangle", _DANGER, True),
    ("traffic_signals", "Traffic signals", "danger", "triangle", _DANGER, False),
    ("level_crossing_gates", "Level crossing with gates", "danger", "triangle", _DANGER, True),
    ("general_caution", "Warning triangle with a sub-plate (general caution)", "danger", "triangle", _DANGER, True),
    ("road_narrows_both", "Road narrows on both sides", "danger", "triangle", _DANGER, True),
    ("road_narrows_left", "Road narrows on the left", "danger", "triangle", _DANGER, False),
    ("road_narrows_right", "Road narrows on one side", "danger", "triangle", _DANGER, True),
    ("right_of_way_next_intersection", "Priority at the next junction", "danger", "triangle", _DANGER, True),
    ("intersection_priority_right", "Crossroads, priority to the right", "danger", "triangle", _DANGER, True),
    ("yield", "Yield", "other", "inverted_triangle", "white,red", True),
    ("two_way_traffic", "Two-way traffic", "danger", "triangle", _DANGER, True),
    ("stop", "Stop", "other", "octagon", "red,white", True),
    ("no_entry", "No entry", "other", "circle", "red,white", True),
    ("no_bicycles", "No bicycles", "prohibitory", "circle", _PROHIB, True),
    ("weight_limit", "Weight limit (any value)", "prohibitory", "circle", _PROHIB, True),
    ("no_trucks", "No lorries", "prohibitory", "circle", _PROHIB, True),
    ("width_limit", "Width limit", "prohibitory", "circle", _PROHIB, False),
    ("height_limit", "Height limit (any value)", "prohibitory", "circle", _PROHIB, True),
    ("no_vehicles", "Closed to all vehicles", "prohibitory", "circle", "white,red", True),
    ("no_left_turn", "No left turn", "prohibitory", "circle", _PROHIB, True),
    ("no_right_turn", "No right turn", "prohibitory", "circle", _PROHIB, True),
    ("no_passing", "No overtaking", "prohibitory", "circle", _PROHIB, True),
    ("speed_limit", "Speed limit (every value in one class)", "prohibitory", "circle", _PROHIB, True),
    ("shared_path", "Shared path for pedestrians and cyclists", "mandatory", "circle", _MAND, False),
    ("ahead_only", "Ahead only", "mandatory", "circle", _MAND, True),
    ("mandatory_arrows_mixed", "Keep right and other mandatory arrows, mixed", "mandatory", "circle", _MAND, True),
    ("straight_or_right", "Go straight or right", "mandatory", "circle", _MAND, False),
    ("roundabout", "Roundabout", "mandatory", "circle", _MAND, True),
    ("bicycle_path", "Bicycle path", "mandatory", "circle", _MAND, True),
    ("pedestrian_bicycle_path", "Shared foot and cycle path", "mandatory", "circle", _MAND, True),
    ("no_parking", "No parking", "prohibitory", "circle", "blue,red", True),
    ("no_stopping", "No stopping", "prohibitory", "circle", "blue,red", True),
    ("no_parking_days_1_15", "Alternate-day no parking (1st-15th)", "prohibitory", "circle", "blue,red", True),
    ("no_parking_days_16_31", "Alternate-day no parking (16th-31st)", "prohibitory", "circle", "blue,red", True),
    ("priority_over_oncoming", "Priority over oncoming traffic", "other", "square", "blue,white,red", True),
    ("parking", "Parking", "other", "square", _SQUARE, True),
    ("parking_be46", "Parking (variant, class 46)", "other", "square", _SQUARE, True),
    ("parking_be47", "Parking (variant, class 47)", "other", "square", _SQUARE, True),
    ("parking_trucks", "Parking for goods vehicles", "other", "square", _SQUARE, False),
    ("parking_be49", "Parking (variant, class 49)", "other", "square", _SQUARE, True),
    ("parking_zone", "Parking zone", "other", "square", _SQUARE, False),
    ("residential_zone", "Residential zone", "other", "square", _SQUARE, True),
    ("end_residential_zone", "End of residential zone", "other", "square", _SQUARE, False),
    ("one_way", "One-way road", "other", "square", _SQUARE, True),
    ("dead_end", "Dead end", "other", "square", "blue,white,red", True),
    ("end_of_zone", "End of zone", "other", "square", "white,black", True),
    ("pedestrian_crossing", "Pedestrian crossing", "other", "square", _SQUARE, True),
    ("bicycle_crossing", "Bicycle crossing", "other", "square", _SQUARE, True),
    ("parking_be58", "Parking (variant, class 58)", "other", "square", _SQUARE, True),
    ("speed_bump_info", "Speed hump (information)", "other", "square", _SQUARE, True),
    ("end_priority_road", "End of priority road", "other", "diamond", "white,yellow,black", True),
    ("priority_road", "Priority road", "other", "diamond", "white,yellow", True),
)

# BelgiumTSC's 62 classes. The dataset ships no class names: the meanings of 53 classes were
# identified by eye from the official images (issue 22) and are marked checked; the 9 the check did
# not name (9, 11, 15, 26, 33, 36, 48, 50, 52) keep their earlier guesses from the Belgian sign codes
# in folder order and stay `uncertain`, so they never merge with another country's class. Classes
# whose meaning the check gave but not a sub-type (two double curves, five parking signs) get one
# key each with the class id in it. Class 32 holds every speed-limit value: `speed_limit`, the
# family, never one value (24 and 27 likewise). Flips stay off: the Belgian designs were not checked
# for symmetry.
BELGIUMTSC: tuple[SignClass, ...] = tuple(_be(i, *row) for i, row in enumerate(_BE))  # type: ignore[arg-type]

# "Not a sign": the second stage of detect-then-classify learns it from background cut out of road
# frames and from the detector's false alarms, so a false box is rejected instead of named. It is a
# catalogue of its own ("bg"), merged into a country's space by meaning like any other catalogue.
BACKGROUND_KEY = "not_a_sign"
BACKGROUND: tuple[SignClass, ...] = (
    SignClass(key=BACKGROUND_KEY, name="Not a sign (background)", country="bg", country_id=0, category="other",
              shape="none", colours=(), flip="invariant"),)

# TT100K's Chinese signs by code (pl40, pne, w57, ...), ~200 rows read from signscale/tt100k_codes.tsv.
# The catalogue is named "tt100k" (as "bg" is named for what it holds): its rows would collide with
# TSRD23's ("cn", id) pairs otherwise. Its samples still carry country "cn".
TT100K: tuple[SignClass, ...] = tuple(
    SignClass(key=r.key, name=f"{r.name} [{r.code}]", country="tt100k", country_id=i, category=r.category,  # type: ignore[arg-type]
              shape=r.shape, colours=r.colours, flip=r.flip, mirror=r.mirror, uncertain=r.uncertain)  # type: ignore[arg-type]
    for i, r in enumerate(tt100k_codes.rows()))

CATALOGUES: dict[str, tuple[SignClass, ...]] = {"de": GTSRB, "cn": TSRD23, "be": BELGIUMTSC, "tt100k": TT100K,
                                                "bg": BACKGROUND}

# A country whose signs come in several catalogues: naming it in `for_countries` names them all, so
# "de,cn" is Germany and all of China (TSRD23 and TT100K merged by meaning). A catalogue name picks one.
COUNTRY_CATALOGUES: dict[str, tuple[str, ...]] = {"cn": ("cn", "tt100k")}

# Country codes a record can carry (shards store the index into this table; append only).
COUNTRIES: tuple[str, ...] = ("de", "cn", "be", "fr", "nl", "us", "other")


class LabelError(ValueError):
    """A label, key or country that the label space cannot place."""


Member = tuple[str, int]  # (country, that country's class id)
MergeBy = Literal["meaning", "design"]


@dataclass(frozen=True)
class LabelSpace:
    """The ordered classes a dataset or model predicts; output id ``i`` is ``classes[i]``.

    A single-country space is that country's catalogue. A merged space (:meth:`merge`) also records,
    per output, which (country, country id) pairs it stands for (``members``) and how it was merged
    (``by``): by *meaning* one output per semantic key across countries, by *design* one output per
    country's sign, addressed as ``country:key``, with the semantic key still reported.
    """

    classes: tuple[SignClass, ...]
    name: str = "de"
    by: str = ""  # "" (one catalogue) | "meaning" | "design"
    members: tuple[tuple[Member, ...], ...] = ()  # per class; empty: each class stands for itself
    _index: dict[str, int] = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.by not in ("", "meaning", "design"):
            raise LabelError(f"label space {self.name!r}: by must be 'meaning' or 'design', got {self.by!r}")
        if self.members and len(self.members) != len(self.classes):
            raise LabelError(f"label space {self.name!r}: {len(self.members)} member lists for "
                             f"{len(self.classes)} classes")
        index: dict[str, int] = {}
        for i, c in enumerate(self.classes):
            ident = self.ident(c)
            if ident in index:
                raise LabelError(f"label space {self.name!r}: key {ident!r} appears twice (ids {index[ident]}, {i})")
            index[ident] = i
        object.__setattr__(self, "_index", index)
        if not self.by:  # a subset of a catalogue must keep the mirror partners its catalogue has
            for c in self.classes:
                if c.mirror is not None and c.mirror not in index and c.mirror in _catalogue_keys(c.country):
                    raise LabelError(f"class {c.key!r} mirrors to {c.mirror!r}, which is not in label space "
                                     f"{self.name!r}")

    def ident(self, c: SignClass) -> str:
        """How a class is addressed in this space: its key, or ``country:key`` when merged by design."""
        return f"{c.country}:{c.key}" if self.by == "design" else c.key

    @classmethod
    def for_country(cls, country: str) -> "LabelSpace":
        if country not in CATALOGUES:
            known = ", ".join(sorted(c for c in CATALOGUES if c != "bg"))
            raise LabelError(f"unknown country {country!r}; known catalogues: {known}")
        return cls(classes=CATALOGUES[country], name=country)

    @classmethod
    def for_countries(cls, countries: Iterable[str] | str, by: MergeBy = "meaning",
                      trust_uncertain: bool = False) -> "LabelSpace":
        """One catalogue, or several merged: ``for_countries("de,cn", by="meaning")``.

        A country with several catalogues (``cn``: TSRD23 and TT100K) stands for all of them.
        """
        names = [c.strip() for c in countries.split(",")] if isinstance(countries, str) else list(countries)
        catalogues = dict.fromkeys(cat for c in names if c for cat in COUNTRY_CATALOGUES.get(c, (c,)))
        spaces = [cls.for_country(c) for c in catalogues]
        if len(spaces) == 1:
            return spaces[0]
        return cls.merge(spaces, by=by, trust_uncertain=trust_uncertain)

    @classmethod
    def merge(cls, spaces: Iterable["LabelSpace"], by: MergeBy = "meaning", name: str = "",
              trust_uncertain: bool = False) -> "LabelSpace":
        """One label space over several catalogues; earlier spaces keep their ids first.

        By meaning, classes with the same semantic key become one output; two catalogues that give
        one key different flip rules are refused (augmentation would turn a sign into another). An
        uncertain class never merges with another country's unless ``trust_uncertain``: it gets an
        output of its own keyed ``country:key``, so a guessed meaning cannot pollute a known one.
        """
        if by not in ("meaning", "design"):
            raise LabelError(f"merge by must be 'meaning' or 'design', got {by!r}")
        spaces = list(spaces)
        classes: list[SignClass] = []
        members: list[list[Member]] = []
        where: dict[str, int] = {}
        for space in spaces:
            for i, c in enumerate(space.classes):
                for m in space.members_of(i):
                    member_class = replace(c, country=m[0], country_id=m[1])
                    key = _merge_key(member_class, by, trust_uncertain)
                    if key in where:
                        j = where[key]
                        classes[j] = _merged_flip(classes[j], member_class, members[j][0])
                        if m not in members[j]:
                            members[j].append(m)
                        continue
                    where[key] = len(classes)
                    classes.append(member_class if key == member_class.key or by == "design"
                                   else replace(member_class, key=key, mirror=None, flip="never"))
                    members.append([m])
        countries = "+".join(dict.fromkeys(m[0] for ms in members for m in ms))
        return cls(classes=tuple(classes), name=name or f"{countries}:{by}", by=by,
                   members=tuple(tuple(ms) for ms in members))

    def with_background(self) -> "LabelSpace":
        """This space plus the "not a sign" class (last id); itself if it already has one."""
        if self.background_id is not None:
            return self
        return LabelSpace.merge([self, LabelSpace.for_country("bg")], by=self.by or "meaning")  # type: ignore[arg-type]

    @property
    def background_id(self) -> int | None:
        """The id of the "not a sign" class, or None for a space without one."""
        return next((i for i, c in enumerate(self.classes) if c.key == BACKGROUND_KEY), None)

    def members_of(self, i: int) -> tuple[Member, ...]:
        """The (country, country id) pairs output ``i`` stands for."""
        if self.members:
            return self.members[i]
        c = self.classes[i]
        return ((c.country, c.country_id),)

    def countries(self) -> list[str]:
        """The countries whose catalogues this space covers ("not a sign" belongs to none)."""
        return list(dict.fromkeys(m[0] for i in range(len(self)) for m in self.members_of(i) if m[0] != "bg"))

    def map_from(self, other: "LabelSpace") -> np.ndarray:
        """``m[j]``: this space's id for ``other``'s class ``j``, or -1 where it has no place here.

        Classes are matched through the (country, country id) pairs both spaces record, so a
        model's space and a dataset's map onto each other whatever order or merge they were built in.
        """
        owner = {m: i for i in range(len(self)) for m in self.members_of(i)}
        out = np.full(len(other), -1, dtype=np.int64)
        for j in range(len(other)):
            hits = {owner[m] for m in other.members_of(j) if m in owner}
            if len(hits) == 1:
                out[j] = hits.pop()
            elif len(hits) > 1:
                raise LabelError(f"class {other.ident(other[j])!r} of label space {other.name!r} maps to several "
                                 f"classes of {self.name!r}: {sorted(self.ident(self[h]) for h in hits)}")
        return out

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, i: int) -> SignClass:
        return self.classes[i]

    @property
    def keys(self) -> list[str]:
        return [self.ident(c) for c in self.classes]

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
        """``m[i]`` is the class a horizontally flipped image of class ``i`` shows, or -1 if it must not flip.

        A mirror partner missing from this space (cn has keep_right but no keep_left) means no flip.
        """
        m = np.full(len(self.classes), -1, dtype=np.int64)
        for i, c in enumerate(self.classes):
            if c.flip == "invariant":
                m[i] = i
            elif c.flip == "mirror":
                partner = f"{c.country}:{c.mirror}" if self.by == "design" else c.mirror
                m[i] = self._index.get(partner, -1)  # type: ignore[arg-type]
        return m

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": LABEL_SPACE_FORMAT, "name": self.name,
                             "classes": [{**asdict(c), "colours": list(c.colours)} for c in self.classes]}
        if self.by:  # single catalogues keep the exact dict (and fingerprint) they always had
            d["by"] = self.by
            d["members"] = [[list(m) for m in ms] for ms in self.members]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LabelSpace":
        if d.get("format") != LABEL_SPACE_FORMAT:
            raise LabelError(f"label space format {d.get('format')!r} is not supported (expected {LABEL_SPACE_FORMAT})")
        classes = tuple(SignClass(**{**c, "colours": tuple(c["colours"])}) for c in d["classes"])
        members = tuple(tuple((str(m[0]), int(m[1])) for m in ms) for ms in d.get("members", ()))
        return cls(classes=classes, name=d["name"], by=d.get("by", ""), members=members)

    def fingerprint(self) -> str:
        """Short stable hash: two label spaces with the same fingerprint number classes the same way."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def table(self) -> list[tuple[int, str, str, str, str]]:
        return [(i, self.ident(c), c.name, c.category, c.flip if c.flip != "mirror" else f"-> {c.mirror}")
                for i, c in enumerate(self.classes)]

    def mapping_rows(self) -> list[dict[str, Any]]:
        """One row per output: id, key, name, and each country's own id for it (``None``: absent)."""
        countries = self.countries()
        rows = []
        for i, c in enumerate(self.classes):
            ids: dict[str, list[int]] = {k: [] for k in countries}
            for country, cid in self.members_of(i):
                ids[country].append(cid)
            rows.append({"id": i, "key": self.ident(c), "semantic_key": c.key, "name": c.name,
                         "category": c.category, "uncertain": c.uncertain,
                         "ids": {k: (v[0] if len(v) == 1 else v) if v else None for k, v in ids.items()}})
        return rows


def _catalogue_keys(country: str) -> set[str]:
    """The keys of a country's catalogue (empty for a country without one)."""
    return {c.key for c in CATALOGUES.get(country, ())}


def _merge_key(c: SignClass, by: str, trust_uncertain: bool) -> str:
    # A merged space's uncertain classes already carry their "country:" prefix; strip it (and the
    # doubled ones older merges saved) before adding it once, or re-merging a merged space (a model
    # grown again with `--init-from`) gives such a class a second output.
    key, prefix = c.key, f"{c.country}:"
    while key.startswith(prefix):
        key = key[len(prefix):]
    if by == "design" or (c.uncertain and not trust_uncertain):
        return prefix + key
    return key


def _merged_flip(kept: SignClass, new: SignClass, kept_member: Member) -> SignClass:
    """The flip rule of one meaning shared by two designs: the stricter one, or an error if they contradict.

    Designs differ (de yield is an empty triangle and flips freely; cn yield carries "让" and must
    not flip), so "never" in any catalogue wins: augmentation never produces a sign that one of the
    countries does not have. Two rules that both allow flipping but disagree on the result
    (invariant vs mirror, or mirrors to different keys) mean one catalogue is wrong.
    """
    if (kept.flip, kept.mirror) == (new.flip, new.mirror):
        return kept
    if "never" in (kept.flip, new.flip):
        return replace(kept, flip="never", mirror=None)
    raise LabelError(f"cannot merge {kept_member[0]}:{kept.key} (flip {kept.flip}"
                     f"{' -> ' + kept.mirror if kept.mirror else ''}) with {new.country}:{new.key} (flip "
                     f"{new.flip}{' -> ' + new.mirror if new.mirror else ''}): one meaning cannot flip into two "
                     f"different signs; fix one catalogue's flip rule")


def category_ids(space: LabelSpace, keys: Iterable[str] = CATEGORIES) -> np.ndarray:
    """Map each class id to the index of its category (prohibitory, danger, mandatory, other)."""
    order = list(keys)
    return np.array([order.index(c.category) for c in space.classes], dtype=np.int64)
