"""Natural sites from different sources: one dataset per site ([data.site.NAME] tables), a common
scale by field-of-view diameter, and loss and metrics inside the field of view only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medfed.config import Config, ConfigError, load_config
from medfed.data import read_site, write_site
from medfed.data.decode import Preprocess, load_field_of_view_case
from medfed.data.field_of_view import (
    IGNORE,
    computed_field_of_view,
    crop_square,
    field_of_view_square,
    read_photo,
)
from medfed.data.manifest import SiteReading
from medfed.data.sites import load_simulated_site, simulated_site_names
from medfed.tasks import segmentation

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
RETINA = REPO / "configs" / "segmentation-retina-3sites.toml"


def _fundus(path: Path, width: int, height: int, diameter: int, vessel: tuple[int, int] | None = None) -> None:
    """A photo of a bright disc (the field of view) on black, with a dark horizontal band (a vessel)
    through its centre ``vessel = (half-width in px at this resolution, brightness)``."""
    rows, cols = np.mgrid[:height, :width]
    inside = (rows - height / 2 + 0.5) ** 2 + (cols - width / 2 + 0.5) ** 2 <= (diameter / 2) ** 2
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[inside] = (200, 90, 40)
    if vessel:
        band = inside & (np.abs(rows - height / 2 + 0.5) <= vessel[0])
        pixels[band] = (vessel[1], 40, 20)
    Image.fromarray(pixels).save(path)


def _vessel_mask(path: Path, width: int, height: int, diameter: int, half_width: int) -> None:
    rows, cols = np.mgrid[:height, :width]
    inside = (rows - height / 2 + 0.5) ** 2 + (cols - width / 2 + 0.5) ** 2 <= (diameter / 2) ** 2
    band = inside & (np.abs(rows - height / 2 + 0.5) <= half_width)
    Image.fromarray((band * 255).astype(np.uint8)).save(path)


def test_two_photos_of_one_disc_at_two_resolutions_come_out_the_same(tmp_path: Path) -> None:
    # the same eye through two cameras: a 3x larger field of view, in a frame of another shape
    small, large = (tmp_path / "small.png", 120, 100, 90, 4), (tmp_path / "large.png", 420, 300, 270, 12)
    outcome = []
    for path, width, height, diameter, half in (small, large):
        _fundus(path, width, height, diameter, (half, 60))
        mask = path.with_name(f"{path.stem}_mask.png")
        _vessel_mask(mask, width, height, diameter, half)
        case = load_field_of_view_case(path, mask, None, 64, 2, Preprocess(field_of_view="crop"), channels=3)
        assert case.diameter == diameter
        outcome.append(case)
    a, b = outcome
    assert a.image.shape == b.image.shape == (3, 64, 64)
    inside = (a.mask[0] != IGNORE) & (b.mask[0] != IGNORE)
    assert inside.mean() == pytest.approx(np.pi / 4, abs=0.05)  # the disc fills the square: pi/4 of it
    assert ((a.mask[0] == IGNORE) == (b.mask[0] == IGNORE)).mean() > 0.98
    assert (a.mask[0][inside] == b.mask[0][inside]).mean() > 0.98  # the vessel is as wide at both
    assert np.abs(a.image - b.image)[:, inside].mean() < 0.03
    # without the crop the disc spans a different share of each frame
    whole = [
        load_field_of_view_case(p, p.with_name(f"{p.stem}_mask.png"), None, 64, 2, Preprocess(field_of_view="mask"), 3)
        for p, *_ in (small, large)
    ]
    assert abs((whole[0].mask != IGNORE).mean() - (whole[1].mask != IGNORE).mean()) > 0.05


def test_field_of_view_found_in_a_photo_and_its_square(tmp_path: Path) -> None:
    _fundus(tmp_path / "eye.png", 200, 150, 170)  # cut at the top and bottom, as STARE's frames are
    fov = computed_field_of_view(read_photo(tmp_path / "eye.png"))
    rows, cols = np.mgrid[:150, :200]
    truth = (rows - 74.5) ** 2 + (cols - 99.5) ** 2 <= 85**2
    assert (fov == truth).mean() > 0.99
    box = field_of_view_square(fov)
    assert box.side == 170 and box.left == 15 and box.top == -10  # full width kept, padded above and below
    square = crop_square(np.ones((150, 200)), box)
    assert square.shape == (170, 170) and square[:10].sum() == 0 and square[10:160].all()


def test_dark_photo_has_no_field_of_view(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "dark.png")
    with pytest.raises(ValueError, match="no field of view"):
        computed_field_of_view(read_photo(tmp_path / "dark.png"))


def test_metrics_count_pixels_inside_the_field_of_view_only() -> None:
    truth = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    truth[0, 0, 1, :] = 1  # a vessel of 4 pixels
    truth[0, 0, 3, :] = IGNORE  # the bottom row lies outside the field of view
    prediction = torch.zeros_like(truth)
    prediction[0, 0, 1, :2] = 1  # half the vessel found
    prediction[0, 0, 3, :] = 1  # and "vessels" outside the field of view
    scores = segmentation.metrics(Config()).__class__(2)
    scores.update(prediction, {"mask": truth})
    result = scores.compute()
    assert result["dice"] == pytest.approx(2 * 2 / (2 + 4))  # 2 TP, 0 FP inside, 2 FN: the outside row not counted
    assert result["dice_pooled"] == pytest.approx(2 / 3)


def test_training_patches_are_centred_inside_the_field_of_view() -> None:
    """Half the patches centre on vessels, half on background, none outside the field of view: a
    patch lying wholly outside it (label -1) would train on nothing."""
    mask = torch.zeros(1, 64, 64, dtype=torch.long)
    mask[:, :, :32] = -1  # the left half is outside the field of view
    mask[:, 30:34, 40:60] = 1
    patches = segmentation._RandomPatch(8, 2)
    patches.set_random_state(0)
    drawn = [patches({"image": torch.rand(3, 64, 64), "mask": mask})["mask"] for _ in range(200)]
    assert all(p.shape == (1, 8, 8) for p in drawn)
    assert not any((p == -1).all() for p in drawn)
    with_vessel = sum(bool((p == 1).any()) for p in drawn)
    assert 60 <= with_vessel <= 160  # ~1:1 vessel- and background-centred (a background centre may touch a vessel)


def test_loss_learns_nothing_outside_the_field_of_view() -> None:
    outputs = torch.randn(2, 2, 8, 8, requires_grad=True)
    mask = torch.randint(0, 2, (2, 1, 8, 8))
    mask[:, :, :3] = IGNORE
    value = segmentation.loss(outputs, {"mask": mask})
    value.backward()
    assert torch.isfinite(value)
    assert outputs.grad[:, :, :3].abs().max() == 0 and outputs.grad[:, :, 3:].abs().max() > 0
    # one image entirely outside: finite, and the other image alone decides its gradient
    mask[0] = IGNORE
    outputs.grad = None
    segmentation.loss(outputs, {"mask": mask}).backward()
    assert outputs.grad[0].abs().max() == 0


def _three_datasets(root: Path) -> None:
    """Three tiny 'hospitals' with different cameras: frame and field-of-view sizes, file layouts."""
    layouts = {
        "uk": ("masks_1st", (90, 80, 70), "_1stHO", None),
        "us": ("masks", (70, 60, 64), "", None),
        "de": ("masks", (240, 220, 210), "", "fov"),
    }
    for site, (masks, (width, height, diameter), suffix, fov) in layouts.items():
        for sub in ("images", masks, *([fov] if fov else [])):
            (root / site / sub).mkdir(parents=True)
        for i in range(5):
            half = max(1, diameter // 40)
            _fundus(root / site / "images" / f"{site}{i}.png", width, height, diameter, (half, 50 + 10 * i))
            _vessel_mask(root / site / masks / f"{site}{i}{suffix}.png", width, height, diameter, half)
            if fov:
                _vessel_mask(root / site / fov / f"{site}{i}.png", width, height, diameter, height)
    return None


def _natural_config(root: Path, **overrides: object) -> Config:
    raw = {
        "run": {"task": "segmentation", "rounds": 1, "name": "natural"},
        "data": {
            "source": "pairs",
            "path": str(root),
            "field-of-view": "crop",
            "image-size": 32,
            "num-classes": 2,
            "channels": 3,
            "site": {"uk": {"masks": "masks_1st"}, "us": {}, "de": {"fov-masks": "fov"}},
        },
        "model": {"width": 4, "depth": 2},
        "privacy": {"enabled": False},
        "evaluation": {"cross-site": False, "example-images": 0},
    }
    return Config.from_dict(raw).with_overrides(dict(overrides))


def test_each_dataset_is_one_site_at_one_scale(tmp_path: Path) -> None:
    _three_datasets(tmp_path)
    config = _natural_config(tmp_path)
    assert simulated_site_names(config) == ["de", "uk", "us"] and config.data.sites == 3  # in name order
    de, uk, us = (load_simulated_site(config, i)[1] for i in range(3))
    shares = [float((s.targets != IGNORE).mean()) for s in (de, uk, us)]
    assert max(shares) - min(shares) < 0.05  # the field of view fills the same share everywhere
    assert all(s.images.shape[1:] == (3, 32, 32) for s in (de, uk, us))
    assert "field-of-view masks" in de.card[0] and "found in each photo" in uk.card[0]
    assert {"train", "val", "test"} <= set(uk.splits)
    # the round trip through a site folder keeps the field of view (a fov column)
    write_site(tmp_path / "written", us)
    back = read_site(tmp_path / "written", SiteReading(32, 2, "mask", 2, (), Preprocess.from_config(config.data), 3))
    assert ((back.targets == IGNORE) == (us.targets == IGNORE)).mean() > 0.97


def test_site_tables_are_checked(tmp_path: Path) -> None:
    _three_datasets(tmp_path)
    with pytest.raises(ConfigError, match="data.site.uk.folder"):
        _natural_config(tmp_path, **{"data.site": {"uk": {"folder": "../elsewhere"}}})
    with pytest.raises(ConfigError, match="data.sites"):
        _natural_config(tmp_path, **{"data.sites": 2})
    with pytest.raises(ConfigError, match="data.site"):
        _natural_config(tmp_path, **{"data.source": "sites"})
    with pytest.raises(ConfigError, match="data.field-of-view"):
        Config.from_dict({"data": {"field-of-view": "crop"}})
    missing = _natural_config(tmp_path, **{"data.site": {"uk": {"masks": "masks_1st"}, "fr": {}}})
    with pytest.raises(FileNotFoundError, match="data.site.fr"):
        load_simulated_site(missing, 0)
    config = _natural_config(tmp_path)
    assert Config.from_json(config.to_json()) == config


def _simulate_retina_config(data: Path, out: Path, **overrides: str) -> dict:
    """``medfed simulate`` with the shipped three-hospital config at a tiny size; the report."""
    from typer.testing import CliRunner

    from medfed.cli import app

    settings = {
        "data.image-size": "32",
        "data.patch-size": "16",
        "model.width": "4",
        "model.depth": "2",
        "run.rounds": "1",
        "train.local-steps": "2",
        "evaluation.example-images": "0",
        "evaluation.cross-site": "false",
        **overrides,
    }
    args = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    # --data moves the config's own layout (three dataset folders), as data.path would
    result = CliRunner().invoke(app, ["simulate", str(RETINA), "--data", str(data), *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert all(np.isfinite(report["final"]["per_site"][s]["dice"]) for s in report["sites"])
    assert "field of view" in (out / "report.html").read_text()
    return report


@pytest.mark.slow
def test_three_dataset_federation_end_to_end(tmp_path: Path) -> None:
    """The shipped three-hospital config, pointed at three tiny made-up datasets."""
    _three_datasets(tmp_path / "data")
    sites = '{uk = {masks = "masks_1st"}, us = {}, de = {fov-masks = "fov"}}'
    report = _simulate_retina_config(tmp_path / "data", tmp_path / "run", **{"data.site": sites})
    assert report["sites"] == ["de", "uk", "us"]
    assert set(report["data_cards"]) == {"uk", "us", "de"}


@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED / "hrf").is_dir(), reason="../shared/data (CHASE_DB1, STARE, HRF) not beside the repo")
def test_three_real_hospitals_federate_at_one_scale(tmp_path: Path) -> None:
    """Tiny copies (6 photos each, downscaled 4x) of the three real datasets: one site each, the
    field of view across the model's width at each, and a federation over them from the shipped config."""
    layouts = {"chasedb1": ("images", "masks_1st", None), "stare": ("images", "masks", None),
               "hrf": ("images", "masks", "fov")}  # fmt: skip
    for name, (images, masks, fov) in layouts.items():
        for sub in filter(None, (images, masks, fov)):
            (tmp_path / name / sub).mkdir(parents=True)
        for file in sorted((SHARED / name / images).iterdir())[:6]:  # CHASE_DB1: 3 children
            copies = [(file, images), (next((SHARED / name / masks).glob(f"{file.stem}*")), masks)]
            copies += [(SHARED / name / fov / f"{file.stem}.png", fov)] if fov else []
            for source, sub in copies:
                with Image.open(source) as img:
                    small = img.resize(
                        (img.width // 4, img.height // 4), Image.BILINEAR if sub == images else Image.NEAREST
                    )
                    small.save(tmp_path / name / sub / f"{source.stem}.png")
    config = load_config(
        RETINA,
        {"data.path": str(tmp_path), "data.image-size": 64, "data.patch-size": 32},
    )
    sites = [load_simulated_site(config, i)[1] for i in range(3)]
    for site in sites:  # the field of view spans the model's width in every photo: one scale
        widths = (site.targets[:, 0] != IGNORE).any(axis=1).sum(axis=1)
        assert widths.min() >= 62, widths
    vessel = [float((s.targets == 1).sum() / (s.targets != IGNORE).sum()) for s in sites]
    assert all(0.03 < v < 0.2 for v in vessel), vessel
    report = _simulate_retina_config(tmp_path, tmp_path / "run")
    assert report["sites"] == ["chasedb1", "hrf", "stare"]
    assert "field-of-view masks" in report["data_cards"]["hrf"][0]


def test_a_simulation_loads_each_site_once_for_all_its_processes(tmp_path: Path, monkeypatch) -> None:
    """Within a simulation a site's arrays are written to the run's scratch folder and read back by
    the other processes, exactly as loaded (field of view, patients, card)."""
    import medfed.data.sites as sites_module

    _three_datasets(tmp_path / "data")
    config = _natural_config(tmp_path / "data")
    monkeypatch.setenv(sites_module.SIMULATION_CACHE, str(tmp_path / "scratch"))
    name, loaded = load_simulated_site(config, 1)
    assert len(list((tmp_path / "scratch").glob("*.npz"))) == 1
    sites_module._LOADED.clear()  # another process: nothing in memory
    monkeypatch.setattr(sites_module, "_load_simulated_site", lambda *_: pytest.fail("loaded again"))
    again_name, again = load_simulated_site(config, 1)
    assert again_name == name and again.card == loaded.card
    for field in ("images", "targets", "splits", "patient_ids", "spacing"):
        assert np.array_equal(getattr(again, field), getattr(loaded, field))
