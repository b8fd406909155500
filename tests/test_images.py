"""images.decode, the one decode path: every input becomes the pixels a person would see.

Each test builds its file in memory (16-bit PNG and TIFF by hand, since PIL cannot write 16-bit
RGB), decodes it, and checks pixel values that the old decode got wrong or could get wrong.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from signscale import images
from signscale.data import shards
from signscale.data.manifest import Manifest
from signscale.data.pack import PackConfig, pack
from signscale.data.sources import Problem, open_source

GREY16 = 40000
GREY16_AS_8 = round(GREY16 * 255 / 65535)  # 156: scaled; the old decode clipped it to 255


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit grey (HxW) or RGB (HxWx3) PNG, written chunk by chunk."""
    arr = np.asarray(arr, dtype=">u2")
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2 if arr.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def tiff16(arr: np.ndarray) -> bytes:
    """An uncompressed little-endian 16-bit grey or RGB TIFF: one strip, ten tags."""
    arr = np.asarray(arr, dtype="<u2")
    h, w = arr.shape[:2]
    spp = arr.shape[2] if arr.ndim == 3 else 1
    n_tags = 10
    bps_at = 8 + 2 + n_tags * 12 + 4  # BitsPerSample values follow the IFD when there are three
    data_at = bps_at + 2 * spp
    tags = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, spp, bps_at if spp == 3 else 16), (259, 3, 1, 1),
            (262, 3, 1, 2 if spp == 3 else 1), (273, 4, 1, data_at), (277, 3, 1, spp), (278, 3, 1, h),
            (279, 4, 1, arr.nbytes), (284, 3, 1, 1)]
    out = b"II*\x00" + struct.pack("<IH", 8, n_tags)
    out += b"".join(struct.pack("<HHII", *t) for t in tags) + struct.pack("<I", 0)
    return out + struct.pack("<" + "H" * spp, *[16] * spp) + arr.tobytes()


def encoded(img: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


@pytest.mark.parametrize("writer", [png16, tiff16], ids=["png", "tiff"])
def test_16bit_grey_is_scaled_not_clipped(writer) -> None:
    arr = images.decode(writer(np.full((6, 5), GREY16)))
    assert arr.shape == (6, 5, 3) and arr.dtype == np.uint8
    assert (arr == GREY16_AS_8).all()
    ramp = images.decode(writer(np.array([[0, 257, 32768, 65535]])))[0, :, 0]
    assert ramp.tolist() == [0, 1, 128, 255]


@pytest.mark.parametrize("writer", [png16, tiff16], ids=["png", "tiff"])
def test_16bit_rgb_keeps_each_channels_level(writer) -> None:
    levels = np.array([GREY16, 20000, 65535, 511])
    rgb = np.stack([np.tile(levels[:3], (4, 4, 1))[..., i] for i in range(3)], axis=-1)
    rgb[0, 0] = levels[[3, 0, 1]]
    arr = images.decode(writer(rgb)).astype(int)
    want = np.round(rgb * 255 / 65535).astype(int)
    assert np.abs(arr - want).max() <= 1  # PIL keeps the high byte of 16-bit RGB: within one level


def test_16bit_grey_png_packs_scaled(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "keep_right").mkdir(parents=True)
    (tmp_path / "imgs" / "keep_right" / "grey.png").write_bytes(png16(np.full((20, 20), GREY16)))
    res = pack(PackConfig(source=f"folder:{tmp_path / 'imgs'}", out=str(tmp_path / "ds"), image_size=16, workers=0,
                          progress=False))
    assert res.count == 1 and res.quarantined == 0
    m = Manifest.load(str(tmp_path / "ds"))
    rec = shards.ShardReader(m.shard_url(0)).records(0, 1)[0]
    assert (rec["image"] == GREY16_AS_8).all()


def test_palette_transparency_is_composited_on_white() -> None:
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 200, 0] + [0] * 762)  # index 0 red (transparent), index 1 green
    img.putpixel((3, 1), 1)
    for data in (encoded(img, "PNG", transparency=0), encoded(img, "GIF", transparency=0)):
        arr = images.decode(data)
        assert tuple(arr[0, 0]) == images.BACKGROUND == (255, 255, 255)
        assert tuple(arr[1, 3]) == (0, 200, 0)


