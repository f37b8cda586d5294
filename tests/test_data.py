from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfed.data import DataError, read_site, write_site
from medfed.data.manifest import SiteReading
from medfed.data.medmnist import read_medmnist
from medfed.data.partition import dirichlet_partition, iid_partition, natural_partition
from medfed.data.sites import load_simulated_site, simulated_site_names
from medfed.data.synthetic import site_shift, synthetic_site
from tests.conftest import tiny_config


def test_synthetic_site_is_deterministic_and_sites_differ() -> None:
    a, b = synthetic_site(0, 50, seed=3), synthetic_site(0, 50, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.targets, b.targets)
    assert a.images.shape == (50, 1, 28, 28)
    assert a.images.min() >= 0.0 and a.images.max() <= 1.0
    assert set(a.splits) == {"train", "val", "test"}
    shifts = [site_shift(i, 2, 3) for i in range(3)]
    assert len({s.scale for s in shifts}) == 3 and len({s.prevalence for s in shifts}) == 3


def test_synthetic_lesion_class_is_brighter_at_its_peak() -> None:
    site = synthetic_site(1, 300, seed=0)
    peaks = site.images.reshape(len(site.targets), -1).max(axis=1)
    assert peaks[site.targets == 1].mean() > peaks[site.targets == 0].mean()


def test_site_folder_round_trip(site_dir: Path) -> None:
    site = read_site(site_dir, SiteReading(28, 2))
    original = synthetic_site(0, 60, seed=1)
    np.testing.assert_array_equal(site.targets, original.targets)
    np.testing.assert_allclose(site.images, original.images, atol=1 / 255)


def test_read_site_lists_every_problem(site_dir: Path) -> None:
    manifest = site_dir / "manifest.csv"
    lines = manifest.read_text().splitlines()
    lines[1] = lines[1].replace(",0,", ",7,").replace(",1,", ",7,")  # unknown label
    lines[2] = "images/missing.png,0,train,"
    lines[3] = lines[3].replace("train", "training").replace(",val,", ",training,").replace(",test,", ",training,")
    (site_dir / "images" / "000004.png").write_bytes(b"not a png")
    lines.append("../outside.png,0,train,")
    lines.append("images/000005.png,0,train,p1")
    lines.append("images/000006.png,0,test,p1")
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_site(site_dir, SiteReading(28, 2))
    text = str(err.value)
    assert "is not a class index in [0, 1]" in text
    assert "missing.png" in text and "file not found" in text
    assert "split 'training' is not one of" in text
    assert "000004.png" in text and "unreadable" in text
    assert "leaves the site folder" in text
    assert "a patient appears in several splits" in text
    assert len(err.value.problems) >= 6


def test_read_site_missing_manifest_and_columns(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs manifest.csv"):
        read_site(tmp_path, SiteReading(28, 2))
    (tmp_path / "manifest.csv").write_text("file,label\na.png,0\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['image', 'split'\]"):
        read_site(tmp_path, SiteReading(28, 2))


def test_other_image_formats_are_read_and_resized(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.random((40, 40)).astype(np.float32))
    Image.fromarray((rng.random((56, 56)) * 255).astype(np.uint8)).save(tmp_path / "b.jpg")
    (tmp_path / "manifest.csv").write_text("image,label,split\na.npy,0,train\nb.jpg,1,test\n")
    site = read_site(tmp_path, SiteReading(28, 2))
    assert site.images.shape == (2, 1, 28, 28)


def test_iid_partition_covers_everything_once() -> None:
    parts = iid_partition(np.zeros(103), 4, seed=0)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(103))
    assert {len(p) for p in parts} <= {25, 26}


def test_dirichlet_partition_skews_labels_and_is_seeded() -> None:
    labels = np.repeat([0, 1, 2], 200)
    parts = dirichlet_partition(labels, 3, alpha=0.1, seed=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(600))
    shares = [np.bincount(labels[p], minlength=3) / len(p) for p in parts]
    assert max(s.max() for s in shares) > 0.6  # small alpha: some site dominated by one class
    again = dirichlet_partition(labels, 3, alpha=0.1, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    with pytest.raises(ValueError, match="cannot split"):
        dirichlet_partition(labels[:2], 3, alpha=1.0, seed=0)


def test_natural_partition_by_site_column() -> None:
    parts = natural_partition(np.array(["b", "a", "b", "c"]))
    assert list(parts) == ["a", "b", "c"]
    assert parts["b"].tolist() == [0, 2]


def test_simulated_sites_from_folder_of_site_folders(tmp_path: Path) -> None:
    for name in ("zurich", "basel"):
        write_site(tmp_path / name, synthetic_site(0, 20))
    config = tiny_config(**{"data.source": "sites", "data.path": str(tmp_path), "data.partitioner": "natural"})
    assert simulated_site_names(config) == ["basel", "zurich"]
    name, site = load_simulated_site(config, 1)
    assert name == "zurich" and len(site.targets) == 20


@pytest.mark.realdata
def test_medmnist_partitioned_into_sites(shared_data: Path) -> None:
    path = shared_data / "medmnist" / "breastmnist.npz"
    pooled = read_medmnist(path)
    assert pooled.images.shape == (780, 1, 28, 28)
    config = tiny_config(
        **{"data.source": "medmnist", "data.path": str(path), "data.partitioner": "dirichlet", "data.sites": 3}
    )
    sizes = [len(load_simulated_site(config, i)[1].targets) for i in range(3)]
    assert sum(sizes) == 780


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_data_check_cli_lists_problems_and_counts(site_dir: Path) -> None:
    from typer.testing import CliRunner

    from medfed.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["data", "check", str(site_dir)])
    assert ok.exit_code == 0 and "60 samples, all readable" in ok.output
    (site_dir / "images" / "000003.png").unlink()
    bad = runner.invoke(app, ["data", "check", str(site_dir)])
    assert bad.exit_code == 1 and "images/000003.png: file not found" in bad.output


def test_dirichlet_partition_keeps_every_class_in_every_split_of_every_site() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random(900) < 0.3).astype(int)
    strata = rng.choice(np.array(["train", "val", "test"]), size=900, p=[0.7, 0.1, 0.2])
    parts = dirichlet_partition(labels, 3, alpha=0.5, seed=2, strata=strata, min_per_class=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(900))
    for part in parts:
        for split in ("train", "val", "test"):
            held = labels[part][strata[part] == split]
            assert np.sum(held == 0) >= 3 and np.sum(held == 1) >= 3
    with pytest.raises(ValueError, match="class/split groups"):
        dirichlet_partition(labels[:30], 3, alpha=0.5, seed=0, strata=strata[:30], min_per_class=10)
