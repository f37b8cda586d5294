"""Site data: on-disk site folders, importers, partitioners and synthetic sites."""

from medfed.data.arrays import SPLITS, ArrayDataset, PrivacyUnitDataset, SiteArrays
from medfed.data.manifest import DataError, DataProblem, read_site, write_site
from medfed.data.sites import load_simulated_site, simulated_site_names

__all__ = [
    "SPLITS",
    "ArrayDataset",
    "DataError",
    "DataProblem",
    "PrivacyUnitDataset",
    "SiteArrays",
    "load_simulated_site",
    "read_site",
    "simulated_site_names",
    "write_site",
]
