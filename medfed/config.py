"""Typed, validated run configuration.

A run is described by one TOML file with the sections below (keys use dashes, as in Flower's
``run_config``). Loading checks every key and value and raises :class:`ConfigError` naming the
key, the value it got and what was expected, so a typo never silently falls back to a default.

Every input is hostile until checked: numbers must be finite and within a sane range (an ε of
``inf`` or a learning rate of ``1e308`` is refused, not run), text settings are short and hold no
control characters, and a file that is not UTF-8 TOML, too large or nested too deeply is refused
with a :class:`ConfigError`, never another exception. Values are shown shortened in messages.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import reprlib
import tomllib
import typing
import unicodedata
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvaluationConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "TrainConfig",
    "MODEL_NAMES",
    "RECIPES",
    "require",
    "load_config",
    "parse_override",
    "finite_number",
    "node_state_dir",
    "STATE_FOLDER",
]

# The networks ``model.name`` may pick, per task; the first is the task's default.
# ``medfed.models.zoo`` builds them (a test keeps the two lists equal).
MODEL_NAMES: dict[str, tuple[str, ...]] = {
    "classification": ("cnn", "resnet18", "resnet34", "resnet50", "densenet121", "efficientnet-b0", "seresnet50"),
    "segmentation": ("unet", "basicunet", "segresnet", "dynunet", "attentionunet", "swinunetr"),
    "instance-segmentation": ("unet", "basicunet", "segresnet", "dynunet", "attentionunet", "swinunetr"),
    "detection": ("centernet", "centernet-resnet18"),
    "tabular": ("mlp", "logistic"),
    "generation": ("ddpm", "ddpm-mask"),
}

# What ``[train]`` takes from the recipe of the run's task and mode (with / without DP) when a
# config leaves the key out or sets it to "auto". Measured on this project's benchmarks (README,
# "Recipes"); a run without DP never inherits the settings tuned for DP, nor the reverse.
RECIPE_KEYS = ("optimizer", "lr", "momentum", "weight-decay", "schedule", "warmup-rounds", "logit-adjust")
RECIPES: dict[tuple[str, bool], dict[str, Any]] = {
    # (task, DP on)
    # constant: cosine took the lr to ~0 while the federated model was still learning; PneumoniaMNIST
    # FedAvg (3 skewed sites) test AUROC 0.877 / 0.919 -> 0.913 / 0.942 (run.seed 0 / 1, 5 rounds x 3
    # epochs), 10 x 1 epochs 0.874 / 0.933 -> 0.908 / 0.943; pooled (one site) 0.951 / 0.960 -> 0.952 / 0.962
    ("classification", False): {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight-decay": 0.0,
                                "schedule": "constant", "warmup-rounds": 0, "logit-adjust": True},
    ("classification", True): {"optimizer": "sgd", "lr": 0.5, "momentum": 0.0, "weight-decay": 0.0,
                               "schedule": "constant", "warmup-rounds": 0, "logit-adjust": False},
    # constant: the three retinal sites (25 rounds x 20 steps) test Dice CHASE_DB1 / HRF / STARE, two
    # runs each: cosine 0.666 / 0.621 / 0.669 and 0.666 / 0.620 / 0.663, constant 0.665 / 0.638 / 0.690
    # and 0.654 / 0.637 / 0.682 (mean over sites 0.651 -> 0.661)
    ("segmentation", False): {"optimizer": "adam", "lr": 2e-3, "momentum": 0.9, "weight-decay": 0.0,
                              "schedule": "constant", "warmup-rounds": 0, "logit-adjust": False},
    ("segmentation", True): {"optimizer": "sgd", "lr": 0.3, "momentum": 0.0, "weight-decay": 0.0,
                             "schedule": "constant", "warmup-rounds": 0, "logit-adjust": False},
    # instance segmentation trains the segmentation networks on a 3-class map: the same recipes
    ("instance-segmentation", False): {"optimizer": "adam", "lr": 2e-3, "momentum": 0.9, "weight-decay": 0.0,
                                       "schedule": "constant", "warmup-rounds": 0, "logit-adjust": False},
    ("instance-segmentation", True): {"optimizer": "sgd", "lr": 0.3, "momentum": 0.0, "weight-decay": 0.0,
                                      "schedule": "constant", "warmup-rounds": 0, "logit-adjust": False},
    # constant: BCCD (15 rounds x 3 epochs) is still learning at the end, and cosine cut its test
    # mAP@0.5 from 0.59 to 0.45 (grey, one run each)
    ("detection", False): {"optimizer": "adam", "lr": 2e-3, "momentum": 0.9, "weight-decay": 0.0,
                           "schedule": "constant", "warmup-rounds": 0, "logit-adjust": False},
    ("detection", True): {"optimizer": "adam", "lr": 2e-3, "momentum": 0.9, "weight-decay": 0.0,
                          "schedule": "constant", "warmup-rounds": 0, "logit-adjust": False},
    # tabular (UCI heart, 4 hospitals, 20 rounds x 1 epoch, benchmarks/heart.py seed 0): FedAvg test
    # accuracy 0.744 / AUROC 0.842 without DP (adam 1e-2), 0.753 / 0.848 with DP at ε = 8 (sgd 0.5)
    ("tabular", False): {"optimizer": "adam", "lr": 1e-2, "momentum": 0.9, "weight-decay": 0.0,
                         "schedule": "constant", "warmup-rounds": 0, "logit-adjust": False},
    ("tabular", True): {"optimizer": "sgd", "lr": 0.5, "momentum": 0.0, "weight-decay": 0.0,
                        "schedule": "constant", "warmup-rounds": 0, "logit-adjust": False},
    # generation (class-conditional diffusion): Adam, as diffusion models are usually trained; the
    # noise of DP-SGD is added to the clipped gradients before Adam's step, so it is DP all the same
    ("generation", False): {"optimizer": "adam", "lr": 2e-3, "momentum": 0.9, "weight-decay": 0.0,
                            "schedule": "constant", "warmup-rounds": 0, "logit-adjust": False},
    ("generation", True): {"optimizer": "adam", "lr": 2e-3, "momentum": 0.9, "weight-decay": 0.0,
                           "schedule": "constant", "warmup-rounds": 0, "logit-adjust": False},
}  # fmt: skip


# Limits of what a config may say (see the module docstring): generous for real runs, small enough
# that no value can make a run hang, overflow or print megabytes.
STATE_FOLDER = ".medfed-state"  # a site's own state (ledger, cache) when kept inside its data folder
MAX_TEXT = 200  # characters of a name-like setting (run.name, class names, patterns)
MAX_PATH = 4096  # characters of a path setting
MAX_CONFIG_BYTES = 1_000_000  # a config file larger than this is not a config
MAX_CLASSES = 1000
MAX_ROUNDS = 10_000
MAX_SITES = 1000
SITE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
MAX_BATCH = 65_536
MAX_EPSILON = 100.0  # beyond this DP protects nothing
MIN_EPSILON = 0.01  # below this the accountant's bounds lose meaning (its ε may even come out negative)
MAX_DELTA = 0.1
MAX_SEED = 2**31 - 1


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key.

    ``key`` is the dotted key at fault (``run.rounds``), or "" when the file as a whole is.
    """

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class RunConfig:
    """What is trained and how rounds are run on the server.

    ``strategy``: ``fedavg``, ``fedprox`` (``proximal-mu``), ``fedadam`` (``server-lr``), or a
    robust aggregation for when a site may be faulty: ``fedmedian`` (coordinate-wise median) or
    ``fedtrimmedavg`` (coordinate-wise mean without the ``trim-fraction`` largest and smallest
    values). A round goes on with the sites that reply within ``round-timeout`` seconds as long as
    ``min-sites`` updates pass validation (each at most ``max-update-norm`` from the global
    model); the run waits at most ``site-wait`` seconds for ``min-sites`` sites to connect, at the
    start and whenever fewer are connected, then fails with a clear message.
    ``update-compression`` (``fp16``, ``int8``) makes sites send their weight change in half or
    about a quarter of the bytes; the server restores the weights before validating them.
    ``initial-model`` (a checkpoint on the server, e.g. from ``medfed pretrain`` on data that holds
    no patient) is where the global and the local-only models start instead of random weights.
    ``ema`` in (0, 1) makes the released model (evaluated each round, checkpointed as the global
    model, reported) the exponential moving average of the rounds' global models with that decay,
    while sites go on training from the latest one: under DP it averages out part of the noise
    of the last rounds at no privacy cost (it only post-processes what sites sent). 0: off.
    ``secure-aggregation`` (:mod:`medfed.secure_aggregation`): the server learns only the
    example-weighted sum of each round's updates; each site clips its own update to
    ``max-update-norm`` and the server checks the sum. A round completes while at least
    ``secure-aggregation-threshold`` (a fraction of the round's sites, above one half) remain.
    ``fraction-train`` < 1 asks each connected site to train in a round with that probability,
    independently of the others (Poisson sampling, the sampling the site-level accountant assumes);
    a round with fewer than ``min-sites`` usable updates keeps the global model (except under
    site-level DP, which releases every round: :mod:`medfed.site_level_dp`).
    ``tracking`` (``none``, ``mlflow``, ``tensorboard``) follows the run in an experiment tracker
    (:mod:`medfed.tracking`; needs ``pip install 'medfed[tracking]'``). ``tracking-uri``: for MLflow a
    ``sqlite:///PATH`` store or a team's ``http(s)://`` server (default: ``OUT/mlflow.db``), for
    TensorBoard a log folder (default: ``OUT/tensorboard``); relative paths are from the working folder.
    ``personalization`` gives each site a personal model, kept in its state folder and never sent
    (:mod:`medfed.personalization`): ``fedbn`` (normalisation layers stay at each site: their
    update is not sent, so the global model keeps its starting ones), ``finetune`` (after the last
    round each site trains ``finetune-steps`` steps from the final global model, charged to its ε
    ledger), ``ditto`` (each round a site also trains its personal model with the penalty
    ``ditto-lambda``/2 ||w - w_global||², charged too). ``none``: only the global model.
    """

    name: str = "medfed"
    task: Literal["classification", "segmentation", "instance-segmentation", "detection", "tabular", "generation"] = (
        "classification"
    )
    seed: int = 0
    rounds: int = 3
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"] = "fedavg"
    min_sites: int = 2
    proximal_mu: float = 0.0
    server_lr: float = 0.01
    max_update_norm: float = 1000.0
    round_timeout: float = 3600.0
    trim_fraction: float = 0.2
    site_wait: float = 600.0
    update_compression: Literal["none", "fp16", "int8"] = "none"
    initial_model: str = ""
    ema: float = 0.0
    secure_aggregation: bool = False
    secure_aggregation_threshold: float = 0.6
    fraction_train: float = 1.0
    tracking: Literal["none", "mlflow", "tensorboard"] = "none"
    tracking_uri: str = ""
    personalization: Literal["none", "fedbn", "finetune", "ditto"] = "none"
    finetune_steps: int = 20
    ditto_lambda: float = 0.1

    def __post_init__(self) -> None:
        _check_text("run.name", self.name)
        _check_tracking_uri(self.tracking, self.tracking_uri)
        _check_text("run.initial-model", self.initial_model, MAX_PATH)
        _check_range("run.seed", self.seed, 0, MAX_SEED, "an integer")
        _check_range("run.rounds", self.rounds, 1, MAX_ROUNDS, "an integer")
        _check_range("run.min-sites", self.min_sites, 1, MAX_SITES, "an integer")
        _check_range("run.proximal-mu", self.proximal_mu, 0, 1000)
        _check_range("run.server-lr", self.server_lr, 0, 10, low_open=True)
        _check_range("run.max-update-norm", self.max_update_norm, 0, 1e12, low_open=True)
        _check_range("run.round-timeout", self.round_timeout, 0, 1e6, "seconds", low_open=True)
        require(0 <= self.trim_fraction < 0.5, "run.trim-fraction", self.trim_fraction, "a fraction in [0, 0.5)")
        _check_range("run.site-wait", self.site_wait, 0, 1e6, "seconds", low_open=True)
        require(0 <= self.ema < 1, "run.ema", self.ema, "a decay in [0, 1) (0: off), e.g. 0.5")
        require(
            0 < self.fraction_train <= 1,
            "run.fraction-train",
            self.fraction_train,
            "a fraction in (0, 1]: each site takes part in a round with this probability (1: every site)",
        )
        _check_range("run.finetune-steps", self.finetune_steps, 1, 10**6, "an integer")
        _check_range("run.ditto-lambda", self.ditto_lambda, 0, 10_000, low_open=True)
        self._check_secure_aggregation()

    def _check_secure_aggregation(self) -> None:
        """What secure aggregation cannot run with: the server sees only the sum of the updates."""
        require(0.5 < self.secure_aggregation_threshold <= 1, "run.secure-aggregation-threshold",
                self.secure_aggregation_threshold, "a fraction of the sites in (0.5, 1], e.g. 0.6")  # fmt: skip
        if not self.secure_aggregation:
            return
        require(self.strategy in ("fedavg", "fedprox"), "run.strategy", self.strategy,
                "fedavg or fedprox with run.secure-aggregation = true (the server sees only the sum of the "
                "updates: fedmedian and fedtrimmedavg need each update, fedadam is not wired to the sum)")  # fmt: skip
        require(self.update_compression == "none", "run.update-compression", self.update_compression,
                "'none' with run.secure-aggregation = true (masked updates are uniform 64-bit numbers that do not "
                "compress; fp16 and int8 scale each site's update on its own, so masked sums of them mean nothing)")  # fmt: skip
        require(self.min_sites >= 2, "run.min-sites", self.min_sites,
                "at least 2 with run.secure-aggregation = true (the sum of one site is its update)")  # fmt: skip


