"""Other countries' readers, training across a merged label space, and extending a model to a new country."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from signscale.data.sources import open_source
from signscale.images import encode_png
from signscale.labels import LabelSpace

SHARED_TSRD = Path(__file__).resolve().parents[2] / "shared" / "data" / "TSRD23_crops_64px.zip"


def _png(label: int, variant: int, h: int = 40, w: int = 30) -> bytes:
    rng = np.random.default_rng(label * 1000 + variant)
    arr = np.full((h, w, 3), (label * 11) % 256, dtype=np.uint8)
    arr[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(0, 255, 3, dtype=np.uint8)
    return encode_png(arr)


@pytest.fixture(scope="module")
def tsrd_zip(tmp_path_factory) -> str:
    """4 classes x 3 runs of 4 consecutive indices; index 900 is a byte copy of index 100."""
    path = tmp_path_factory.mktemp("tsrd") / "TSRD23_crops_64px.zip"
    with zipfile.ZipFile(path, "w") as z:
        idx = 100
        for label in range(4):
            for run in range(3):
                for k in range(4):
                    z.writestr(f"TSRD23/{label}_{idx}.png", _png(label, idx))
                    idx += 1
                idx += 5  # a gap: the next run is another physical sign
        z.writestr("TSRD23/0_900.png", _png(0, 100))  # the same file under a second index
        z.writestr("TSRD23/99_901.png", _png(0, 901))  # a label the cn catalogue lacks
        z.writestr("TSRD23/readme_1.png", b"not a png")  # a name that is not LABEL_INDEX
    return str(path)


def test_tsrd23_reads_labels_country_and_reports_bad_entries(tsrd_zip):
    src = open_source(f"tsrd23:{tsrd_zip}")
    assert len(src) == 4 * 12 + 3 and src.label_space.name == "cn"
    good = [s for s in src.entries() if hasattr(s, "label")]
    assert len(good) == 49 and {s.country for s in good} == {"cn"}
    problems = {p.reason for p in src.entries() if not hasattr(p, "label")}
    assert problems == {"label_out_of_range", "bad_name"}
    sample = src.read(0)
    assert sample.image[:4] == b"\x89PNG" and sample.track


def test_tsrd23_split_holds_out_whole_index_blocks_and_joins_exact_duplicates(tsrd_zip):
    train = open_source(f"tsrd23:{tsrd_zip}?split=train&val_fraction=0.34&block=4")
    val = open_source(f"tsrd23:{tsrd_zip}?split=val&val_fraction=0.34&block=4")
    t_keys = {s.key for s in train.entries()}
    v_keys = {s.key for s in val.entries()}
    assert not t_keys & v_keys and len(t_keys) + len(v_keys) == 51
    t_blocks = {s.track for s in train.entries() if hasattr(s, "track")}
    v_blocks = {s.track for s in val.entries() if hasattr(s, "track")}
    assert not (t_blocks - {None}) & (v_blocks - {None})
    # 0_100 and its byte copy 0_900 are on the same side, whichever it is
    assert ("0_100.png" in t_keys) == ("0_900.png" in t_keys)
    assert {s.label for s in val.entries() if hasattr(s, "label")} >= {0, 1, 2, 3}  # every class validated


def _belgium_fixture(root: Path) -> None:
    """BelgiumTSC's layout with its swapped axes: images 30 wide x 50 high, ROI in the lower half."""
    for cls in (0, 19):
        folder = root / f"{cls:05d}"
        folder.mkdir(parents=True)
        lines = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for pole in range(3):
            for frame in range(2):
                name = f"{pole:05d}_{frame:05d}.ppm"
                arr = np.zeros((50, 30, 3), np.uint8)
                arr[25:45, 5:25] = 200
                (folder / name).write_bytes(b"P6\n30 50\n255\n" + arr.tobytes())
                # true box x 5..25, y 25..45 of a 30x50 image, written as BelgiumTSC does: Width = height,
                # Roi.X* = rows
                lines.append(f"{name};50;30;25;5;45;25;{cls}")
        (folder / f"GT-{cls:05d}.csv").write_text("\n".join(lines) + "\n")


