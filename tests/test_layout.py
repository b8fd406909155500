"""The package's plan holds: wings import only wings below them, nothing imports in a circle, no
module outgrows one concept, and every module has a test (a file of its name, a test that imports
it, or a ``COVERS`` line in the test that exercises it through another module)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 700


def _architecture():
    spec = importlib.util.spec_from_file_location("architecture", ROOT / "scripts" / "architecture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _plan():
    a = _architecture()
    src = ROOT / "src" / "signscale"
    mods = a.modules(src)
    rooms = [m for m, p in mods.items() if p.name != "__init__.py"]
    graph = {m: {b for b in a.imports(m, mods[m], set(mods)) if b in rooms} for m in rooms}
    return a, src, mods, rooms, graph


def test_no_circles_and_no_import_runs_back_up_the_pipeline():
    a, src, _, rooms, graph = _plan()
    assert a.circles(graph) == []
    back = [(m, b) for m in rooms for b in graph[m] if a.rank(m, src) < a.rank(b, src)]
    assert back == [], f"imports that run back up the pipeline (see scripts/architecture.py WING_RANK): {back}"


def test_no_module_outgrows_one_concept():
    _, _, mods, rooms, _ = _plan()
    big = {m: n for m in rooms if (n := len(mods[m].read_text().splitlines())) > MAX_MODULE_LINES}
    assert big == {}, f"split these along their own sections: {big}"


def _covered_by_tests(a, known: set[str]) -> set[str]:
    covered: set[str] = set()
    for f in (ROOT / "tests").rglob("*.py"):
        covered |= a.imports(f"tests.{f.stem}", f, known)
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "COVERS" for t in node.targets):
                covered |= set(ast.literal_eval(node.value))
    return covered


def test_every_module_has_a_test():
    a, _, mods, rooms, _ = _plan()
    covered = _covered_by_tests(a, set(mods))
    named = {p.stem.removeprefix("test_") for p in (ROOT / "tests").glob("test_*.py")}
    untested = [m for m in rooms if m not in covered and m.rsplit(".", 1)[-1] not in named
                and not m.endswith("__main__")]
    assert untested == [], f"modules no test imports or names in COVERS: {untested}"
    stale = sorted(c for c in covered if c.startswith("signscale") and c not in mods)
    assert stale == [], f"COVERS names modules that do not exist: {stale}"
