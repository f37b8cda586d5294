"""Image channels (``data.channels``): colour photos kept as RGB, several scans of a case stacked,
files refused (named) when their channels do not fit; binary masks stored as 0/255 read as 0/1."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medfed.cli import app
from medfed.data import DataError, SiteArrays, load_simulated_site, read_site, write_site
from medfed.data.card import data_card
from medfed.data.decode import DEFAULT_PREPROCESS, load_image
from medfed.data.manifest import SiteReading
from medfed.data.medmnist import read_medmnist
from medfed.data.preflight import run_preflight
from medfed.site import _checked_site
from tests.conftest import tiny_config

SPLITS = ("train", "train", "train", "val", "test", "test")


def _manifest(site: Path, rows: list[list[str]], header: tuple[str, ...] = ("image", "label", "split")) -> None:
    with (site / "manifest.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([list(header), *rows])


def _photo_site(site: Path, colours: list[tuple[int, int, int]]) -> Path:
    """A classification site of one flat RGB photo per colour (varied a little so that none repeats)."""
    site.mkdir()
    for i, colour in enumerate(colours):
        pixels = np.broadcast_to(np.array(colour, np.uint8), (12, 12, 3)).copy()
        pixels[0, 0] = i  # keep images distinct
        Image.fromarray(pixels).save(site / f"{i}.png")
    _manifest(site, [[f"{i}.png", str(i % 2), SPLITS[i % 6]] for i in range(len(colours))])
    return site


def _ramp(shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Values rising along ``axis`` only: which channel landed where stays visible after scaling."""
    index = [None] * len(shape)
    index[axis] = slice(None)
    return np.broadcast_to(np.arange(shape[axis], dtype=np.float32)[tuple(index)], shape).copy()


def _rise(image: np.ndarray, axis: int) -> float:
    """How much ``image`` rises along ``axis`` (its other axes averaged)."""
    profile = image.mean(axis=tuple(a for a in range(image.ndim) if a != axis))
    return float(profile[-1] - profile[0])


def test_rgb_photos_keep_their_colours_and_the_card_says_rgb(tmp_path: Path) -> None:
    site_dir = _photo_site(tmp_path / "site", [(255, 0, 0), (0, 255, 0), (0, 0, 255)] * 2)
    site = read_site(site_dir, SiteReading(8, 2, channels=3))
    assert site.images.shape == (6, 3, 8, 8)
    red = site.images[0].mean(axis=(1, 2))
    assert red[0] > 0.95 and red[1] < 0.05 and red[2] < 0.05
    assert site.images[1, 1].mean() > 0.95 and site.images[2, 2].mean() > 0.95
    checked = run_preflight(site_dir, SiteReading(8, 2, channels=3))
    assert checked.ok and "channels: 3 (RGB)" in data_card(site_dir, checked.site).lines()


def test_channels_1_turns_colour_photos_grey_as_before(tmp_path: Path) -> None:
    photo = tmp_path / "colour.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(photo)
    image, _, _ = load_image(photo, 16)
    with Image.open(photo) as img:
        grey = np.asarray(img.convert("L"), dtype=np.float32) / 255
    assert image.shape == (1, 16, 16) and np.allclose(image[0], grey)
    site_dir = _photo_site(tmp_path / "site", [(200, 10, 10)] * 6)
    checked = run_preflight(site_dir, SiteReading(8, 2))
    assert checked.site is not None and checked.site.images.shape[1] == 1
    assert "channels: 1 (colour photos turned grey)" in data_card(site_dir, checked.site).lines()


def test_a_grey_image_in_a_colour_site_is_refused_with_its_name(tmp_path: Path) -> None:
    site_dir = _photo_site(tmp_path / "site", [(255, 0, 0)] * 5)
    Image.fromarray(np.full((12, 12), 90, np.uint8)).save(site_dir / "grey.png")
    _manifest(site_dir, [*[[f"{i}.png", "0", SPLITS[i]] for i in range(5)], ["grey.png", "1", "test"]])
    with pytest.raises(DataError) as err:
        read_site(site_dir, SiteReading(8, 2, channels=3))
    assert "grey.png has 1 channel (grey): data.channels = 3 expects 3" in str(err.value)
    checked = run_preflight(site_dir, SiteReading(8, 2, channels=3))
    assert not checked.ok and checked.summary() == "1 wrong number of image channels"
    with pytest.raises(DataError, match=r"0.png has 3 channels \(RGB\): data.channels = 4 expects 4"):
        read_site(site_dir, SiteReading(8, 2, channels=4))


