"""Cell image files: the formats (``png`` at a fast level, lossless ``webp``, ``jpeg`` q95),
that metrics score the image in memory (the format changes no score), that readers open
whatever file a cell stored, the grid thumbnails made once by the sweep, and the flag."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from adapterswap.cli import main
from adapterswap.errors import InvalidArgumentError
from adapterswap.sweep.compare import compare_runs
from adapterswap.sweep.engine import run_sweep
from adapterswap.sweep.images_io import (
    IMAGE_FORMATS,
    THUMB_MAX,
    ImageEncoder,
    encode_image,
    thumbnail_long_side,
)
from adapterswap.sweep.report import build_report, image_grids
from adapterswap.sweep.report.images import grid_tile
from adapterswap.sweep.spec import SweepSpec
from adapterswap.sweep.store import RunStore

#: JPEG at quality 95, 4:4:4, of a smooth image with mild noise: well above this PSNR (dB).
JPEG_MIN_PSNR = 35.0


def photo_like(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """Smooth gradients with mild noise: closer to a generated image than pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], -1)
    pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(float) - b.astype(float)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def small_spec(out, **overrides) -> SweepSpec:
    values = dict(backbones=["toy-fast"], preset="tiny", seeds=[0, 1], steps=[1, 4],
                  out=str(out), metrics=["sharpness", "contrast", "toy-colour-match"],
                  timing_repeats=0)
    values.update(overrides)
    return SweepSpec(**values)


