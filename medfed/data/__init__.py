"""Site data: on-disk site folders, importers, partitioners and synthetic sites."""

from medfed.data.arrays import SPLITS, ArrayDataset, PrivacyUnitDataset, SiteArrays
from medfed.data.boxes import (
    AnnotatedImage,
    Box,
    import_coco,
    import_voc,
    load_box_site,
    read_coco,
    read_voc,
    validate_boxes,
)
from medfed.data.manifest import read_site, write_site
from medfed.data.sites import load_simulated_site, simulated_site_names
from medfed.data.synthetic import synthetic_detection_site
from medfed.data.vocabulary import DataError, DataProblem

__all__ = [
    "SPLITS",
    "AnnotatedImage",
    "ArrayDataset",
    "Box",
    "DataError",
    "DataProblem",
    "PrivacyUnitDataset",
    "SiteArrays",
    "import_coco",
    "import_voc",
    "load_box_site",
    "load_simulated_site",
    "read_coco",
    "read_site",
    "read_voc",
    "simulated_site_names",
    "synthetic_detection_site",
    "validate_boxes",
    "write_site",
]