def test_one_file_per_channel_stacks_in_manifest_order(tmp_path: Path) -> None:
    shape = (8, 8, 6)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    for axis, name in enumerate(("t1", "t2", "flair")):
        nib.save(nib.Nifti1Image(_ramp(shape, axis), affine), tmp_path / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([_ramp(shape, a) for a in range(3)], axis=-1), affine), tmp_path / "4d.nii.gz")
    _manifest(tmp_path, [["t1.nii.gz;t2.nii.gz; flair.nii.gz", "0", "train"], ["4d.nii.gz", "1", "test"]])
    site = read_site(tmp_path, SiteReading(8, 2, spatial_dims=3, channels=3))
    assert site.images.shape == (2, 3, 8, 8, 8)
    for k in range(3):
        assert _rise(site.images[0, k], k) > 0.8
        assert abs(_rise(site.images[0, k], (k + 1) % 3)) < 0.05
    assert np.allclose(site.images[0], site.images[1])  # channel-last 4D NIfTI: the same channels
    assert np.allclose(site.spacing, [1.0, 1.0, 1.5])


def test_npy_channels_as_files_or_as_an_axis(tmp_path: Path) -> None:
    rows, cols = _ramp((10, 10), 0), _ramp((10, 10), 1)
    np.save(tmp_path / "rows.npy", rows)
    np.save(tmp_path / "cols.npy", cols)
    np.save(tmp_path / "first.npy", np.stack([rows, cols]))
    np.save(tmp_path / "last.npy", np.stack([rows, cols], axis=-1))
    cells = ["rows.npy;cols.npy", "first.npy", "last.npy"]
    _manifest(tmp_path, [[cell, "0", "train"] for cell in cells])
    site = read_site(tmp_path, SiteReading(10, 2, channels=2))
    assert site.images.shape == (3, 2, 10, 10)
    assert _rise(site.images[0, 0], 0) > 0.8 and _rise(site.images[0, 1], 1) > 0.8
    assert np.allclose(site.images[0], site.images[1]) and np.allclose(site.images[0], site.images[2])


def test_channel_files_that_do_not_fit_are_refused_with_their_names(tmp_path: Path) -> None:
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(_ramp((8, 8, 6), 0), affine), tmp_path / "t1.nii.gz")
    nib.save(nib.Nifti1Image(_ramp((8, 8, 5), 0), affine), tmp_path / "t2_cut.nii.gz")
    nib.save(nib.Nifti1Image(_ramp((8, 8, 6), 0), np.diag([1.0, 1.0, 3.0, 1.0])), tmp_path / "t2_thick.nii.gz")
    _manifest(
        tmp_path,
        [
            ["t1.nii.gz;t2_cut.nii.gz", "0", "train"],
            ["t1.nii.gz;t2_thick.nii.gz", "0", "train"],
            ["t1.nii.gz", "0", "val"],
        ],
    )
    with pytest.raises(DataError) as err:
        read_site(tmp_path, SiteReading(8, 2, spatial_dims=3, channels=2))
    problems = [str(p) for p in err.value.problems]
    assert len(problems) == 3
    assert "t2_cut.nii.gz is 8x8x5 pixels of 1 x 1 x 1 mm but" in problems[0] and "share one grid" in problems[0]
    assert "t2_thick.nii.gz is 8x8x6 pixels of 1 x 1 x 3 mm" in problems[1]
    assert "t1.nii.gz holds an array of shape (8, 8, 6): data.channels = 2 expects 2 volumes" in problems[2]
    _manifest(tmp_path, [["t1.nii.gz;t1.nii.gz;t1.nii.gz", "0", "train"]])
    with pytest.raises(DataError, match="3 files .* for data.channels = 2"):
        read_site(tmp_path, SiteReading(8, 2, spatial_dims=3, channels=2))


def _pairs(src: Path, n: int = 6, value: int = 255, colour: bool = True) -> Path:
    """An images/ + masks/ folder pair: RGB (or grey) photos and binary masks stored as 0/``value``."""
    rng = np.random.default_rng(1)
    for sub in ("images", "masks"):
        (src / sub).mkdir(parents=True)
    for i in range(n):
        shape = (16, 16, 3) if colour else (16, 16)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(src / "images" / f"case{i}.png")
        mask = np.zeros((16, 16), np.uint8)
        mask[4:10, 3 + i % 4 : 9] = value
        Image.fromarray(mask).save(src / "masks" / f"case{i}.png")
    return src