def cells(out) -> dict[tuple, dict]:
    with RunStore(out, lock=False) as store:
        return {(r["seed"], r["steps"]): r for r in store.rows()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One small sweep per format (same cells)."""
    root = tmp_path_factory.mktemp("formats")
    for name in IMAGE_FORMATS:
        summary = run_sweep(small_spec(root / name, image_format=name).validate())
        assert summary.done == 4 and summary.failed == 0
    return root


# -- encoding ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["png", "webp"])
def test_lossless_formats_store_the_same_pixels(name):
    image = photo_like()
    encoded = encode_image(image, name)
    assert encoded.suffix == IMAGE_FORMATS[name].suffix
    assert np.array_equal(decoded(encoded.data), np.asarray(image, dtype=np.int16))


def test_png_uses_a_fast_level_and_webp_is_smaller():
    image = photo_like(256, 256)
    fast = encode_image(image, "png").data
    default = io.BytesIO()
    image.save(default, format="PNG")  # Pillow's default, level 6
    assert IMAGE_FORMATS["png"].options["compress_level"] == 1
    assert fast != default.getvalue()
    assert np.array_equal(decoded(fast), decoded(default.getvalue()))
    assert len(encode_image(image, "webp").data) < len(fast)


def test_jpeg_is_lossy_but_close():
    image = photo_like()
    encoded = encode_image(image, "jpeg")
    assert encoded.suffix == ".jpg" and not IMAGE_FORMATS["jpeg"].lossless
    assert psnr(decoded(encoded.data), np.asarray(image)) > JPEG_MIN_PSNR


def test_thumbnail_comes_with_the_image_when_asked():
    image = photo_like(600, 300)
    assert encode_image(image, "jpeg").thumbnail is None
    thumb = decoded(encode_image(image, "jpeg", with_thumbnail=True).thumbnail)
    assert thumb.shape == (128, THUMB_MAX, 3)
    assert thumbnail_long_side(600, 300) == THUMB_MAX
    assert thumbnail_long_side(16, 16) == 128 and thumbnail_long_side(200, 100) == 200


def test_parallel_encoder_gives_the_bytes_of_serial_encoding():
    images = [photo_like(seed=k) for k in range(6)]
    encoder = ImageEncoder("webp", workers=2)
    try:
        futures = [encoder.submit(image) for image in images]
        parallel = [f.result() for f in futures]
    finally:
        encoder.close()
    assert [e.data for e in parallel] == [encode_image(i, "webp").data for i in images]
    assert all(e.thumbnail for e in parallel)
    with pytest.raises(ValueError, match="choose one of png, webp, jpeg"):
        ImageEncoder("gif")


# -- sweeps ------------------------------------------------------------------------------------
def test_each_format_is_stored_recorded_and_leaves_no_temporary_file(runs):
    for name, spec in IMAGE_FORMATS.items():
        out = runs / name
        rows = cells(out)
        for row in rows.values():
            assert row["image"] == f"images/{row['key']}{spec.suffix}"
            assert (out / row["image"]).is_file()
            assert (out / "thumbnails" / f"{row['key']}.png").is_file()
        assert not [p for p in (out / "images").iterdir() if ".tmp" in p.name]
        assert {p.suffix for p in (out / "images").iterdir()} == {spec.suffix}
        with RunStore(out, lock=False) as store:
            assert store.meta("image_formats")[name]["lossless"] is spec.lossless
            assert store.latest_run()["spec"]["image_format"] == name


def test_scores_are_computed_on_the_image_in_memory_not_the_file(runs):
    png = cells(runs / "png")
    for name in ("webp", "jpeg"):
        other = cells(runs / name)
        assert other.keys() == png.keys()
        for cell, row in png.items():
            assert other[cell]["key"] == row["key"]  # the format is not part of the key
            assert other[cell]["scores"] == row["scores"]


def test_overlapped_finishing_encodes_on_its_threads_and_stores_the_same(runs, tmp_path):
    summary = run_sweep(small_spec(tmp_path / "o", image_format="webp", overlap=True).validate())
    assert summary.done == 4
    overlapped, inline = cells(tmp_path / "o"), cells(runs / "webp")
    for cell, row in inline.items():
        assert overlapped[cell]["scores"] == row["scores"]
        assert (tmp_path / "o" / overlapped[cell]["image"]).read_bytes() == \
            (runs / "webp" / row["image"]).read_bytes()


def test_stored_files_decode_to_the_images_the_metrics_saw(runs):
    png = cells(runs / "png")
    for cell, row in png.items():
        reference = np.asarray(Image.open(runs / "png" / row["image"]), dtype=np.int16)
        webp = cells(runs / "webp")[cell]
        assert np.array_equal(
            np.asarray(Image.open(runs / "webp" / webp["image"]).convert("RGB"), np.int16),
            reference)
        jpeg = cells(runs / "jpeg")[cell]
        lossy = np.asarray(Image.open(runs / "jpeg" / jpeg["image"]).convert("RGB"))
        assert lossy.shape == reference.shape and psnr(lossy, reference) > 25.0


def test_compare_reads_either_format_and_sees_lossless_files_as_identical(runs):
    result = compare_runs(runs / "png", runs / "webp", lpips=False)
    groups = result["groups"]
    assert groups and all(g["identical"] == g["pairs"] for g in groups)


@pytest.mark.parametrize("name", ["webp", "jpeg"])
def test_report_grids_show_every_format(runs, name):
    out = runs / name
    report = build_report(out)
    page = report.read_text()
    assert page.count('class="tile"') >= 4
    with RunStore(out, lock=False) as store:
        rows = store.rows()
        tiles = [t for g in image_grids(store, rows) for _, row in g.rows for t in row]
    assert len([t for t in tiles if t is not None]) == 4


def test_grid_tiles_come_from_the_stored_thumbnail_else_from_the_file(runs, tmp_path):
    import shutil

    copy = tmp_path / "webp"
    shutil.copytree(runs / "webp", copy)
    row = next(iter(cells(copy).values()))
    stored, enlarged = grid_tile(copy, row)
    assert enlarged  # toy images are 16 pixels: shown enlarged
    assert stored == (copy / "thumbnails" / f"{row['key']}.png").read_bytes()
    shutil.rmtree(copy / "thumbnails")  # a store from before thumbnails: made from the file
    assert grid_tile(copy, row) == (stored, True)  # lossless: the same thumbnail
    (copy / row["image"]).unlink()
    assert grid_tile(copy, row) is None


# -- spec and flag -----------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["jpg", "PNG", "gif", 3])
def test_unknown_image_format_is_refused_by_name(tmp_path, value):
    with pytest.raises(InvalidArgumentError, match="image_format.*choose one of png, webp, jpeg"):
        small_spec(tmp_path / "o", image_format=value).validate()


def test_toml_and_flag_set_the_format(tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text('backbones = ["toy-fast"]\nimage_format = "webp"\n')
    assert SweepSpec.merged(SweepSpec.from_toml(config), {}).image_format == "webp"
    assert SweepSpec().image_format == "png"
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["sweep", "--backbone", "toy-fast", "--preset", "tiny",
                                       "--steps", "1", "--timing-repeats", "0",
                                       "--image-format", "jpeg", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.suffix for p in (out / "images").iterdir()} == {".jpg"}
    bad = CliRunner().invoke(main, ["sweep", "--backbone", "toy-fast", "--preset", "tiny",
                                    "--image-format", "gif", "--dry-run"])
    assert bad.exit_code == 2 and "--image-format" in bad.output