@dataclass(frozen=True)
class SiteSource:
    """One hospital's own dataset in a ``pairs`` simulation, a ``[data.site.NAME]`` table: the folder
    ``folder`` (default: NAME) under ``data.path``, holding its ``images`` and ``masks`` folders (default:
    the ``[data]`` values) and, optionally, ``fov-masks``: a folder of field-of-view masks matched to
    the images by name (without it the field of view is found in each photo). ``patient-pattern``
    (default: the ``[data]`` value) reads patients from file names."""

    name: str
    folder: str = ""
    images: str = ""
    masks: str = ""
    fov_masks: str = ""
    patient_pattern: str = ""

    def __post_init__(self) -> None:
        key = f"data.site.{self.name}"
        require(SITE_NAME.fullmatch(self.name) is not None, "data.site", self.name,
               "a site name of letters, digits, '-', '_' or '.' (at most 64, not starting with '.')")  # fmt: skip
        for field_name in ("folder", "images", "masks", "fov_masks"):
            value = getattr(self, field_name)
            _check_text(f"{key}.{field_name.replace('_', '-')}", value, MAX_PATH)
            require(not Path(value).is_absolute() and ".." not in Path(value).parts,
                   f"{key}.{field_name.replace('_', '-')}", value, "a folder name inside data.path (relative, no '..')")  # fmt: skip
        _check_text(f"{key}.patient-pattern", self.patient_pattern)
        _check_pattern(f"{key}.patient-pattern", self.patient_pattern)