def test_masks_stored_as_0_255_are_read_as_0_1_with_one_warning(tmp_path: Path) -> None:
    src = _pairs(tmp_path / "src")
    rows = [[f"images/case{i}.png", f"masks/case{i}.png", SPLITS[i]] for i in range(6)]
    _manifest(src, rows, ("image", "mask", "split"))
    rgb_mask = np.asarray(Image.open(src / "masks" / "case0.png"))
    Image.fromarray(np.stack([rgb_mask] * 3, axis=-1)).save(src / "masks" / "case0.png")  # grey saved as RGB
    checked = run_preflight(src, SiteReading(16, 2, "mask", channels=3))
    assert checked.site is not None and set(np.unique(checked.site.targets)) == {0, 1}
    notes = [w for w in checked.warnings if "read as 0/1" in w.reason]
    assert len(notes) == 1 and "6 of 6 masks" in notes[0].reason
    many = run_preflight(src, SiteReading(16, 256, "mask", channels=3))  # 255 is a class index here: nothing to rescale
    assert many.site is not None and many.site.targets.max() == 255
    Image.fromarray(np.where(rgb_mask > 0, 254, 0).astype(np.uint8)).save(src / "masks" / "case1.png")
    bad = run_preflight(src, SiteReading(16, 2, "mask", channels=3))
    assert not bad.ok and "mask values must be class indices in [0, 1]" in str(bad.errors[0])


def test_import_checks_the_folder_it_wrote(tmp_path: Path) -> None:
    src = _pairs(tmp_path / "src")
    runner = CliRunner()
    out = tmp_path / "site"
    imported = runner.invoke(
        app, ["data", "import", str(src), "--from", "image-mask", "--out", str(out), "--channels", "3"]
    )
    assert imported.exit_code == 0, imported.output
    assert "read as 0/1" in " ".join(imported.output.split())
    for channels in ("3", "1"):
        check = runner.invoke(app, ["data", "check", str(out), "--task", "segmentation", "--channels", channels])
        assert check.exit_code == 0, check.output
    grey = _pairs(tmp_path / "grey", colour=False)
    refused = runner.invoke(
        app, ["data", "import", str(grey), "--from", "image-mask", "--out", str(tmp_path / "g"), "--channels", "3"]
    )
    assert refused.exit_code == 1 and (tmp_path / "g" / "manifest.csv").is_file()
    assert "fails the pre-flight check" in " ".join(refused.output.split())


def test_written_sites_read_back_with_their_channels(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for channels in (3, 4):
        images = rng.random((6, channels, 12, 12)).astype(np.float32)
        site = SiteArrays(images, np.arange(6) % 2, np.array(SPLITS))
        back = read_site(write_site(tmp_path / f"c{channels}", site), SiteReading(12, 2, channels=channels))
        assert np.allclose(back.images, images, atol=0.5 / 255 + 1e-6)
    volumes = SiteArrays(rng.random((2, 2, 8, 8, 8)).astype(np.float32), np.array([0, 1]), np.array(["train", "test"]))
    assert read_site(
        write_site(tmp_path / "v", volumes), SiteReading(8, 2, spatial_dims=3, channels=2)
    ).images.shape == (
        2,
        2,
        8,
        8,
        8,
    )


def test_simulated_sources_give_the_channels_asked_for(tmp_path: Path) -> None:
    _, grey = load_simulated_site(tiny_config(), 0)
    _, three = load_simulated_site(tiny_config(**{"data.channels": 3}), 0)
    assert three.images.shape[1] == 3 and np.array_equal(three.images[:, :1], grey.images)
    assert not np.allclose(three.images[:, 1], three.images[:, 2])
    npz = tmp_path / "tiny.npz"
    arrays = {f"{s}_images": np.zeros((2, 8, 8), np.uint8) for s in ("train", "val", "test")}
    np.savez(npz, **arrays, **{f"{s}_labels": np.zeros((2, 1)) for s in ("train", "val", "test")})
    with pytest.raises(ValueError, match=r"grey, 1 channel images: data.channels = 3 expects 3; set data.channels = 1"):
        read_medmnist(npz, 3)
    colour = {k: np.repeat(v[..., None], 3, axis=-1) if k.endswith("images") else v for k, v in np.load(npz).items()}
    np.savez(npz, **colour)
    assert read_medmnist(npz, 3).images.shape == (6, 3, 8, 8) and read_medmnist(npz).images.shape == (6, 1, 8, 8)


def test_a_deployed_site_checks_again_when_the_channels_change(tmp_path: Path) -> None:
    site_dir = _photo_site(tmp_path / "site", [(255, 0, 0), (0, 0, 255)] * 3)
    state = tmp_path / "state"
    for channels in (1, 3, 1):
        checked = _checked_site(site_dir, state, SiteReading(8, 2, "label", 2, (), DEFAULT_PREPROCESS, channels))
        assert checked.site is not None and checked.site.images.shape[1] == channels
