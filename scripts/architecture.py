"""The package's plan, drawn from its own imports: rooms, floors, arrows, circles, arrows running back up.

    python scripts/architecture.py            # the counts, the wings and every circle / back-up arrow
    python scripts/architecture.py --dot F    # also the graph of wings as Graphviz text

A *room* is a module, an *arrow* one module importing another (anywhere in it, functions included),
a *floor* a level of the import graph once circles are folded into one node (floor 1 imports nothing
of ours), a *circle* a set of modules that import each other. A *wing* is a top-level sub-package
(``data``, ``training``, ...) or, for the ground floor, a plain module. Wings have ranks in the
order the pipeline reads (``WING_RANK``); an arrow from a lower wing to a higher one runs back up.
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = "signscale"
# cli -> continual, bench -> serving -> evaluation, detection -> training -> data -> ground floor
WING_RANK = {
    "cli": 8,
    "demos": 7,
    "bench": 6,
    "testing": 6,
    "continual": 5,
    "serving": 4,
    "evaluation": 3,
    "detection": 3,
    "training": 2,
    "data": 1,
}
GROUND = 0


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``__init__`` as the package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, at any depth of its code."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, is_pkg, node.module, node.level)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t != PACKAGE:
                found.add(t)
    return found


def _absolute(name: str, is_pkg: bool, module: str | None, level: int) -> str:
    if not level:
        return module or ""
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def wing(module: str) -> str:
    """``signscale.data.stream`` -> ``data``; a ground-floor module is its own wing."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def rank(module: str, root: Path) -> int:
    w = wing(module)
    return WING_RANK.get(w, GROUND) if (root / w).is_dir() or w in WING_RANK else GROUND


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def floors(graph: dict[str, set[str]], comps: list[list[str]]) -> int:
    """Levels of the graph with each circle folded into one node."""
    rep = {m: c[0] for c in comps for m in c}
    folded: dict[str, set[str]] = defaultdict(set)
    for a, bs in graph.items():
        folded[rep.get(a, a)] |= {rep.get(b, b) for b in bs if rep.get(b, b) != rep.get(a, a)}
    depth: dict[str, int] = {}

    def level(v: str) -> int:
        if v not in depth:
            depth[v] = 0
            depth[v] = 1 + max((level(w) for w in folded.get(v, ())), default=0)
        return depth[v]

    sys.setrecursionlimit(10_000)
    return max((level(v) for v in list(folded) + list(graph)), default=0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src" / PACKAGE))
    ap.add_argument("--dot", help="write the graph of wings as Graphviz text to this file")
    args = ap.parse_args(argv)
    root = Path(args.src)
    mods = modules(root)
    graph = {m: imports(m, p, set(mods)) for m, p in mods.items()}
    # a package's __init__ re-exporting its modules is the package's door, not a room of its own
    rooms = [m for m, p in mods.items() if p.name != "__init__.py"]
    arrows = [(a, b) for a in rooms for b in graph[a] if b in rooms]
    comps = circles({m: {b for b in graph[m] if b in rooms} for m in rooms})
    back = [(a, b) for a, b in arrows if rank(a, root) < rank(b, root)]
    wings = sorted({wing(m) for m in rooms if (root / wing(m)).is_dir()})
    big = sorted(((len(mods[m].read_text().splitlines()), m) for m in rooms), reverse=True)
    print(f"rooms {len(rooms)}, floors {floors({m: {b for b in graph[m] if b in rooms} for m in rooms}, comps)}, "
          f"arrows {len(arrows)}, circles {len(comps)}, back-up arrows {len(back)}, wings {len(wings)} "
          f"({', '.join(wings)}), ground-floor modules {sum(1 for m in rooms if m.count('.') == 1)}, "
          f"modules over 700 lines {sum(1 for n, _ in big if n > 700)}")
    for c in comps:
        print("circle:", " <-> ".join(c))
    for a, b in back:
        print(f"back up: {a} -> {b}")
    for n, m in big:
        if n > 700:
            print(f"over 700 lines: {m} ({n})")
    if args.dot:
        edges = sorted({(wing(a), wing(b)) for a, b in arrows if wing(a) != wing(b)})
        Path(args.dot).write_text("digraph wings {\n" + "".join(f'  "{a}" -> "{b}";\n' for a, b in edges) + "}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