@dataclass(frozen=True)
class DataConfig:
    """Where the sites' data comes from in a simulation, and how it is split into sites.

    ``source``: ``synthetic`` (generated sites with scanner shifts), ``medmnist`` (a MedMNIST
    ``.npz`` at ``path``, split by ``partitioner``), ``sites`` (``path`` holds one site folder
    per hospital: the natural partition), ``pairs`` (``path`` holds an ``images`` folder and a
    ``masks`` folder matched by file name; patients, found in file names by ``patient-pattern``,
    are dealt to ``sites`` sites in name order, then to train/val/test within each site) or
    ``voc`` (``path`` holds Pascal VOC ``Annotations/*.xml`` and ``JPEGImages/``; images are dealt
    to ``sites`` sites in name order, then to train/val/test within each site) or ``heart-uci``
    (``path`` holds the UCI Heart Disease files: one site per hospital, as ``medfed data import
    --from heart-uci`` would make them, see :mod:`medfed.data.heart_uci`).

    ``ct-window`` ([low, high] Hounsfield units) is what CT images are clipped to before scaling to
    [0, 1]; other images are scaled by their 0.5-99.5 percentile range. ``modality`` says which
    images are CT: ``auto`` (DICOM Modality tag), ``CT`` (all non-photo images, e.g. NIfTI CT in
    Hounsfield units) or ``other`` (none).

    ``target-spacing`` (mm per axis, e.g. [1.5, 1.5, 1.5]; empty: off) resamples every scan to that
    voxel size, after reorienting volumes to ``orientation`` (axis codes such as "RAS"; "" keeps
    the stored order), and then crops or pads it to ``image-size``: a millimetre spans the same
    voxels at every site. Without it scans are resized whole to ``image-size``.

    ``max-pixels`` caps the pixels (voxels) one image file may decode to, read from its header before
    decoding: a small compressed file can claim gigabytes. The default, 64 M (a 400^3 volume, an
    8000 x 8000 photo), keeps one scan's arrays well under a gigabyte.

    ``channels`` is the number of image channels a model takes: 1 (grey; colour photos are turned
    grey), 3 (colour photos keep their RGB) or N (N scans of a case stacked, e.g. T1, T1c, T2, FLAIR).

    ``leave-out`` names sites the simulation runs without (e.g. ``["site-2"]``: leave-one-site-out),
    each among the sites the data gives; the others keep exactly the data they have without it
    (partitions and seeds follow the full list of sites), and at least ``run.min-sites`` remain.

    ``num-classes`` counts the classes a model tells apart: for segmentation including background
    (class 0), for detection the object classes only. ``class-names`` (optional; required by
    detection data that name their classes, e.g. VOC) gives one name per class index.
    ``multi-label`` (classification): each image holds any number of the ``num-classes`` findings
    (a chest film with several), each learnt as its own yes/no with a sigmoid output; a manifest
    ``label`` cell lists them joined by ``|``.

    Images are resampled to ``image-size`` pixels along each of ``spatial-dims`` axes (2: images,
    3: volumes). ``patch-size`` > 0 trains on one random patch per image per step and evaluates
    with sliding-window inference (segmentation).

    ``features`` (tabular sites, ``run.task = 'tabular'``) names the manifest's feature columns the
    model takes, in order; every site must have them all.

    ``site`` tables (``[data.site.NAME]``, source ``pairs``: see :class:`SiteSource`) make each of
    several datasets under ``path`` one site, as they came from their hospitals (``sites`` is then
    their number; sites in name order). ``field-of-view`` (2D segmentation of photos with a camera's field of view, e.g.
    fundus photos): ``whole`` scores the whole image; ``mask`` learns and scores only inside the
    field of view (a site's field-of-view masks, else found in each photo); ``crop`` also crops each
    photo to the square around its field of view before resizing, so the field of view spans
    ``image-size`` pixels at every site: one scale for cameras of any resolution.
    """

    source: Literal["synthetic", "medmnist", "sites", "pairs", "voc", "heart-uci"] = "synthetic"
    path: str = ""
    sites: int = 3
    partitioner: Literal["iid", "dirichlet", "natural"] = "iid"
    alpha: float = 0.5
    spatial_dims: int = 2
    image_size: int = 28
    patch_size: int = 0
    num_classes: int = 2
    samples_per_site: int = 240
    max_samples_per_site: int = 0
    images: str = "images"
    masks: str = "masks"
    patient_pattern: str = ""
    class_names: tuple[str, ...] = ()
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    modality: Literal["auto", "CT", "other"] = "auto"
    target_spacing: tuple[float, ...] = ()
    orientation: str = ""
    channels: int = 1
    field_of_view: Literal["whole", "mask", "crop"] = "whole"
    site: tuple[SiteSource, ...] = ()
    max_pixels: int = 64 * 1024 * 1024
    leave_out: tuple[str, ...] = ()
    multi_label: bool = False
    features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key, text in (("data.path", self.path), ("data.images", self.images), ("data.masks", self.masks)):
            _check_text(key, text, MAX_PATH)
        for name in self.leave_out:
            _check_text("data.leave-out", name)
        for name in self.features:
            _check_text("data.features", name)
        require(len(set(self.features)) == len(self.features), "data.features", list(self.features), "unique names")
        require(len(set(self.leave_out)) == len(self.leave_out), "data.leave-out", list(self.leave_out), "unique names")
        _check_text("data.patient-pattern", self.patient_pattern)
        _check_text("data.orientation", self.orientation)
        for name in self.class_names:
            _check_text("data.class-names", name)
        _check_range("data.sites", self.sites, 1, MAX_SITES, "an integer")
        _check_range("data.max-pixels", self.max_pixels, 1, 2**36, "an integer (pixels per image file)")
        require(1 <= self.channels <= 16, "data.channels", self.channels, "an integer in [1, 16] (1: grey, 3: colour)")
        _check_range("data.alpha", self.alpha, 0, 1e6, low_open=True)
        require(self.spatial_dims in (2, 3), "data.spatial-dims", self.spatial_dims, "2 (images) or 3 (volumes)")
        largest = 4096 if self.spatial_dims == 2 else 1024
        _check_range("data.image-size", self.image_size, 8, largest, f"an integer ({self.spatial_dims}D)")
        require(
            self.patch_size == 0 or 8 <= self.patch_size <= self.image_size,
            "data.patch-size",
            self.patch_size,
            f"0 (whole images) or an integer in [8, data.image-size = {self.image_size}]",
        )
        _check_range("data.num-classes", self.num_classes, 1, MAX_CLASSES, "an integer")
        require(
            len(self.ct_window) == 2 and -1e6 <= self.ct_window[0] < self.ct_window[1] <= 1e6,
            "data.ct-window",
            list(self.ct_window),
            "[low, high] Hounsfield units with -1e6 <= low < high <= 1e6, e.g. [-160, 240] for soft tissue",
        )
        require(
            not self.target_spacing
            or (len(self.target_spacing) == self.spatial_dims and all(1e-3 <= v <= 1e3 for v in self.target_spacing)),
            "data.target-spacing",
            list(self.target_spacing),
            f"[] (off) or {self.spatial_dims} voxel sizes in mm in [0.001, 1000], one per axis (data.spatial-dims)",
        )
        require(
            not self.orientation or (self.spatial_dims == 3 and _is_axis_codes(self.orientation)),
            "data.orientation",
            self.orientation,
            '"" (as stored) or 3D axis codes with one of L/R, A/P, I/S each, e.g. "RAS" (needs data.spatial-dims = 3)',
        )
        require(
            not self.orientation or bool(self.target_spacing),
            "data.orientation",
            self.orientation,
            '"" unless data.target-spacing is set (reorientation is part of resampling)',
        )
        require(
            not self.class_names or len(self.class_names) == self.num_classes,
            "data.class-names",
            list(self.class_names),
            f"one name per class: data.num-classes = {self.num_classes} names",
        )
        require(
            len(set(self.class_names)) == len(self.class_names),
            "data.class-names",
            list(self.class_names),
            "unique names",
        )
        _check_range("data.samples-per-site", self.samples_per_site, 10, 100_000, "an integer")
        _check_range("data.max-samples-per-site", self.max_samples_per_site, 0, 10**9, "an integer", note=" (0: all)")
        _check_pattern("data.patient-pattern", self.patient_pattern)
        if self.source in ("medmnist", "sites", "pairs", "voc", "heart-uci"):
            require(bool(self.path), "data.path", self.path, f"a path (required when data.source = '{self.source}')")
        if self.site:
            require(self.source == "pairs", "data.site", [s.name for s in self.site],
                   "no [data.site.NAME] tables unless data.source = 'pairs'")  # fmt: skip
            require(self.sites == len(self.site), "data.sites", self.sites,
                   f"{len(self.site)}, the number of [data.site.NAME] tables (or leave data.sites out)")  # fmt: skip
        require(self.field_of_view == "whole" or (self.spatial_dims == 2 and self.source in ("pairs", "sites")),
               "data.field-of-view", self.field_of_view,
               "'whole' unless 2D photos come from data.source = 'pairs' or 'sites'")  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """The network: ``name`` picks it from the model zoo (:data:`MODEL_NAMES`; "" is the task's
    default, ``cnn`` / ``unet`` / ``centernet``). ``width`` channels in the first block, doubled at
    each of ``depth`` blocks (the zoo's networks that have fixed sizes ignore what does not apply).
    ``input-norm`` standardises each image, channel by channel, to zero mean and unit variance as
    the network's first step: a scanner's brightness and contrast then do not move the scores, so
    one operating threshold fits every site. Leave it off where absolute intensity is the finding
    (CT densities in Hounsfield units). ``full-resolution`` (``unet`` only) puts one more level of
    ``width`` channels in front, at the input's full resolution (stride 1): without it the U-Net's
    first convolution already halves the image, and its output maps are upsampled from
    half-resolution features only (a stride-2 checkerboard, which blurs the boundaries between
    touching objects)."""

    name: str = ""
    width: int = 16
    depth: int = 3
    norm_groups: int = 4
    dropout: float = 0.0
    norm: Literal["group", "none"] = "group"
    input_norm: bool = False
    full_resolution: bool = False

    def __post_init__(self) -> None:
        _check_text("model.name", self.name)
        _check_range("model.width", self.width, 1, 1024, "an integer")
        require(1 <= self.depth <= 6, "model.depth", self.depth, "an integer in [1, 6]")
        require(
            self.norm_groups >= 1 and self.width % self.norm_groups == 0,
            "model.norm-groups",
            self.norm_groups,
            f"a divisor of model.width ({self.width})",
        )
        require(0 <= self.dropout < 1, "model.dropout", self.dropout, "a number in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """Local training at each site, per round.

    ``trainable = "bias-norm"`` trains only the biases and normalisation scales (a few hundred to a
    few thousand numbers, the rest frozen at the starting model): with a public starting model
    (``run.initial-model``) it adapts to the site's scanner while DP noise is spread over far fewer
    coordinates.

    ``augmentations`` = K > 1 shows every sampled image K times per step, each a different random
    view (the task's training transform: random patches for segmentation, flips for detection,
    ``augment`` shifts and rotations for classification). Under DP each image's K per-view gradients
    are averaged before clipping (augmentation multiplicity): the image still counts once in the
    accounting, and the averaged gradient is less noisy relative to the clipping norm.
    ``physical-batch-size`` (0: the whole batch) splits each batch into parts of at most that many
    images (times K views) computed one after the other, the gradients accumulated into one step:
    large batches, which DP needs, within a small GPU's memory.

    ``schedule`` sets the learning rate over the whole run (all rounds' local steps end to end):
    ``constant``, or ``cosine`` (from ``lr`` down to 0 at the last step of the last round), after a
    linear warm-up over the first ``warmup-rounds`` rounds' steps.

    ``logit-adjust`` (classification without DP) adds the site's log class frequencies to the logits
    in its training loss (logit adjustment, as in FedLC): a site whose patients are mostly of one
    class then learns class-balanced scores instead of drifting to its majority class, and the
    averaged model is not pulled to each site's majority. Not under DP: the offsets are computed
    from all of a site's labels, which the privacy accounting does not cover.

    ``synthetic-augmentation`` = R > 0 (classification, or 2D segmentation): before its first round
    each site trains a class-conditional image generator on its own training split
    (:mod:`medfed.generative`, ``synthetic-steps`` steps) and adds R generated images per training
    image to it, each to the class that then has the fewest; for segmentation the generator draws an
    image for a mask, and the generated pairs reuse the site's training masks, flipped or turned
    (those with its scarce classes first). With DP-SGD at the sites the generator is trained with
    DP-SGD too, for ε = ``synthetic-epsilon`` (0: half of ``privacy.target-epsilon``) charged to the
    site's ledger, and the task model's noise is calibrated so that generator and model together
    spend ``privacy.target-epsilon``. Without DP-SGD at the sites the generator is
    trained without DP: its images may reproduce the site's patients (they never leave the site).

    In a config file, ``optimizer``, ``lr``, ``momentum``, ``weight-decay``, ``schedule``,
    ``warmup-rounds`` and ``logit-adjust`` left out (or set to "auto") come from the recipe of the
    run's task and mode (:data:`RECIPES`); ``recipe`` lists the keys that did.
    """

    local_epochs: int = 1
    local_steps: int = 0
    batch_size: int = 32
    lr: float = 0.05
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = False
    trainable: Literal["all", "bias-norm"] = "all"
    augment: bool = False
    logit_adjust: bool = False
    augmentations: int = 1
    physical_batch_size: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_rounds: int = 0
    synthetic_augmentation: float = 0.0
    synthetic_steps: int = 200
    synthetic_epsilon: float = 0.0
    recipe: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_range("train.warmup-rounds", self.warmup_rounds, 0, MAX_ROUNDS, "an integer", note=" (0: none)")
        _check_range("train.local-epochs", self.local_epochs, 1, 1000, "an integer")
        _check_range("train.local-steps", self.local_steps, 0, 10**6, "an integer", note=" (0: use local-epochs)")
        _check_range("train.batch-size", self.batch_size, 1, MAX_BATCH, "an integer")
        _check_range("train.lr", self.lr, 0, 10, low_open=True)
        require(0 <= self.momentum < 1, "train.momentum", self.momentum, "a number in [0, 1)")
        _check_range("train.weight-decay", self.weight_decay, 0, 1)
        _check_range("train.augmentations", self.augmentations, 1, 64, "an integer", note=" (1: off)")
        _check_range("train.synthetic-augmentation", self.synthetic_augmentation, 0, 10, note=" (0: off)")
        _check_range("train.synthetic-steps", self.synthetic_steps, 1, 10**6, "an integer")
        _check_range("train.synthetic-epsilon", self.synthetic_epsilon, 0, MAX_EPSILON,
                     note=" (0: half of privacy.target-epsilon)")  # fmt: skip
        _check_range(
            "train.physical-batch-size",
            self.physical_batch_size,
            0,
            MAX_BATCH,
            "an integer",
            note=" (0: the whole batch at once)",
        )


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy: DP-SGD at each site (Opacus), DP-FedAvg at the server, or both. On by default.

    ``level`` says what one guarantee protects. ``sample`` (default): one privacy unit of a site
    (a patient or an image), by DP-SGD at the site, with the settings of the next paragraph. ``site``: a whole site's
    data, by DP-FedAvg with adaptive clipping at the server (:mod:`medfed.site_level_dp`: each site's
    update clipped, equal-weight average, Gaussian noise; sites train without DP-SGD); it needs many
    sites (at least 10; hundreds for a model that learns well) and ``site-epsilon`` is what the whole
    run spends, at ``site-delta`` (0: 1/(10 N) for N sites). ``sample+site``: both at once.
    ``site-clip-norm`` is the clipping norm of a site's update in the first round, adapted each round
    at rate ``site-clip-lr`` (0: fixed) toward the norm that leaves ``site-clip-quantile`` of the
    updates unclipped (Andrew et al. 2021).

    ``target_epsilon`` is what this run may spend at a site; ``budget`` (0: equal to the target)
    is the site's lifetime cap, enforced across rounds and runs by the persisted accountant.
    ``delta`` 0 means 1/(10 n) for a site with n training samples. ``unit`` is what one guarantee
    protects: ``patient`` (all of a patient's images together, where the site gives patient ids;
    otherwise the image) or ``image`` (each image alone: weaker when a patient has several images,
    but with more units less noise).
    """

    enabled: bool = True
    target_epsilon: float = 8.0
    delta: float = 0.0
    max_grad_norm: float = 1.0
    budget: float = 0.0
    accountant: Literal["rdp", "prv"] = "rdp"
    unit: Literal["patient", "image"] = "patient"
    level: Literal["sample", "site", "sample+site"] = "sample"
    site_epsilon: float = 8.0
    site_delta: float = 0.0
    site_clip_norm: float = 0.1
    site_clip_quantile: float = 0.5
    site_clip_lr: float = 0.2

    def __post_init__(self) -> None:
        require(
            self.enabled or self.level == "sample",
            "privacy.level",
            self.level,
            "'sample' (the default) when privacy.enabled = false; set privacy.enabled = true for site-level DP",
        )
        _check_range("privacy.site-epsilon", self.site_epsilon, MIN_EPSILON, MAX_EPSILON)
        _check_range("privacy.site-delta", self.site_delta, 0, MAX_DELTA, note=" (0: automatic, 1/(10 N) for N sites)")
        _check_range("privacy.site-clip-norm", self.site_clip_norm, 0, 1e6, low_open=True)
        require(
            0 < self.site_clip_quantile < 1,
            "privacy.site-clip-quantile",
            self.site_clip_quantile,
            "a fraction in (0, 1): the share of site updates the clipping norm should leave unclipped",
        )
        _check_range("privacy.site-clip-lr", self.site_clip_lr, 0, 10, note=" (0: the clipping norm stays fixed)")
        _check_range("privacy.target-epsilon", self.target_epsilon, MIN_EPSILON, MAX_EPSILON)
        _check_range(
            "privacy.delta", self.delta, 0, MAX_DELTA, note=" (0: automatic, 1/(10 n); it must also be below 1/n)"
        )
        _check_range("privacy.max-grad-norm", self.max_grad_norm, 0, 1000, low_open=True)
        require(
            self.budget == 0 or MIN_EPSILON <= self.budget <= 10 * MAX_EPSILON,
            "privacy.budget",
            self.budget,
            f"0 (target-epsilon) or a number in [{MIN_EPSILON:g}, {10 * MAX_EPSILON:g}]",
        )

    @property
    def site_budget(self) -> float:
        """The lifetime ε cap at a site."""
        return self.budget or self.target_epsilon

    @property
    def sample_level(self) -> bool:
        """DP-SGD at each site (its own ε ledger): ``level`` "sample" or "sample+site"."""
        return self.enabled and self.level != "site"

    @property
    def site_level(self) -> bool:
        """DP-FedAvg at the server, protecting a whole site: ``level`` "site" or "sample+site"."""
        return self.enabled and self.level != "sample"


@dataclass(frozen=True)
class EvaluationConfig:
    """Evaluation at the end of a run.

    Binary classification is reported at an operating point: ``threshold`` on the probability of
    class 1, or 0 to choose it at the end of the run on the sites' validation splits (pooled):
    Youden's J (sensitivity + specificity - 1) at its highest, or, with ``target-sensitivity`` > 0,
    the highest threshold whose sensitivity reaches that target. The chosen value is written into
    the global model's checkpoint, so ``medfed evaluate`` and ``medfed predict`` use it.
    ``operating-point = "site"`` also chooses each site's own threshold the same way on its own
    validation split (a scanner may shift every score a little), used for that site's test
    metrics and kept in the checkpoint by site name (``--site`` of ``medfed evaluate``/``predict``);
    a site whose validation split holds one class uses the pooled one. ``"pooled"``: one for all.
    Multi-label classification (``data.multi-label``) has one threshold per label instead,
    ``label-thresholds`` (empty: each chosen the same way, per label, on the pooled validation
    splits), kept in the checkpoint likewise.
    ``min-structure-size`` (pixels or voxels; 0: off) removes smaller connected components from
    predicted segmentation masks before structures are counted and measured.
    ``replicates``: bootstrap resamples of each site's test cases behind the 95 % intervals that
    compare a personal model with the global one (``run.personalization``).
    """

    cross_site: bool = True
    example_images: int = 3
    batch_size: int = 128
    threshold: float = 0.0
    target_sensitivity: float = 0.0
    operating_point: Literal["site", "pooled"] = "site"
    min_structure_size: int = 0
    label_thresholds: tuple[float, ...] = ()
    replicates: int = 200

    def __post_init__(self) -> None:
        require(
            all(0 < t < 1 for t in self.label_thresholds),
            "evaluation.label-thresholds",
            list(self.label_thresholds),
            "[] (chosen on validation data) or one probability in (0, 1) per label",
        )
        require(
            0 <= self.threshold < 1,
            "evaluation.threshold",
            self.threshold,
            "0 (chosen on validation data) or a probability in (0, 1)",
        )
        require(
            0 <= self.target_sensitivity < 1,
            "evaluation.target-sensitivity",
            self.target_sensitivity,
            "0 (Youden's J) or a sensitivity in (0, 1), e.g. 0.9",
        )
        _check_range("evaluation.min-structure-size", self.min_structure_size, 0, 10**9, "an integer", note=" (0: off)")
        _check_range("evaluation.example-images", self.example_images, 0, 100, "an integer")
        _check_range("evaluation.batch-size", self.batch_size, 1, MAX_BATCH, "an integer")
        _check_range("evaluation.replicates", self.replicates, 10, 100_000, "an integer")


_NORM_LAYER_CHECKS: dict[str, bool] = {}


def _has_norm_layers(config: Config) -> bool:
    """Whether the run's network has normalisation layers (FedBN needs some). The network is built once
    per task, model and data settings: a site validates its config at every message."""
    from medfed.personalization import norm_keys
    from medfed.tasks import get_task

    key = repr((config.run.task, config.model, config.data))
    if key not in _NORM_LAYER_CHECKS:
        _NORM_LAYER_CHECKS[key] = bool(norm_keys(get_task(config.run.task).build_model(config)))
    return _NORM_LAYER_CHECKS[key]


@dataclass(frozen=True)
class Config:
    """A whole run: one frozen value shared by server, sites and report."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        names = MODEL_NAMES[self.run.task]
        if not self.model.name:  # the task's default network, named so that reports say which
            object.__setattr__(self, "model", dataclasses.replace(self.model, name=names[0]))
        require(
            self.model.name in names,
            "model.name",
            self.model.name,
            f"one of {list(names)} for run.task = '{self.run.task}'",
        )
        if self.privacy.site_level:
            require(
                self.run.strategy in ("fedavg", "fedprox"),
                "run.strategy",
                self.run.strategy,
                f"'fedavg' or 'fedprox' with privacy.level = '{self.privacy.level}' (site-level DP replaces the "
                "server's aggregation with a clipped, noised equal-weight average)",
            )
        require(
            not (self.privacy.level == "site" and self.evaluation.cross_site),
            "evaluation.cross-site",
            self.evaluation.cross_site,
            "false with privacy.level = 'site': each site's local-only model would go to the other sites "
            "without any DP (or use privacy.level = 'sample+site')",
        )
        # the rules of the run's task (each task module's ``check_config``); the task modules import
        # this one, so the registry is reached when a config is built, not when this module loads
        from medfed.tasks import get_task

        task = get_task(self.run.task)
        require(
            self.data.spatial_dims in task.SPATIAL_DIMS,
            "data.spatial-dims",
            self.data.spatial_dims,
            f"one of {list(task.SPATIAL_DIMS)} for run.task = '{self.run.task}'",
        )
        task.check_config(self)
        require(not self.data.multi_label or self.run.task == "classification", "data.multi-label", True,
                f"false for run.task = '{self.run.task}' (several labels per image are for classification)")  # fmt: skip
        self._check_synthetic()
        require(not self.data.features or self.run.task == "tabular", "data.features", list(self.data.features),
                "[] unless run.task = 'tabular' (feature columns feed tabular models only)")  # fmt: skip
        if self.run.personalization == "fedbn":  # on the built model: the tabular networks have no norm setting
            require(_has_norm_layers(self), "run.personalization", "fedbn",
                    f"another mode for model.name = '{self.model.name}' with model.norm = '{self.model.norm}': the "
                    "network has no normalisation layers, and FedBN (which keeps them at each site) would be FedAvg")  # fmt: skip
        require(not (self.run.secure_aggregation and self.evaluation.cross_site), "evaluation.cross-site", True,
                "false with run.secure-aggregation = true (the cross-site matrix sends each site's local-only "
                "model to the coordinator unmasked)")  # fmt: skip
        require(not (self.run.secure_aggregation and self.privacy.site_level), "privacy.level", self.privacy.level,
                "'sample' with run.secure-aggregation = true (site-level DP clips each site's update at the "
                "server, which secure aggregation hides from it)")  # fmt: skip

    def _check_synthetic(self) -> None:
        """What ``train.synthetic-augmentation`` needs: single-label classification or segmentation,
        in 2D (the generator is class- or mask-conditional, 2D, and halves the image once), and under
        DP-SGD a generator ε that leaves the task's model some of ``privacy.target-epsilon``."""
        train = self.train
        if not train.synthetic_augmentation:
            return
        need = ("run.task = 'classification' (data.multi-label = false) or 'segmentation', with "
                "data.spatial-dims = 2 (a class- or mask-conditioned 2D generator; not detection, "
                "instance segmentation or 3D)")  # fmt: skip
        supported = (self.run.task == "classification" and not self.data.multi_label) or self.run.task == "segmentation"
        require(supported and self.data.spatial_dims == 2,
                "train.synthetic-augmentation", train.synthetic_augmentation, f"0 (off) unless {need}")  # fmt: skip
        require(self.data.patch_size % 2 == 0, "data.patch-size", self.data.patch_size,
                "an even number with train.synthetic-augmentation (the generator halves the patch)")  # fmt: skip
        require(self.data.image_size % 2 == 0, "data.image-size", self.data.image_size,
                "an even number with train.synthetic-augmentation (the generator halves the image)")  # fmt: skip
        require(
            not self.privacy.sample_level or train.synthetic_epsilon < self.privacy.target_epsilon,
            "train.synthetic-epsilon",
            train.synthetic_epsilon,
            f"less than privacy.target-epsilon = {self.privacy.target_epsilon:g} (the generator and the "
            "task's model share it), or 0 for half of it",
        )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict with dashed keys, as in the TOML file (recipe keys as "auto", the task's
        default network as "")."""
        raw = self._resolved_dict()
        for key in self.train.recipe:
            raw["train"][key] = "auto"
        if self.model.name == MODEL_NAMES[self.run.task][0]:
            raw["model"]["name"] = ""  # the task's default, whichever task an override picks
        return raw

    def to_public_dict(self) -> dict[str, dict[str, Any]]:
        """For reports and checkpoints: every value as used (recipe keys resolved), and ``data.path``
        keeps only its last component."""
        public = self._resolved_dict()
        public["data"]["path"] = Path(self.data.path).name
        return public

    def _resolved_dict(self) -> dict[str, dict[str, Any]]:
        raw = {
            section.name: {k.replace("_", "-"): v for k, v in dataclasses.asdict(getattr(self, section.name)).items()}
            for section in dataclasses.fields(self)
        }
        del raw["train"]["recipe"]
        raw["data"]["site"] = {
            site.pop("name"): {k.replace("_", "-"): v for k, v in site.items()} for site in raw["data"]["site"]
        }
        return raw

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Config:
        """Build and validate a config from a nested dict (TOML layout); anything else, or any
        invalid key or value, raises :class:`ConfigError`."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a table of sections such as [run], got {_shown(raw)}")
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted((_shown_key(k) for k in raw if k not in sections), key=str)
        if unknown:
            raise ConfigError(f"{source}: unknown section [{unknown[0]}]; expected one of {sorted(sections)}")
        built = {}
        for name in sections:
            section_cls = _type_hints(cls)[name]
            values = raw.get(name, {})
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{name}] must be a table of keys, got {_shown(values)}", name)
            if "recipe" in values and name == "train":
                raise ConfigError(f"{source}: train.recipe is not a setting; leave a key out for its recipe value")
            if name == "data" and isinstance(values.get("site"), dict) and "sites" not in values:
                values = {**values, "sites": len(values["site"])}  # one site per [data.site.NAME] table
            recipe = _recipe_keys(values) if name == "train" else ()
            built[name] = _build_section(section_cls, name, {**values, **_recipe(raw, recipe)}, source)
            if recipe:
                built[name] = dataclasses.replace(built[name], recipe=recipe)
        return cls(**built)

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> Config:
        """Build from :meth:`to_json` text (e.g. a message from the server): invalid JSON, nesting
        too deep for the parser, or an invalid config all raise :class:`ConfigError`."""
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            raise ConfigError(f"{source}: not a JSON config ({type(err).__name__})") from None
        return cls.from_dict(raw, source)

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """Return a copy with ``{"section.key": value}`` overrides applied and validated."""
        raw = self.to_dict()
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".") if isinstance(dotted, str) else ("", "", "")
            if not key:
                raise ConfigError(f"override {_shown(dotted)}: expected 'section.key', e.g. 'run.rounds'")
            raw.setdefault(section, {})[key] = value
        tables = overrides.get("data.site")
        if isinstance(tables, dict) and "data.sites" not in overrides:
            raw["data"]["sites"] = len(tables)  # one site per [data.site.NAME] table, as in a file
        return Config.from_dict(raw, source="override")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Load a TOML run config (UTF-8, a byte-order mark allowed), apply overrides, validate everything."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise ConfigError(f"config file {what}: {path}")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes is too large for a config (at most {MAX_CONFIG_BYTES})")
        raw = tomllib.loads(path.read_bytes().decode("utf-8-sig"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}): expected a TOML file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    config = Config.from_dict(raw, source=str(path))
    return config.with_overrides(overrides) if overrides else config


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value`` where value is TOML (bare words are taken as strings)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {_shown(text)}: expected 'section.key=value', e.g. run.rounds=5")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    except RecursionError:
        raise ConfigError(f"--set {_shown(text)}: the value is nested too deeply") from None
    return key.strip(), parsed


