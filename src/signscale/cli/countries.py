"""``signscale labels``: the catalogues and how they merge into one label space."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from signscale.cli._commands import Commands, console


def _labels(args: argparse.Namespace) -> int:
    from signscale.labels import LabelSpace

    space = LabelSpace.for_countries(args.countries, by=args.by, trust_uncertain=args.trust_uncertain)
    rows = space.mapping_rows()
    if args.json:
        console.print_json(json.dumps({"name": space.name, "by": space.by, "classes": rows}))
        return 0
    countries = space.countries()
    table = Table(title=f"label space {space.name}: {len(space)} classes")
    for col in ("id", "key", "name", *countries):
        table.add_column(col, justify="right" if col == "id" or col in countries else "left")
    for r in rows:
        ids = ["" if r["ids"][c] is None else str(r["ids"][c]) for c in countries]
        name = r["name"] + (" [yellow](uncertain)[/]" if r["uncertain"] else "")
        table.add_row(str(r["id"]), r["key"], name, *ids)
    console.print(table)
    shared = sum(1 for r in rows if sum(v is not None for v in r["ids"].values()) > 1)
    console.print(f"{space.name}: {len(space)} classes from {', '.join(countries)}; {shared} shared by more than "
                  f"one country; fingerprint {space.fingerprint()}")
    return 0


def _pairs(items: list[str], what: str) -> dict[str, str]:
    from signscale.config import ConfigError

    out = {}
    for item in items:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise ConfigError(f"--{what} {item!r}: expected NAME=URL, e.g. --{what} de=runs/de/model")
        out[name] = url
    return out


def _transfer(args: argparse.Namespace) -> int:
    from signscale.evaluation.transfer import TransferConfig, transfer_matrix

    res = transfer_matrix(TransferConfig(models=_pairs(args.model, "model"), data=_pairs(args.data, "data"),
                                         out=args.out or "", workers=args.workers))
    console.print(res.table())
    console.print(res.summary() + (f"; written to {args.out}" if args.out else ""))
    return 0


def register(r: Commands) -> None:
    p = r.add("labels", _labels, "print a country's catalogue or several merged into one label space, as a table")
    p.add_argument("--countries", default="de",
                   help="comma list of countries or catalogues, e.g. de,cn,be (cn: TSRD23 and TT100K; tt100k: one)")
    p.add_argument("--by", choices=["meaning", "design"], default="meaning",
                   help="meaning: one output per semantic key; design: one per country's sign")
    p.add_argument("--trust-uncertain", action="store_true",
                   help="let classes whose meaning is marked uncertain merge with other countries' classes")
    p.add_argument("--json", action="store_true", help="the mapping as JSON")

    p = r.add(
        "transfer", _transfer, "transfer matrix: every model scored on every country's data, over shared meanings"
    )
    p.add_argument("--model", action="append", default=[], required=True, help="NAME=MODEL_URL (repeat)")
    p.add_argument("--data", action="append", default=[], required=True, help="NAME=DATASET_URL_OR_SOURCE (repeat)")
    p.add_argument("--out", help="folder for transfer.json, transfer.md, transfer.png")
    p.add_argument("--workers", type=int, default=1)