def test_alpha_is_composited_on_the_stated_background() -> None:
    rgba = Image.new("RGBA", (3, 3), (255, 0, 0, 128))
    rgba.putpixel((0, 0), (10, 20, 30, 0))
    rgba.putpixel((2, 2), (10, 20, 30, 255))
    arr = images.decode(encoded(rgba, "PNG"))
    assert tuple(arr[1, 1]) == (255, 127, 127)  # half red over white
    assert tuple(arr[0, 0]) == (255, 255, 255)  # fully transparent: the background, not (10, 20, 30)
    assert tuple(arr[2, 2]) == (10, 20, 30)
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (100, 255))
    assert images.decode(encoded(la, "PNG"))[0].tolist() == [[255] * 3, [100] * 3]


def test_cmyk_jpeg_is_converted() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red ink
    cmyk.paste((0, 0, 0, 255), (8, 0, 16, 16))  # black ink on the right half
    arr = images.decode(encoded(cmyk, "JPEG", quality=95)).astype(int)
    assert np.abs(arr[8, 2] - (255, 0, 0)).max() <= 8
    assert np.abs(arr[8, 13] - (0, 0, 0)).max() <= 8


def test_exif_orientation_is_applied() -> None:
    stored = Image.new("RGB", (40, 20), (220, 0, 0))  # stored sideways: red left, blue right
    stored.paste((0, 0, 220), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    for fmt in ("JPEG", "PNG"):
        arr = images.decode(encoded(stored, fmt, exif=exif)).astype(int)
        assert arr.shape == (40, 20, 3)  # upright: portrait
        assert np.abs(arr[2, 10] - (220, 0, 0)).max() <= 12  # red on top
        assert np.abs(arr[37, 10] - (0, 0, 220)).max() <= 12  # blue at the bottom


def test_animated_images_decode_their_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    for fmt in ("GIF", "PNG"):
        data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
        assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
        assert {tuple(p) for p in images.decode(data).reshape(-1, 3)} == {(255, 0, 0)}


def test_a_folder_named_like_an_image_is_not_a_file(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    (root / "keep_right" / "x.png").mkdir(parents=True)
    (root / "keep_right" / "a.png").write_bytes(encoded(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG"))
    (root / "list.csv").write_text("path,label\nkeep_right/x.png,keep_right\nkeep_right/a.png,keep_right\n")
    for spec in (f"folder:{root}", f"folder:{root}/list.csv"):
        src = open_source(spec)
        read = {os.path.basename(e.key): src.read(i) for i, e in enumerate(src.entries())}
        bad = read["x.png"]
        assert isinstance(bad, Problem) and bad.reason == "not_a_file", spec
        assert "is a folder, not a file" in bad.detail and "does not exist" not in bad.detail
        assert not isinstance(read["a.png"], Problem)
    res = pack(PackConfig(source=f"folder:{root}", out=str(tmp_path / "ds"), image_size=8, workers=0, progress=False))
    assert res.count == 1 and res.by_reason == {"not_a_file": 1}


def test_predict_decodes_through_the_same_path(tmp_path: Path) -> None:
    """Predictor.prepare (the CLI's and the service's way in) sees what pack sees; a folder is not a file."""
    torch = pytest.importorskip("torch")
    from signscale.labels import LabelSpace
    from signscale.models import create_model, model_config
    from signscale.serving.predict import Predictor
    from signscale.training import checkpoint
    from signscale.transforms import Preprocess

    torch.manual_seed(0)
    model = create_model("small_cnn", 43, widths=[4, 8, 8])
    url = str(tmp_path / "model")
    checkpoint.save_model(
        url,
        state_dict=model.state_dict(),
        model_config=model_config(model),
        label_space=LabelSpace.for_country("de").to_dict(),
        preprocess=Preprocess(image_size=16).to_dict(),
        metrics={},
        extra={},
    )
    predictor = Predictor.load(url)
    assert (predictor.prepare(png16(np.full((24, 24), GREY16))) == GREY16_AS_8).all()
    (tmp_path / "x.png").mkdir()
    out = predictor.classify_files([str(tmp_path / "x.png")])
    assert out[0]["error"]["reason"] == "not_a_file" and "is a folder" in out[0]["error"]["message"]