def _recipe_keys(train: dict[str, Any]) -> tuple[str, ...]:
    """The ``[train]`` keys a config leaves to the recipe: left out, or "auto"."""
    return tuple(key for key in RECIPE_KEYS if train.get(key, "auto") == "auto")


def _recipe(raw: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The recipe's values of ``keys`` for the raw config's task and mode (DP-SGD at the sites or not;
    an invalid task or privacy setting is left for its own section to refuse)."""
    run, privacy = raw.get("run", {}), raw.get("privacy", {})
    task = run.get("task", "classification") if isinstance(run, dict) else None
    task = task if isinstance(task, str) else None
    private = (
        privacy.get("enabled", True) is not False and privacy.get("level") != "site"  # sites run DP-SGD
        if isinstance(privacy, dict)
        else True
    )
    recipe = RECIPES.get((task, private), RECIPES[("classification", private)])  # type: ignore[arg-type]
    data = raw.get("data", {})
    if isinstance(data, dict) and data.get("multi-label") is True:  # class frequencies mean nothing there
        recipe = {**recipe, "logit-adjust": False}
    return {key: recipe[key] for key in keys}


# Evaluating a config class's type hints (postponed annotations) took most of a load: once per class.
_cached_type_hints = functools.cache(typing.get_type_hints)


def _type_hints(cls: type) -> dict[str, Any]:
    """The type hints of a config class (typed on ``type``: mypy takes a dataclass's class for unhashable)."""
    return _cached_type_hints(cls)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlong, _REPR.maxlevel = 40, 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def _shown(value: Any) -> str:
    """``repr(value)`` shortened for a message: a 5 MB string or a deeply nested list fits in a line."""
    return _REPR.repr(value)


def _shown_key(key: Any) -> str:
    """A key as written when it is short, printable text, else shortened like a value."""
    return key if isinstance(key, str) and key.isprintable() and len(key) <= 80 else _shown(key)


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise :class:`ConfigError` naming ``key``, its ``value`` and what was ``expected``, unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} = {_shown(value)} is invalid: expected {expected}", key)


def _check_range(
    key: str, value: float, low: float, high: float, kind: str = "a number", low_open: bool = False, note: str = ""
) -> None:
    """``value`` in ``[low, high]`` (``(low, high]`` when ``low_open``); NaN and infinities never are."""
    inside = (low < value if low_open else low <= value) and value <= high
    bounds = f"{'(' if low_open else '['}{_bound(low)}, {_bound(high)}]"
    require(inside, key, value, f"{kind} in {bounds}{note}")


def _bound(limit: float) -> str:
    return str(limit) if isinstance(limit, int) else f"{limit:g}"


def _check_pattern(key: str, pattern: str) -> None:
    """A regular-expression setting ("" is none) that compiles."""
    if pattern:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"{key} = {pattern!r} is not a regular expression: {err}", key) from None


