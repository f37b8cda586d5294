"""The detection data layer: VOC/COCO importers, box checks and scaling, box site folders, synthetic and BCCD sites."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medfed.config import Config
from medfed.data import (
    AnnotatedImage,
    Box,
    DataError,
    SiteArrays,
    import_coco,
    import_voc,
    load_box_site,
    read_site,
    read_voc,
    synthetic_detection_site,
    write_site,
)
from medfed.data.manifest import SiteReading
from medfed.data.sites import load_simulated_site

VOC_OBJECT = "<object><name>{}</name><difficult>0</difficult><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>"


def _png(path: Path, width: int, height: int, value: int = 120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width), value, dtype=np.uint8)).save(path)
    return path


def _voc(root: Path, objects: dict[str, list[tuple]], width: int = 40, height: int = 30) -> Path:
    """A VOC folder: one ``width`` x ``height`` PNG and one xml per entry of ``objects`` (name -> boxes)."""
    for stem, boxes in objects.items():
        _png(root / "JPEGImages" / f"{stem}.png", width, height)
        body = "".join(VOC_OBJECT.format(*box) for box in boxes)
        size = f"<size><width>{width}</width><height>{height}</height><depth>1</depth></size>"
        xml = f"<annotation><filename>{stem}.png</filename>{size}{body}</annotation>"
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{stem}.xml").write_text(xml)
    return root


def _config(**data: object) -> Config:
    return Config.from_dict({"run": {"task": "detection"}, "data": {"image-size": 64, **data}})


def test_voc_import_drops_broken_boxes_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    objects = {
        "a": [("cell", 2, 3, 12, 13), ("cell", 5, 5, 5, 9), ("blob", 30, 20, 41, 25)],  # degenerate, outside
        "b": [("blob", 0, 0, 40, 30)],
        "c": [],
    }
    voc = _voc(tmp_path / "voc", objects)
    with caplog.at_level(logging.WARNING, logger="medfed.data"):
        site_dir = import_voc(voc / "Annotations", voc / "JPEGImages", tmp_path / "site", seed=1)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("a.xml" in w for w in warnings)
    assert "cell (5, 5, 5, 9)" in warnings[0] and "empty" in warnings[0]
    assert "blob (30, 20, 41, 25)" in warnings[1] and "outside the 40x30 image" in warnings[1]
    assert (site_dir / "boxes.csv").read_text().splitlines() == [
        "image,label,xmin,ymin,xmax,ymax",
        "images/a.png,cell,2,3,12,13",
        "images/b.png,blob,0,0,40,30",
    ]
    manifest = (site_dir / "manifest.csv").read_text().splitlines()
    assert manifest[0] == "image,split,patient_id" and len(manifest) == 4
    assert {line.split(",")[1] for line in manifest[1:]} == {"train", "val", "test"}
    assert sorted(p.name for p in (site_dir / "images").iterdir()) == ["a.png", "b.png", "c.png"]

    site = read_site(site_dir, SiteReading(20, 2, "boxes", class_names=("cell", "blob")))
    order = np.argsort([line.split(",")[0] for line in manifest[1:]])
    scale = np.array([20 / 40, 20 / 30, 20 / 40, 20 / 30])
    np.testing.assert_allclose(site.targets[order[0], 0], [*(np.array([2, 3, 12, 13]) * scale), 0], atol=1e-4)
    np.testing.assert_allclose(site.targets[order[1], 0], [0, 0, 20, 20, 1], atol=1e-4)
    assert (site.targets[order[2], :, 4] == -1).all()  # the image without boxes is a negative
    assert list(site.class_labels()[order]) == [1, 2, 0]

    with pytest.raises(FileExistsError, match="not empty"):
        import_voc(voc / "Annotations", voc / "JPEGImages", site_dir)


def test_unknown_class_and_broken_voc_files_are_errors_naming_the_file(tmp_path: Path) -> None:
    voc = _voc(tmp_path, {"ok": [("cell", 1, 1, 9, 9)], "odd": [("tumour", 1, 1, 9, 9), ("cell", 2, 2, 8, 8)]})
    records = read_voc(voc / "Annotations", voc / "JPEGImages")
    with pytest.raises(DataError) as err:
        load_box_site(records, ["train", "train"], 16, ("cell",), 1)
    assert len(err.value.problems) == 1
    assert "odd.xml" in str(err.value) and "'tumour' is neither one of the class names ['cell']" in str(err.value)
    with pytest.raises(DataError, match=r"'7' is not a class index in \[0, 1\]"):
        load_box_site([AnnotatedImage(voc / "JPEGImages" / "ok.png", [Box("7", 1, 1, 9, 9)])], ["train"], 16, (), 2)

    (voc / "Annotations" / "broken.xml").write_text("<annotation><filename>")
    (voc / "Annotations" / "lost.xml").write_text("<annotation><filename>lost.png</filename></annotation>")
    with pytest.raises(DataError) as err:
        read_voc(voc / "Annotations", voc / "JPEGImages")
    assert len(err.value.problems) == 2
    assert "broken.xml: not a readable Pascal VOC xml" in str(err.value)
    assert "lost.xml: its image lost.png is not in" in str(err.value)


def test_coco_import_keeps_images_without_annotations_as_negatives(tmp_path: Path) -> None:
    images = tmp_path / "coco" / "images"
    for name in ("x.png", "y.png", "z.png"):
        _png(images / name, 32, 24)
    coco = {
        "images": [
            {"id": 1, "file_name": "x.png", "width": 32, "height": 24},
            {"id": 2, "file_name": "y.png", "width": 32, "height": 24},
            {"id": 3, "file_name": "z.png", "width": 32, "height": 24},
        ],
        "categories": [{"id": 7, "name": "nodule"}, {"id": 9, "name": "mass"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 9, "bbox": [4, 2, 10, 6]},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [20.5, 10, 5, 4]},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [0, 0, 32, 24]},
        ],
    }
    (tmp_path / "coco" / "instances.json").write_text(json.dumps(coco))
    site_dir = import_coco(tmp_path / "coco" / "instances.json", images, tmp_path / "site")
    assert (site_dir / "boxes.csv").read_text().splitlines()[1:] == [
        "images/x.png,mass,4,2,14,8",
        "images/x.png,nodule,20.5,10,25.5,14",
        "images/y.png,nodule,0,0,32,24",
    ]
    site = read_site(site_dir, SiteReading(16, 2, "boxes", class_names=("nodule", "mass")))
    images_in_order = [line.split(",")[0] for line in (site_dir / "manifest.csv").read_text().splitlines()[1:]]
    x, y, z = (images_in_order.index(f"images/{n}") for n in ("x.png", "y.png", "z.png"))
    assert site.targets.shape == (3, 2, 5) and site.targets.dtype == np.float32
    np.testing.assert_allclose(
        site.targets[x], [[2, 4 / 3, 7, 16 / 3, 1], [10.25, 20 / 3, 12.75, 28 / 3, 0]], atol=1e-4
    )
    np.testing.assert_allclose(site.targets[y, 0], [0, 0, 16, 16, 0], atol=1e-4)
    assert (site.targets[z, :, 4] == -1).all()

    coco["annotations"].append({"id": 4, "image_id": 5, "category_id": 7, "bbox": [0, 0, 1, 1]})
    (tmp_path / "coco" / "instances.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match="image_id 5 is not among the images"):
        import_coco(tmp_path / "coco" / "instances.json", images, tmp_path / "other")


def test_boxes_scale_with_a_non_square_image(tmp_path: Path) -> None:
    record = AnnotatedImage(_png(tmp_path / "wide.png", 40, 20), [Box(0, 10, 5, 30, 15)])
    site = load_box_site([record], ["train"], 20, (), 1)
    assert site.images.shape == (1, 1, 20, 20) and site.target_key == "boxes"
    np.testing.assert_allclose(site.targets[0, 0], [5, 5, 15, 15, 0])

    stated_wrongly = AnnotatedImage(record.image, record.boxes, size=(20, 40), source="wide.xml")
    with pytest.raises(DataError, match="the annotation is for a 20x40 image; the file is 40x20"):
        load_box_site([stated_wrongly], ["train"], 20, (), 1)


def test_box_site_folder_round_trip_and_problems(tmp_path: Path) -> None:
    original = synthetic_detection_site(1, 30, image_size=32, num_classes=3, seed=2)
    site_dir = write_site(tmp_path / "site", original)
    site = read_site(site_dir, SiteReading(32, 3, "boxes"))
    np.testing.assert_allclose(site.targets, original.targets, atol=1e-4)
    np.testing.assert_allclose(site.images, original.images, atol=1 / 255 + 1e-6)
    np.testing.assert_array_equal(site.splits, original.splits)
    np.testing.assert_allclose(site.spacing, original.spacing, rtol=1e-5)

    boxes_csv = site_dir / "boxes.csv"
    boxes_csv.write_text(boxes_csv.read_text() + "images/999999.png,0,1,1,5,5\nimages/000000.png,0,one,1,5,5\n")
    with pytest.raises(DataError) as err:
        read_site(site_dir, SiteReading(32, 3, "boxes"))
    text = str(err.value)
    assert "images/999999.png' is not in manifest.csv" in text and "must be numbers" in text
    boxes_csv.unlink()
    with pytest.raises(DataError, match="boxes.csv: missing"):
        read_site(site_dir, SiteReading(32, 3, "boxes"))


def test_synthetic_detection_sites_are_deterministic_and_differ() -> None:
    a, b = synthetic_detection_site(0, 60, seed=3), synthetic_detection_site(0, 60, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.targets, b.targets)
    other = synthetic_detection_site(1, 60, seed=3)
    assert not np.array_equal(a.images, other.images)
    assert a.images.shape == (60, 1, 64, 64) and a.images.min() >= 0 and a.images.max() <= 1
    valid = a.targets[:, :, 4] >= 0
    assert set(np.unique(a.targets[:, :, 4][valid])) <= {0, 1}
    assert 0.05 < (valid.sum(axis=1) == 0).mean() < 0.4  # about 20 % negatives
    boxes = a.targets[valid][:, :4]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    assert 6 <= (boxes[:, 2:] - boxes[:, :2]).max(axis=1).mean() <= 18  # 12-26 % of the image across
    counts = [(synthetic_detection_site(i, 80, seed=3).targets[:, :, 4] >= 0).sum() for i in range(3)]
    assert len(set(counts)) == 3


def test_box_targets_in_site_arrays_and_datasets() -> None:
    site = synthetic_detection_site(2, 20, image_size=32, num_classes=3)
    sample = site.split("train")[0]
    assert sample["boxes"].dtype == torch.float32 and sample["boxes"].shape == site.targets.shape[1:]
    expected = [int(t[t[:, 4] >= 0, 4].max()) + 1 if (t[:, 4] >= 0).any() else 0 for t in site.targets]
    assert list(site.class_labels()) == expected
    with pytest.raises(ValueError, match=r"box targets must be \(N, M >= 1, 5\)"):
        SiteArrays(site.images, site.targets[:, :, :4], site.splits, target_key="boxes")


def test_simulated_detection_sites_and_sources_that_refuse_boxes(tmp_path: Path) -> None:
    name, site = load_simulated_site(_config(**{"num-classes": 3, "samples-per-site": 20}), 1)
    assert name == "site-2" and site.target_key == "boxes" and site.images.shape == (20, 1, 64, 64)
    np.testing.assert_array_equal(site.targets, synthetic_detection_site(1, 20, 64, 3).targets)

    write_site(tmp_path / "sites" / "north", synthetic_detection_site(0, 12, 64, 2))
    _, north = load_simulated_site(
        _config(source="sites", path=str(tmp_path / "sites"), **{"class-names": ["a", "b"]}), 0
    )
    assert north.targets.shape[2] == 5

    voc = _voc(tmp_path / "voc", {f"img{i}": [("RBC", 1, 1, 9, 9), ("WBC", 2, 2, 30, 20)] for i in range(6)})
    with pytest.raises(ValueError, match=r"names its classes \['RBC', 'WBC'\]: set data.class-names"):
        load_simulated_site(_config(source="voc", path=str(voc)), 0)
    for source in ("pairs", "medmnist"):
        with pytest.raises(ValueError, match="only, not 'detection'|cannot feed run.task = 'detection'"):
            load_simulated_site(_config(source=source, path=str(tmp_path)), 0)
    segmentation = _config(source="voc", path=str(voc)).with_overrides({"run.task": "segmentation"})
    with pytest.raises(ValueError, match="it feeds run.task = 'detection' only"):
        load_simulated_site(segmentation, 0)


@pytest.mark.realdata
def test_bccd_loads_as_three_detection_sites(shared_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    bccd = shared_data / "bccd" / "BCCD"
    if not bccd.is_dir():
        pytest.skip(f"BCCD not found at {bccd}")
    config = _config(
        source="voc", path=str(bccd), sites=3, **{"num-classes": 3, "class-names": ["RBC", "WBC", "Platelets"]}
    )
    counts = np.zeros(3, dtype=int)
    with caplog.at_level(logging.WARNING, logger="medfed.data"):
        for index in range(3):
            _, site = load_simulated_site(config, index)
            valid = site.targets[:, :, 4] >= 0
            counts += np.bincount(site.targets[:, :, 4][valid].astype(int), minlength=3)
            assert site.images.shape[1:] == (1, 64, 64) and {"train", "val", "test"} == set(site.splits)
            assert 115 <= len(site.images) <= 125  # 364 images in 3 contiguous blocks
            corners = site.targets[valid][:, :4]
            assert (corners >= 0).all() and (corners <= 64).all()
    dropped = [r.getMessage() for r in caplog.records]  # training's log: counts, no file (a coordinator sees it)
    assert dropped == ["2 box(es) dropped at this site: 2 empty"]
    assert counts.sum() == 4888 - 2 and counts[0] > 10 * counts[1] and counts[0] > 10 * counts[2]