def test_belgiumtsc_swaps_the_csv_axes_back_so_rois_land_inside_the_image(tmp_path):
    _belgium_fixture(tmp_path / "Training")
    src = open_source(f"belgiumtsc:{tmp_path / 'Training'}")
    assert len(src) == 12 and src.label_space.name == "be"
    s = src.read(0)
    assert s.country == "be" and s.track and s.label in (0, 19)
    assert s.roi == (5, 25, 25, 45)  # x1, y1, x2, y2 inside the 30x50 image, on the bright patch
    x1, y1, x2, y2 = s.roi
    assert x2 <= 30 and y2 <= 50
    val = open_source(f"belgiumtsc:{tmp_path / 'Training'}?split=val&val_fraction=0.34")
    train = open_source(f"belgiumtsc:{tmp_path / 'Training'}?split=train&val_fraction=0.34")
    assert not {s.track for s in val.entries()} & {s.track for s in train.entries()}  # whole poles held out


def test_grow_head_keeps_old_logits_for_old_classes():
    from signscale.models import create_model, grow_head, model_config

    torch.manual_seed(0)
    old = create_model("small_cnn", 5).eval()
    rows = [0, 1, -1, 2, 3, 4, -1]  # two new classes interleaved
    new = grow_head(model_config(old), old.state_dict(), rows).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = old(x), new(x)
    assert b.shape == (4, 7)
    torch.testing.assert_close(b[:, [0, 1, 3, 4, 5]], a, rtol=0, atol=1e-6)  # a wider matmul may round differently


@pytest.fixture(scope="module")
def two_countries(tmp_path_factory, tsrd_zip) -> tuple[str, str]:
    from signscale.data.pack import PackConfig, pack

    root = tmp_path_factory.mktemp("countries")
    de = str(root / "de")
    cn = str(root / "cn")
    pack(PackConfig(source="synthetic:?n=200&size=16&seed=3", out=de, image_size=16, workers=0, progress=False))
    pack(PackConfig(source=f"tsrd23:{tsrd_zip}", out=cn, image_size=16, workers=0, progress=False))
    return de, cn


def test_stream_maps_each_countrys_ids_into_the_merged_space(two_countries):
    from signscale.data.shards import ShardError
    from signscale.data.stream import ShardStream, StreamConfig, unpack_batch

    de, cn = two_countries
    merged = LabelSpace.for_countries("de,cn", by="meaning")
    with pytest.raises(ShardError, match="different label spaces"):
        ShardStream(StreamConfig(datasets=(de, cn), batch_size=16))
    stream = ShardStream(StreamConfig(datasets=(de, cn), batch_size=16, shuffle=False), label_space=merged)
    lut = merged.map_from(LabelSpace.for_country("cn"))
    seen = {0: set(), 1: set()}
    for b in stream:
        b = unpack_batch(b)
        for d, y in zip(b["dataset"].tolist(), b["label"].tolist()):
            seen[d].add(y)
    assert seen[0] <= set(range(43))
    assert seen[1] == {int(lut[i]) for i in range(4)}  # cn 0..3 -> their merged ids
    with pytest.raises(ShardError, match="no place"):
        ShardStream(StreamConfig(datasets=(cn,), batch_size=16), label_space=LabelSpace.for_country("de"))


def test_country_weights_name_a_country_or_one_of_its_catalogues():
    from types import SimpleNamespace

    from signscale.training.train import country_mixing

    # what country_mixing reads of a manifest: its label space (real catalogues) and where it is
    de, tsrd, tt = (SimpleNamespace(label_space=LabelSpace.for_country(c), root=c) for c in ("de", "cn", "tt100k"))
    assert country_mixing([de, tsrd, tt], {"cn": 2.5}) == (1.0, 2.5, 2.5)  # TT100K's signs are Chinese too
    assert country_mixing([de, tsrd, tt], {"cn": 2.0, "tt100k": 3.0}) == (1.0, 2.0, 3.0)  # its own name first