_URI_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def _check_tracking_uri(tracking: str, uri: str) -> None:
    """``run.tracking-uri``: a store the run writes to, so a hostile one is refused. MLflow: a
    ``sqlite:///PATH`` file or an ``http(s)://HOST`` server without credentials (the config is copied
    into the report: MLflow reads MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN from the environment);
    TensorBoard: a folder, as a path or a ``file:`` URI."""
    key = "run.tracking-uri"
    _check_text(key, uri, MAX_PATH)
    if not uri:
        return
    require(tracking != "none", key, uri, "no value with run.tracking = 'none' (set run.tracking too)")
    require(uri.strip() == uri, key, uri, "a URI without leading or trailing spaces")
    scheme_match = _URI_SCHEME.match(uri)
    scheme = scheme_match.group(1).lower() if scheme_match else ""
    if tracking == "tensorboard":
        require(
            scheme in ("", "file"), key, uri, "a log folder for run.tracking = 'tensorboard': a path or file:///PATH"
        )
        require(scheme == "" or uri.startswith("file:///"), key, uri, "file:///PATH (an absolute path)")
        return
    expected = (
        "an MLflow store for run.tracking = 'mlflow': sqlite:///PATH/mlflow.db, http://HOST[:PORT] or "
        "https://HOST[:PORT][/PATH] (MLflow 3 no longer writes a folder store: use sqlite)"
    )
    require(scheme in ("sqlite", "http", "https"), key, uri, expected)
    if scheme == "sqlite":
        require(uri.startswith("sqlite:///") and len(uri) > len("sqlite:///") and "?" not in uri, key, uri,
                "sqlite:///PATH/mlflow.db (a database file; three slashes, then the path)")  # fmt: skip
        return
    parsed = urllib.parse.urlsplit(uri)
    try:
        port_ok = parsed.port is None or parsed.port > 0
    except ValueError:
        port_ok = False
    require(bool(parsed.hostname) and port_ok, key, uri, "http(s)://HOST[:PORT][/PATH], a server's address")
    require(parsed.username is None and parsed.password is None, key, "(hidden: it holds credentials)",
            "an address without user name or password: the config is copied into the report; set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")  # fmt: skip
    require(not parsed.query and not parsed.fragment, key, uri, "an address without '?query' or '#fragment'")


