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