def test_train_on_two_countries_then_extend_a_one_country_model(two_countries, tmp_path):
    from signscale.training.checkpoint import load_model_artefact
    from signscale.training.train import TrainConfig, train

    de, cn = two_countries
    common = dict(model="small_cnn", batch_size=32, max_steps=3, workers=0, progress=False, ema=0)
    r = train(TrainConfig(data=(de, cn), out=str(tmp_path / "both"), country_weights={"cn": 2.0}, **common))
    _, meta = load_model_artefact(r.model_url)
    space = LabelSpace.from_dict(meta["label_space"])
    assert len(space) == 55 and space.by == "meaning"  # 43 + the 12 TSRD23 meanings GTSRB lacks
    assert meta["model_config"]["num_classes"] == 55

    de_only = train(TrainConfig(data=(de,), out=str(tmp_path / "de"), **common))
    grown = train(TrainConfig(data=(cn, de), out=str(tmp_path / "grown"), init_from=de_only.model_url, **common))
    state, meta = load_model_artefact(grown.model_url)
    space = LabelSpace.from_dict(meta["label_space"])
    assert space.keys[:43] == LabelSpace.for_country("de").keys  # old outputs keep their ids
    assert len(space) == 55 and state["head.weight"].shape[0] == 55  # the whole cn catalogue joins
    from signscale.evaluation.transfer import TransferConfig, transfer_matrix

    res = transfer_matrix(TransferConfig(models={"de": de_only.model_url, "de+cn": r.model_url},
                                         data={"de": de, "cn": cn}, out=str(tmp_path / "transfer"), workers=0))
    assert res.cells["de"]["cn"]["error"]  # the fixture's cn classes have no meaning in common with de
    assert (
        res.cells["de+cn"]["cn"]["scored"] == 48 and res.cells["de+cn"]["cn"]["skipped"] == 0
    )  # 49 less the byte copy
    assert res.cells["de"]["de"]["scored"] == res.cells["de+cn"]["de"]["scored"] > 0
    assert "no shared class" in res.table() and (tmp_path / "transfer" / "transfer.png").stat().st_size > 1000


def test_labels_command_prints_the_merged_table_and_names_bad_countries():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "signscale", "labels", "--countries", "de,cn", "--by", "meaning",
                        "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json

    rows = {row["key"]: row for row in json.loads(r.stdout)["classes"]}
    for key in ("speed_limit_60", "no_entry", "yield", "keep_right", "turn_right_ahead"):
        assert rows[key]["ids"]["de"] is not None and rows[key]["ids"]["cn"] is not None, key
    assert rows["no_honking"]["ids"] == {"de": None, "cn": 8, "tt100k": 27} and rows["no_honking"]["id"] >= 43
    r = subprocess.run([sys.executable, "-m", "signscale", "labels", "--countries", "de,xx"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "unknown country 'xx'" in r.stdout


@pytest.mark.skipif(not SHARED_TSRD.exists(), reason=f"real TSRD23 crops not found at {SHARED_TSRD}")
def test_real_tsrd23_has_4896_samples_23_classes_and_a_split_without_shared_content():
    src = open_source(f"tsrd23:{SHARED_TSRD}")
    assert len(src) == 4896 and len({s.label for s in src.entries()}) == 23
    train = open_source(f"tsrd23:{SHARED_TSRD}?split=train")
    val = open_source(f"tsrd23:{SHARED_TSRD}?split=val")
    import hashlib

    def digests(s):
        return {hashlib.sha256(src.tree.read(f"TSRD23/{e.key}")).hexdigest() for e in s.entries()}

    assert not digests(train) & digests(val)  # no byte-identical image on both sides