def _check_text(key: str, text: str, limit: int = MAX_TEXT) -> None:
    """A text setting: at most ``limit`` characters and no control characters (they would corrupt
    logs and terminals; megabytes of text made the console hang)."""
    require(len(text) <= limit, key, text, f"text of at most {limit} characters (got {len(text)})")
    require(
        not any(unicodedata.category(c) == "Cc" for c in text),
        key,
        text,
        "text without control characters (newlines, tabs, escape codes)",
    )


def _build_section(section_cls: type, name: str, values: dict[str, Any], source: str) -> Any:
    hints = _type_hints(section_cls)
    known = {f.name for f in dataclasses.fields(section_cls)}
    kwargs = {}
    for raw_key, value in values.items():
        attr = raw_key.replace("-", "_") if isinstance(raw_key, str) else ""
        if attr not in known:
            expected = ", ".join(sorted(k.replace("_", "-") for k in known))
            raise ConfigError(
                f"{source}: unknown key '{name}.{_shown_key(raw_key)}'; [{name}] accepts: {expected}", name
            )
        kwargs[attr] = _coerce(hints[attr], value, f"{name}.{raw_key}", source)
    return section_cls(**kwargs)


def _is_axis_codes(codes: str) -> bool:
    """Three axis codes naming each of the L/R, A/P and I/S directions once (e.g. "RAS", "LPS")."""
    codes = codes.upper()
    return len(codes) == 3 and all(sum(c in pair for c in codes) == 1 for pair in ("LR", "AP", "IS"))


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    def invalid(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key} = {_shown(value)} is invalid: expected {expected}", key)

    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if not isinstance(value, str) or value not in choices:
            raise invalid(f"one of {list(choices)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise invalid("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid("a number")
        number = finite_number(value)
        if number is None:
            raise invalid("a finite number")
        return number
    if hint == tuple[float, float]:
        numbers = [finite_number(v) for v in value] if isinstance(value, (list, tuple)) and len(value) == 2 else [None]
        if any(v is None for v in numbers):
            raise invalid("two finite numbers [low, high]")
        return tuple(numbers)
    if hint == tuple[float, ...]:
        numbers = [finite_number(v) for v in value] if isinstance(value, (list, tuple)) and len(value) <= 3 else [None]
        if any(v is None for v in numbers):
            raise invalid("a list of at most 3 finite numbers")
        return tuple(numbers)
    if hint == tuple[str, ...]:
        if (
            not isinstance(value, (list, tuple))
            or len(value) > MAX_CLASSES
            or not all(isinstance(v, str) for v in value)
        ):
            raise invalid(f"a list of at most {MAX_CLASSES} strings")
        return tuple(value)
    if hint is str:
        if not isinstance(value, str):
            raise invalid("a string")
        return value
    if hint == tuple[SiteSource, ...]:
        if not isinstance(value, dict) or len(value) > MAX_SITES:
            raise invalid(f"[data.site.NAME] tables, at most {MAX_SITES}")
        sources = []
        for name, table in value.items():
            if not isinstance(table, dict) or "name" in table:
                raise invalid(f"a table [data.site.{_shown_key(name)}] of keys (its name is the site's name)")
            sources.append(_build_section(SiteSource, f"data.site.{_shown_key(name)}", {**table, "name": name}, source))
        return tuple(sorted(sources, key=lambda site: site.name))  # name order, as folders of site folders are
    raise TypeError(f"unsupported config type for {key}: {hint}")  # pragma: no cover


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is not a number (a bool is not) or not finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        return None
    return number if math.isfinite(number) else None


def node_state_dir(node_config: dict[str, Any]) -> Path:
    """A deployed site's state folder: its ``state-dir``, else ``STATE_FOLDER`` inside its data folder."""
    return Path(str(node_config.get("state-dir", Path(str(node_config["data-path"])) / STATE_FOLDER)))
