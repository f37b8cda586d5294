"""Nothing identifying leaves a site: DICOM files carrying sentinel patient names, ids, dates,
institution, free text and file paths are trained on in a federation (real site logic, as deployed:
sites read their own folders), and no sentinel occurs in any serialized message between server and
sites, any server-side log record, or any file of the run's output."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from flwr.app import Message
from flwr.common.serde import message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from medfed.data.medical_io import write_dicom_series
from medfed.data.synthetic import synthetic_site
from medfed.federation import run_federation
from medfed.run_folder import RunFolder
from tests.conftest import tiny_config
from tests.test_federation import InProcessGrid

PATIENT_NAME = "ZZSENTINELNAME"
PATIENT_ID = "ZZSENTINEL0042"
BIRTH_DATE = "19010203"
INSTITUTION = "ZZSENTINELHOSPITAL"
FREE_TEXT = "ZZSENTINELNOTE"
PATH_MARK = "ZZSENTINELPATH"
SENTINELS = (PATIENT_NAME, PATIENT_ID, BIRTH_DATE, INSTITUTION, FREE_TEXT, PATH_MARK)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _dicom_site(folder: Path, index: int, samples: int = 40) -> Path:
    """A classification site folder of single-slice CT DICOM files full of sentinel PHI."""
    site = synthetic_site(index, samples, seed=5)
    (folder / "images").mkdir(parents=True)
    rows = ["image,label,split,patient_id"]
    for k, (image, label, split) in enumerate(zip(site.images, site.targets, site.splits, strict=True)):
        slice_path = write_dicom_series((image[:1] * 1000).astype(np.int16), folder / "tmp", (1.0, 0.8, 0.8))[0]
        ds = pydicom.dcmread(slice_path)
        ds.PatientName = f"{PATIENT_NAME}^JANE"
        ds.PatientID = PATIENT_ID
        ds.PatientBirthDate = BIRTH_DATE
        ds.InstitutionName = INSTITUTION
        ds.StudyDescription = f"{FREE_TEXT} follow-up"
        ds.ImageComments = f"{FREE_TEXT} seen by Dr {PATIENT_NAME}"
        name = f"images/{PATIENT_ID}_{PATH_MARK}_{k:03d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
        slice_path.unlink()
        rows.append(f"{name},{int(label)},{split},{PATIENT_ID}-{k}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder


class RecordingGrid(InProcessGrid):
    """The in-process transport, keeping every message both ways as Flower serializes it."""

    def __init__(self, nodes: dict[int, dict]) -> None:
        super().__init__(nodes)
        self.wire: list[bytes] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.wire += [message_to_proto(m).SerializeToString() for m in messages]
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.wire += [message_to_proto(r).SerializeToString() for r in replies]
        return replies


def test_no_sentinel_phi_leaves_the_sites(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / PATH_MARK
    nodes = {}
    for i, name in enumerate(["north", "south"]):
        folder = _dicom_site(root / name, i)
        nodes[10 + i] = {"data-path": str(folder), "site-name": name, "state-dir": str(tmp_path / "state" / name)}
    broken = _dicom_site(root / "west", 2, samples=12)  # a site whose data fails validation
    bad = next((broken / "images").glob("*.dcm"))
    bad.write_bytes(bad.read_bytes()[:300])  # truncated mid-header
    nodes[12] = {"data-path": str(broken), "site-name": "west", "state-dir": str(tmp_path / "state" / "west")}

    first = pydicom.dcmread(next((root / "north" / "images").glob("*.dcm")))
    assert str(first.PatientName).startswith(PATIENT_NAME) and first.PatientID == PATIENT_ID  # PHI is really there

    grid = RecordingGrid(nodes)
    config = tiny_config(**{"run.rounds": 1, "run.min-sites": 2})
    out = tmp_path / "run"
    with caplog.at_level(logging.DEBUG):
        report = run_federation(grid, config, out)
    assert set(report["final"]["per_site"]) == {"north", "south"}  # the federation really ran on the DICOMs
    assert any("west" in r.getMessage() and "pre-flight check" in r.getMessage() for r in caplog.records)
    assert report["site_notes"]["west"] == [
        "error: site data failed the pre-flight check: 1 unreadable or truncated file; details are in the site's log"
    ]

    wire = b"".join(grid.wire)
    assert len(grid.wire) > 10
    for sentinel in SENTINELS:
        assert sentinel.encode() not in wire, f"{sentinel} in a message"
    off_site = [r for r in caplog.records if not r.name.startswith(("medfed.site", "medfed.data"))]
    assert off_site, "the server logged nothing: the check below would be empty"
    for record in off_site:
        text = record.getMessage()
        assert not any(s in text for s in SENTINELS), f"server log leaks: {text}"
    files = [p for p in out.rglob("*") if p.is_file() and "state" not in p.relative_to(out).parts]
    assert any(p.name == "report.html" for p in files)
    for path in files:
        content = path.read_bytes()
        for sentinel in SENTINELS:
            assert sentinel.encode() not in content, f"{sentinel} in {path.relative_to(out)}"


def _detection_site_with_phi(folder: Path, index: int) -> Path:
    """A detection site folder whose file names, sub-folder and patient ids carry sentinels, with
    boxes that will be dropped (outside the image, empty) while the site trains."""
    import csv

    from medfed.data import write_site
    from medfed.data.synthetic import synthetic_detection_site

    write_site(folder, synthetic_detection_site(index, 40, 32, seed=3))
    (folder / "images" / PATH_MARK).mkdir()
    with (folder / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    boxes = (folder / "boxes.csv").read_text()
    for k, row in enumerate(rows):
        new = f"images/{PATH_MARK}/{PATIENT_NAME}_{k:03d}.png"
        (folder / row["image"]).rename(folder / new)
        boxes = boxes.replace(f"{row['image']},", f"{new},")
        row.update(image=new, patient_id=f"{PATIENT_ID}-{k}")
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    first = rows[0]["image"]
    (folder / "boxes.csv").write_text(boxes + f"{first},0,20,20,90,90\n{first},1,5,5,5,9\n")  # outside; empty
    return folder


@pytest.mark.slow
def test_a_simulated_run_shows_the_coordinator_no_file_name_or_patient_id(tmp_path: Path) -> None:
    """`medfed simulate` as a researcher runs it (a subprocess: the Ray site actors' log lines reach
    the coordinator's console): dropped boxes are counted there, never named."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    data = tmp_path / PATH_MARK / "sites"
    for i, name in enumerate(["north", "south"]):
        _detection_site_with_phi(data / name, i)
    assert PATIENT_ID in (data / "north" / "manifest.csv").read_text()  # the sentinels are really there
    out = tmp_path / "run"
    args = [
        sys.executable, "-c", "from medfed.cli import main; main()", "simulate", str(REPO / "configs" / "detection-synthetic.toml"),
        "--data", str(data), "--rounds", "1", "--out", str(out),
        "--set", "data.image-size=32", "--set", "model.width=8", "--set", "evaluation.example-images=1",
    ]  # fmt: skip
    env = {**os.environ, "COLUMNS": "300", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert "box(es) dropped at this site" in console  # the sites' warnings did reach the coordinator
    for sentinel in SENTINELS:
        assert sentinel not in console, f"{sentinel} on the coordinator's console"
    # the report, plots and checkpoints; not the sites' state, nor progress.json, the coordinator's own
    # resume state, which keeps the config as given (its --data path) to refuse resuming another run
    files = [p for p in out.rglob("*") if p.is_file() and "state" not in p.relative_to(out).parts]
    for path in (p for p in files if p != RunFolder(out).progress):
        content = path.read_bytes()
        for sentinel in SENTINELS:
            assert sentinel.encode() not in content, f"{sentinel} in {path.relative_to(out)}"
