"""Seeded synthetic hospitals: the same disease, seen through different scanners.

Each site draws its own acquisition shift (intensity scale/offset, gamma, noise, blur, lower
resolution) and class prevalence, so a model trained at one site degrades at another, which is
the problem federation addresses. Classes are lesion shapes on a smooth anatomical background:
class 0 has no lesion, class 1 a bright blob, class 2 a ring, class 3 a bar, and so on. Detection
sites hold several such objects per image, with their bounding boxes; multi-label sites hold the
same objects, each finding present or not independently, labelled by which are present. Vessel sites hold
fundus-like images: a field of view with an optic disc and a branching tree of dark vessels whose
masks are the segmentation target (public pre-training for retinal vessel segmentation). Nuclei
sites hold microscopy-like fields crowded with small textured blobs; organ sites hold a body with a
few large smooth organ-like shapes of distinct intensities (2D or 3D). Nodule sites hold chest CT
volumes in Hounsfield units (body, two lungs, vessels) with lung nodules of 3-30 mm (2 voxels at least) and their 3D
boxes, each scanner with its own voxel size, dose (noise), reconstruction kernel and calibration.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import ndimage

from medfed.data.arrays import SiteArrays
from medfed.data.vocabulary import CT_WINDOW

__all__ = [
    "ScannerShift",
    "drop_classes",
    "site_shift",
    "synthetic_detection_site",
    "synthetic_multilabel_site",
    "synthetic_instance_site",
    "synthetic_nodule_site",
    "synthetic_nuclei_site",
    "synthetic_organ_site",
    "synthetic_segmentation_site",
    "synthetic_site",
    "synthetic_vessel_site",
    "with_channels",
]

MAX_OBJECTS = 5
NODULE_MM = (3.0, 30.0)  # nodule diameters, as LUNA16 counts them
MIN_NODULE_VOXELS = 2.0  # and at least this many voxels across (along the coarsest axis)
NODULE_HU = (30.0, -450.0, 450.0)  # solid, ground-glass, calcified: class c is c % 3
NUCLEUS_SEMI_AXES = {2: (0.02, 0.05), 3: (0.05, 0.1)}  # fractions of the image size


@dataclass(frozen=True)
class ScannerShift:
    """How one site's scanner distorts the image, and how common each class is there."""

    scale: float
    offset: float
    gamma: float
    noise: float
    blur: float
    downsample: int
    prevalence: tuple[float, ...]
    pixel_mm: float
    slice_mm: float

    def spacing(self, ndim: int) -> tuple[float, ...]:
        """Voxel size in mm along the array axes: (pixel, pixel) or (slice, pixel, pixel)."""
        return ((self.slice_mm,) if ndim == 3 else ()) + (self.pixel_mm, self.pixel_mm)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def site_shift(site_index: int, num_classes: int, seed: int) -> ScannerShift:
    """The acquisition shift of synthetic site ``site_index`` (deterministic in ``seed``)."""
    rng = np.random.default_rng([seed, site_index, 7])
    if num_classes == 2:
        positive = rng.uniform(0.25, 0.6)
        prevalence = (1 - positive, positive)
    else:
        prevalence = tuple(rng.dirichlet(np.full(num_classes, 3.0)).tolist())
    return ScannerShift(
        scale=float(rng.uniform(0.7, 1.3)),
        offset=float(rng.uniform(-0.12, 0.12)),
        gamma=float(rng.uniform(0.7, 1.4)),
        noise=float(rng.uniform(0.02, 0.10)),
        blur=float(rng.uniform(0.0, 1.0)),
        downsample=int(rng.choice([1, 1, 2])),
        prevalence=tuple(float(p) for p in prevalence),
        pixel_mm=float(rng.uniform(0.5, 1.0)),
        slice_mm=float(rng.uniform(1.0, 3.0)),
    )


def synthetic_site(
    site_index: int,
    num_samples: int,
    image_size: int = 28,
    num_classes: int = 2,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    spatial_dims: int = 2,
) -> SiteArrays:
    """Generate one site's images ``(N, 1, *[S] * spatial_dims)`` in [0, 1], labels and splits."""
    images, _, labels, splits, spacing = _draw_site(
        site_index, num_samples, image_size, num_classes, seed, 11, split_fractions, spatial_dims
    )
    return SiteArrays(images, labels, splits, spacing=spacing)


def synthetic_segmentation_site(
    site_index: int,
    num_samples: int,
    image_size: int = 64,
    num_classes: int = 2,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    spatial_dims: int = 2,
) -> SiteArrays:
    """Generate one site's images and label masks ``(N, 1, *[S] * spatial_dims)`` (0 = background).

    Lesion shapes are those of :func:`synthetic_site` (balls, shells and rods in 3D); mask value
    k marks lesion class k. The site's prevalence decides how often an image holds a lesion, and
    of which class; its scanner decides the voxel size in mm.
    """
    images, lesions, labels, splits, spacing = _draw_site(
        site_index, num_samples, image_size, num_classes, seed, 13, split_fractions, spatial_dims
    )
    masks = np.stack(
        [np.where(lesion > 0.5 * lesion.max(), label, 0) if label else np.zeros_like(lesion)
         for lesion, label in zip(lesions, labels, strict=True)]
    )  # fmt: skip
    return SiteArrays(images, masks[:, None].astype(np.int64), splits, target_key="mask", spacing=spacing)


def synthetic_detection_site(
    site_index: int,
    num_samples: int,
    image_size: int = 64,
    num_classes: int = 2,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> SiteArrays:
    """Generate one site's 2D images ``(N, 1, S, S)`` with 0 to 5 objects each, and their boxes ``(N, M, 5)``.

    Object class c is a small bright disc (c % 3 == 0), a larger ring (1) or an elongated bar (2),
    brighter for every further three classes, 12-26 % of the image across, inside the body and
    not heavily overlapping. About 20 % of images hold no object. Sites differ by scanner, class
    mix (the prevalence of :func:`site_shift`) and mean number of objects per image. A box is the
    tight bounding box ``[x1, y1, x2, y2, class]`` (pixel edges) of the pixels above half the
    object's peak; padding rows are ``[0, 0, 0, 0, -1]``.
    """
    shift = site_shift(site_index, num_classes, seed)
    rng = np.random.default_rng([seed, site_index, 17])
    mean_objects = rng.uniform(1.0, 3.0)
    images, boxes = [], []
    for _ in range(num_samples):
        image, body, grid, _, _ = _background(image_size, rng, 2)
        count = 0 if rng.random() < 0.2 else min(1 + int(rng.poisson(mean_objects - 1)), MAX_OBJECTS)
        classes = rng.choice(num_classes, size=count, p=np.asarray(shift.prevalence))
        rows = []
        for label, intensity in _place_objects(classes, grid, body, rng):
            image = image + intensity
            ys, xs = np.nonzero(intensity > 0.5 * intensity.max())
            rows.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, label])
        images.append(_apply_shift(image, shift, rng))
        boxes.append(rows)
    targets = np.zeros((num_samples, max([1, *map(len, boxes)]), 5), dtype=np.float32)
    targets[:, :, 4] = -1
    for i, rows in enumerate(boxes):
        if rows:
            targets[i, : len(rows)] = rows
    splits = _splits(num_samples, split_fractions, rng)
    spacing = np.tile(np.asarray(shift.spacing(2), dtype=np.float32), (num_samples, 1))
    return SiteArrays(np.stack(images)[:, None], targets, splits, target_key="boxes", spacing=spacing)


def synthetic_nodule_site(
    site_index: int,
    num_samples: int,
    image_size: int = 32,
    num_classes: int = 1,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> SiteArrays:
    """Generate one site's chest CT volumes ``(N, 1, S, S, S)`` (Hounsfield units through the CT
    window, as :func:`medfed.data.decode.model_input` scales CT) with 0 to 3 lung nodules each, and
    their boxes ``(N, M, 7)`` ``[x1, y1, z1, x2, y2, z2, class]`` in voxels (x: the last axis).

    The volume is a chest crop of 96-128 mm in-plane and 80-128 mm along z at this site's voxel
    size (so a 3 mm nodule spans a voxel or less at small ``image_size``): air, a body of soft
    tissue with a spine, two lungs (-850 HU with texture) crossed by vessels (tubes of 1-4 mm, the
    usual false positives), and nodules of :data:`NODULE_MM` diameter and at least
    :data:`MIN_NODULE_VOXELS` voxels across the coarsest axis (log-uniform, as small ones are the
    common ones) inside a lung, of class c: solid, ground-glass or calcified (c % 3,
    :data:`NODULE_HU`). A box is the nodule's sphere's bounding box (a cube in mm). Sites differ by
    voxel size, dose (noise 10-60 HU), kernel (blur), HU calibration (+-30 HU), class mix and mean
    number of nodules per scan; about 20 % of scans hold none.
    """
    rng = np.random.default_rng([seed, site_index, 29])
    prevalence = np.asarray(site_shift(site_index, num_classes, seed).prevalence)
    extent = np.array([rng.uniform(80, 128), *(2 * [rng.uniform(96, 128)])])  # mm along z, y, x
    spacing = extent / image_size
    noise, blur, calibration = rng.uniform(10, 60), rng.uniform(0.4, 1.2), rng.uniform(-30, 30)
    mean_nodules = rng.uniform(1.0, 2.0)
    # two voxels across at least: a nodule of one voxel is one bright voxel among the vessels' cross
    # sections (LUNA16's 3 mm are 4 voxels of its 0.7 mm)
    smallest = max(NODULE_MM[0], MIN_NODULE_VOXELS * float(spacing.max()))
    grid = (np.mgrid[(slice(0, image_size),) * 3] + 0.5) * spacing[:, None, None, None]  # voxel centres in mm
    images, boxes = [], []
    for _ in range(num_samples):
        hu, lungs = _chest(grid, extent, rng)
        depth = ndimage.distance_transform_edt(lungs, sampling=spacing)  # mm to the lung's edge
        count = 0 if rng.random() < 0.2 else min(1 + int(rng.poisson(mean_nodules - 1)), 3)
        rows = []
        for label in rng.choice(num_classes, size=count, p=prevalence):
            diameter = float(np.exp(rng.uniform(np.log(smallest), np.log(NODULE_MM[1]))))
            radius = diameter / 2
            centre = _nodule_centre(depth, grid, radius, extent, rng)
            if centre is None:
                continue
            distance = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
            inside = 1 / (1 + np.exp(np.clip((distance - radius) / 0.4, -50, 50)))  # a soft edge (partial volume)
            hu = hu + inside * (NODULE_HU[int(label) % 3] - hu)
            low, high = (centre - radius) / spacing, (centre + radius) / spacing  # voxel edges along z, y, x
            rows.append([*low[::-1], *high[::-1], int(label)])
        hu = ndimage.gaussian_filter(hu, blur / spacing * spacing.min()) + calibration
        hu = hu + rng.normal(0, noise, hu.shape)
        low_hu, high_hu = CT_WINDOW
        images.append(np.clip((hu - low_hu) / (high_hu - low_hu), 0, 1).astype(np.float32))
        boxes.append(rows)
    targets = np.zeros((num_samples, max([1, *map(len, boxes)]), 7), dtype=np.float32)
    targets[:, :, 6] = -1
    for i, rows in enumerate(boxes):
        if rows:
            targets[i, : len(rows)] = rows
    splits = _splits(num_samples, split_fractions, rng)
    voxel = np.tile(spacing.astype(np.float32), (num_samples, 1))
    return SiteArrays(np.stack(images)[:, None], targets, splits, target_key="boxes", spacing=voxel)


def _chest(grid: np.ndarray, extent: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A chest crop in HU on ``grid`` (mm, z/y/x first): (volume, lung mask)."""
    z, y, x = grid
    _, h, w = extent
    cy, cx = h * rng.uniform(0.47, 0.53), w * rng.uniform(0.47, 0.53)
    body = ((y - cy) / (0.46 * h)) ** 2 + ((x - cx) / (0.49 * w)) ** 2 <= 1
    hu = np.where(body, 40.0, -1000.0)
    spine = ((y - (cy + 0.3 * h)) / (0.1 * h)) ** 2 + ((x - cx) / (0.08 * w)) ** 2 <= 1
    hu = np.where(spine, 700.0, hu)
    lungs = np.zeros(hu.shape, dtype=bool)
    for side in (-1, 1):
        ly, lx = cy - 0.05 * h + rng.normal(0, 0.02 * h), cx + side * 0.22 * w + rng.normal(0, 0.02 * w)
        ry, rx = 0.3 * h * rng.uniform(0.9, 1.1), 0.17 * w * rng.uniform(0.9, 1.1)
        lungs |= ((y - ly) / ry) ** 2 + ((x - lx) / rx) ** 2 <= 1 - 0.3 * ((z - extent[0] / 2) / extent[0]) ** 2
    texture = ndimage.gaussian_filter(rng.normal(0, 1, hu.shape), 1.5)
    hu = np.where(lungs, -850.0 + 250 * texture, hu)
    for _ in range(int(rng.integers(4, 9))):  # vessels: straight tubes through the lungs
        start = grid[:, 0, 0, 0] + rng.uniform(0, 1, 3) * extent
        direction = rng.normal(0, 1, 3)
        direction /= np.linalg.norm(direction)
        offsets = grid - start[:, None, None, None]
        along = np.tensordot(direction, offsets, axes=1)
        across = np.sqrt(np.maximum((offsets**2).sum(0) - along**2, 0))
        hu = np.where(lungs & (across <= rng.uniform(0.5, 2.0)), 40.0, hu)
    return hu, lungs


def _nodule_centre(
    depth: np.ndarray, grid: np.ndarray, radius: float, extent: np.ndarray, rng: np.random.Generator
) -> np.ndarray | None:
    """A nodule centre (mm, z/y/x) at least ``radius / 2`` inside a lung (``depth``: mm to its edge),
    with the whole nodule inside the volume; None if there is none."""
    inside = (depth >= radius / 2) & np.all((grid >= radius) & (grid <= extent[:, None, None, None] - radius), axis=0)
    candidates = np.flatnonzero(inside)
    if not len(candidates):
        return None
    return np.asarray(grid.reshape(3, -1)[:, rng.choice(candidates)], dtype=np.float64)


def synthetic_multilabel_site(
    site_index: int,
    num_samples: int,
    image_size: int = 32,
    num_classes: int = 3,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> SiteArrays:
    """Generate one site's 2D images ``(N, 1, S, S)`` holding any of ``num_classes`` findings, and
    multi-hot targets ``(N, num_classes)``.

    Finding k is the object of class k of :func:`synthetic_detection_site` (a disc, a ring or a
    bar, brighter for every further three); each is present independently, with a prevalence the
    site draws per finding in [0.15, 0.5]. A finding that finds no room in the image is left out
    of the image and of its target.
    """
    shift = site_shift(site_index, num_classes, seed)
    rng = np.random.default_rng([seed, site_index, 23])
    prevalence = rng.uniform(0.15, 0.5, num_classes)
    images, targets = [], np.zeros((num_samples, num_classes), dtype=np.int64)
    for i in range(num_samples):
        image, body, grid, _, _ = _background(image_size, rng, 2)
        for label, intensity in _place_objects(np.flatnonzero(rng.random(num_classes) < prevalence), grid, body, rng):
            image = image + intensity
            targets[i, label] = 1
        images.append(_apply_shift(image, shift, rng))
    splits = _splits(num_samples, split_fractions, rng)
    spacing = np.tile(np.asarray(shift.spacing(2), dtype=np.float32), (num_samples, 1))
    return SiteArrays(np.stack(images)[:, None], targets, splits, spacing=spacing)


def _place_objects(
    classes: np.ndarray, grid: np.ndarray, body: np.ndarray, rng: np.random.Generator
) -> list[tuple[int, np.ndarray]]:
    """Intensity maps of objects of ``classes``, centred in the body, whole in the image, apart.

    An object that finds no free place in 20 tries is left out.
    """
    size = grid.shape[1]
    placed: list[tuple[np.ndarray, float]] = []
    objects = []
    for label in classes.tolist():
        kind = label % 3
        radius = size * rng.uniform(*((0.06, 0.09), (0.07, 0.10), (0.08, 0.12))[kind])  # 12-26 % across
        extent = radius * (1.3 if kind == 1 else 1.0) + 1
        inside = body & (grid.min(axis=0) >= extent) & (grid.max(axis=0) < size - extent)
        candidates = np.argwhere(inside)
        if len(candidates) == 0:
            continue
        for centre in candidates[rng.choice(len(candidates), size=min(20, len(candidates)), replace=False)]:
            if all(np.hypot(*(centre - c)) >= 0.8 * (extent + e) for c, e in placed):
                placed.append((centre, extent))
                objects.append((label, _object(kind, label, grid, centre, radius, rng)))
                break
    return objects


def _object(
    kind: int, label: int, grid: np.ndarray, centre: np.ndarray, radius: float, rng: np.random.Generator
) -> np.ndarray:
    """One object's intensity: a flat disc (kind 0), a ring (1) or a bar along a random direction (2)."""
    offsets = grid - centre.reshape(2, 1, 1)
    d = np.sqrt((offsets**2).sum(axis=0))
    if kind == 0:
        shape = np.clip(radius + 0.5 - d, 0, 1)
    elif kind == 1:
        shape = np.exp(-(((d - radius) / (0.25 * radius)) ** 2))
    else:
        along = np.tensordot(_unit_vector(rng.uniform(0, np.pi), None), offsets, axes=1)
        across_sq = np.maximum(d**2 - along**2, 0.0)
        shape = np.exp(-across_sq / (0.35 * radius) ** 2) * (np.abs(along) < radius)
    contrast = rng.uniform(0.4, 0.6) * (1.3 if kind == 0 else 1.0) * (1 + 0.3 * (label // 3))
    return contrast * shape


def _draw_site(
    site_index: int,
    num_samples: int,
    image_size: int,
    num_classes: int,
    seed: int,
    stream: int,
    split_fractions: tuple[float, float, float],
    spatial_dims: int,
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Images ``(N, 1, *spatial)`` with the site's scanner shift, lesion maps, labels, splits, spacing."""
    shift = site_shift(site_index, num_classes, seed)
    rng = np.random.default_rng([seed, site_index, stream])
    labels = rng.choice(num_classes, size=num_samples, p=np.asarray(shift.prevalence)).astype(np.int64)
    images, lesions = [], []
    for label in labels:
        image, lesion = _phantom(int(label), image_size, rng, spatial_dims)
        images.append(_apply_shift(image, shift, rng))
        lesions.append(lesion)
    splits = _splits(num_samples, split_fractions, rng)
    spacing = np.tile(np.asarray(shift.spacing(spatial_dims), dtype=np.float32), (num_samples, 1))
    return np.stack(images)[:, None].astype(np.float32), lesions, labels, splits, spacing


def synthetic_vessel_site(
    site_index: int,
    num_samples: int,
    image_size: int = 128,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> SiteArrays:
    """Fundus-like 2D images ``(N, 1, S, S)`` and vessel masks (1 = vessel) through the site's scanner.

    A circular field of view with vignetting and texture, a bright optic disc off-centre, and 5-7
    vessel trunks leaving the disc that wander, thin out and branch (children 60-80 % as wide),
    drawn darker than the background. Widths scale with the image (1.3-1.9 % of it for a trunk).
    """
    return _mask_site(site_index, num_samples, seed, 19, lambda rng: _fundus(image_size, rng), split_fractions, 2)


def synthetic_nuclei_site(
    site_index: int,
    num_samples: int,
    image_size: int = 64,
    num_classes: int = 2,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    spatial_dims: int = 2,
) -> SiteArrays:
    """Microscopy-like fields crowded with nuclei, and their masks ``(N, 1, *spatial)``.

    Each image holds 8-40 (2D; 4-16 in 3D) small ellipses or ellipsoids (semi-axes 2-5 % of the
    image in 2D, 5-10 % in 3D, at least 1.5 pixels; randomly oriented, touching allowed) with grainy
    interiors on a textured background; a nucleus of class k (1 to ``num_classes`` - 1) is darker
    the larger k, and its pixels are k in the mask.
    """
    return _mask_site(
        site_index,
        num_samples,
        seed,
        23,
        lambda rng: _nuclei(image_size, num_classes, spatial_dims, rng),
        split_fractions,
        spatial_dims,
    )


def synthetic_instance_site(
    site_index: int,
    num_samples: int,
    image_size: int = 64,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> SiteArrays:
    """Microscopy-like 2D fields of nuclei that touch and overlap, and their instance label images
    ``(N, 1, S, S)``: one integer per nucleus (1, 2, ...), 0 = background.

    Each field holds 6-14 ellipses (semi-axes 5-9 % of the image, randomly oriented); about half
    of them are placed against an earlier one at 0.85-1 times the sum of their radii, so they
    touch or overlap a little, and a later nucleus covers an earlier one where they overlap, in the
    image as in the labels. A nucleus has its own stain level, a darker rim and a grainy interior;
    the site's stain strength and its scanner (:func:`site_shift`) differ from site to site.
    """
    shift = site_shift(site_index, 2, seed)
    rng = np.random.default_rng([seed, site_index, 31])
    stain = rng.uniform(0.8, 1.2)  # how dark this site's staining makes nuclei
    images, masks = [], []
    for _ in range(num_samples):
        image, mask = _touching_nuclei(image_size, stain, rng)
        images.append(_apply_shift(image, shift, rng))
        masks.append(mask)
    splits = _splits(num_samples, split_fractions, rng)
    spacing = np.tile(np.asarray(shift.spacing(2), dtype=np.float32), (num_samples, 1))
    targets = np.stack(masks)[:, None].astype(np.int64)
    return SiteArrays(np.stack(images)[:, None], targets, splits, target_key="instances", spacing=spacing)


def _touching_nuclei(size: int, stain: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One field of touching nuclei and its instance labels (see :func:`synthetic_instance_site`)."""
    grid = np.mgrid[0:size, 0:size].astype(np.float32)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), sigma=size / 16)
    image = 0.8 + 0.06 * texture / (np.abs(texture).max() + 1e-6)
    grain = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), sigma=0.8)
    labels = np.zeros((size, size), dtype=np.int64)
    placed: list[tuple[np.ndarray, float]] = []
    for index in range(1, int(rng.integers(6, 15)) + 1):
        axes = size * rng.uniform(0.05, 0.09, 2)
        radius = float(axes.mean())
        if placed and rng.random() < 0.5:  # against an earlier nucleus: touching or overlapping a little
            centre_of, radius_of = placed[int(rng.integers(len(placed)))]
            angle = rng.uniform(0, 2 * np.pi)
            direction = np.array([np.sin(angle), np.cos(angle)])
            centre = centre_of + rng.uniform(0.85, 1.0) * (radius + radius_of) * direction
        else:
            centre = rng.uniform(radius, size - radius, 2)
        placed.append((centre, radius))
        rotation, _ = np.linalg.qr(rng.normal(0, 1, (2, 2)))
        local = np.tensordot(rotation.T, grid - centre.reshape(2, 1, 1), axes=1)
        radial = np.sqrt((local[0] / axes[0]) ** 2 + (local[1] / axes[1]) ** 2)
        inside = radial <= 1.0
        rim = inside & (radial > 1.0 - 2.0 / radius)  # about 2 pixels wide
        labels[inside] = index
        level = 0.8 - stain * rng.uniform(0.3, 0.5)
        image[inside] = level + 0.05 * grain[inside]
        image[rim] -= 0.15 * stain
    kept = np.unique(labels[labels > 0])  # a nucleus covered entirely by later ones is gone
    relabelled = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    relabelled[kept] = np.arange(1, len(kept) + 1)
    return ndimage.gaussian_filter(image, 0.6), relabelled[labels]


def synthetic_organ_site(
    site_index: int,
    num_samples: int,
    image_size: int = 64,
    num_classes: int = 2,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    spatial_dims: int = 2,
) -> SiteArrays:
    """A body with one organ per class 1 to ``num_classes`` - 1, and its masks ``(N, 1, *spatial)``.

    Organs are large smooth shapes (a sphere whose radius wobbles with a few random harmonics,
    10-25 % of the image across) at random places inside the body, each class with its own
    intensity and texture; a later organ covers an earlier one where they meet, as in the mask.
    """
    return _mask_site(
        site_index,
        num_samples,
        seed,
        29,
        lambda rng: _organs(image_size, num_classes, spatial_dims, rng),
        split_fractions,
        spatial_dims,
    )


def drop_classes(site: SiteArrays, classes: Collection[int], num_classes: int) -> SiteArrays:
    """``site`` as a hospital that does not label ``classes``: classification drops its cases of those
    classes (it files no case under them), segmentation paints those structures as background (it
    outlines the others only); ``labelled`` names the classes that remain."""
    dropped = np.isin(np.arange(num_classes), list(classes))
    if site.target_key == "mask":
        if dropped[0]:
            raise ValueError("class 0 is background: a segmentation site labels it")
        targets = np.where(np.isin(site.targets, np.flatnonzero(dropped)), 0, site.targets)
        site = replace(site, targets=targets)
    elif site.target_key == "label":
        site = site.subset(~np.isin(site.targets, np.flatnonzero(dropped)))
    else:
        raise ValueError(f"classes can be left unlabelled in labels or masks, not {site.target_key}")
    return replace(site, labelled=None if not dropped.any() else ~dropped)


def with_channels(site: SiteArrays, channels: int) -> SiteArrays:
    """A grey synthetic site seen in ``channels`` contrasts, as N scans (T1, T2, ...) of one case.

    Channel 0 is the grey image itself; channel k > 0 is that image through a gamma curve:
    1.5 ** (k / 2) for even k, and 1.5 ** -ceil(k / 2) then inverted for odd k (tissue bright in
    one sequence is dark in the next). Masks, labels and boxes stay as they are.
    """
    if channels == 1:
        return site
    grey = site.images[:, :1]
    stacked = [grey]
    for k in range(1, channels):
        curved = grey ** (1.5 ** (((k + 1) // 2) * (-1) ** k))
        stacked.append(1 - curved if k % 2 else curved)
    return replace(site, images=np.concatenate(stacked, axis=1).astype(np.float32))


def _mask_site(
    site_index: int,
    num_samples: int,
    seed: int,
    stream: int,
    draw: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]],
    split_fractions: tuple[float, float, float],
    spatial_dims: int,
) -> SiteArrays:
    """A segmentation site of ``num_samples`` (image, label mask) pairs from ``draw``, each image seen
    through the site's scanner (:func:`site_shift`); ``stream`` keeps each phantom kind's draws apart."""
    shift = site_shift(site_index, 2, seed)
    rng = np.random.default_rng([seed, site_index, stream])
    images, masks = [], []
    for _ in range(num_samples):
        image, mask = draw(rng)
        images.append(_apply_shift(image, shift, rng))
        masks.append(mask)
    splits = _splits(num_samples, split_fractions, rng)
    spacing = np.tile(np.asarray(shift.spacing(spatial_dims), dtype=np.float32), (num_samples, 1))
    targets = np.stack(masks)[:, None].astype(np.int64)
    return SiteArrays(np.stack(images)[:, None], targets, splits, target_key="mask", spacing=spacing)


def _nuclei(size: int, num_classes: int, ndim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One microscopy-like field of nuclei and its label mask (see :func:`synthetic_nuclei_site`)."""
    grid = np.mgrid[(slice(0, size),) * ndim].astype(np.float32)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, grid.shape[1:]), sigma=size / 16)
    image = 0.75 + 0.08 * texture / (np.abs(texture).max() + 1e-6)
    mask = np.zeros(grid.shape[1:], dtype=np.int64)
    grain = ndimage.gaussian_filter(rng.normal(0, 1, grid.shape[1:]), sigma=0.8)
    count = rng.integers(8, 41) if ndim == 2 else rng.integers(4, 17)
    for _ in range(count):
        label = int(rng.integers(1, num_classes))
        centre = rng.uniform(0, size, ndim)
        axes = np.maximum(size * rng.uniform(*NUCLEUS_SEMI_AXES[ndim], ndim), 1.5)
        rotation, _ = np.linalg.qr(rng.normal(0, 1, (ndim, ndim)))
        local = np.tensordot(rotation.T, grid - centre.reshape((ndim,) + (1,) * ndim), axes=1)
        inside = sum((axis / a) ** 2 for axis, a in zip(local, axes, strict=True)) <= 1.0
        mask[inside] = label
        image[inside] = 0.45 - 0.25 * (label - 1) / max(num_classes - 1, 1) + 0.05 * grain[inside]
    return ndimage.gaussian_filter(image, 0.7), mask


def _organs(size: int, num_classes: int, ndim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One body with an organ per class and its label mask (see :func:`synthetic_organ_site`)."""
    image, body, grid, centre, radii = _background(size, rng, ndim)
    mask = np.zeros(body.shape, dtype=np.int64)
    for label in range(1, num_classes):
        organ_centre = centre + rng.uniform(-0.45, 0.45, ndim) * radii
        offsets = grid - organ_centre.reshape((ndim,) + (1,) * ndim)
        distance = np.sqrt((offsets**2).sum(axis=0))
        angle = np.arctan2(offsets[-2], offsets[-1])
        wobble = sum(rng.uniform(0, 0.15) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
        inside = body & (distance <= size * rng.uniform(0.05, 0.125) * (1 + wobble))
        texture = ndimage.gaussian_filter(rng.normal(0, 1, body.shape), sigma=1.5)
        level = 0.15 + 0.7 * label / num_classes + rng.normal(0, 0.03)
        mask[inside] = label
        image = np.where(inside, level + 0.04 * texture, image)
    return ndimage.gaussian_filter(image, 0.8), mask


def _fundus(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = size / 2 + rng.normal(0, size * 0.02, 2)
    radius = size * rng.uniform(0.44, 0.49)
    r = np.hypot(yy - centre[0], xx - centre[1]) / radius
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), sigma=size / 12)
    texture = (texture - texture.min()) / (np.ptp(texture) + 1e-6)
    field = r <= 1.0
    image = field * (rng.uniform(0.25, 0.5) * (1 - 0.35 * r**2) + 0.12 * texture) + 0.02
    side = rng.choice([-1.0, 1.0])
    disc = centre + np.array([rng.normal(0, 0.04), side * rng.uniform(0.18, 0.28)]) * size
    image += 0.3 * np.exp(-((np.hypot(yy - disc[0], xx - disc[1]) / (0.05 * size)) ** 2))
    vessels = np.zeros((size, size), dtype=bool)
    width = size * rng.uniform(0.013, 0.019)
    todo = [(disc, angle, width) for angle in np.linspace(0, 2 * np.pi, rng.integers(5, 8), endpoint=False)
            + rng.normal(0, 0.3)]  # fmt: skip
    painted = 0
    while todo and painted < 100 * size:
        point, heading, w = todo.pop()
        curl = rng.normal(0, 0.01)
        while w > max(size / 500, 0.5) and painted < 100 * size:
            step = max(w / 2, 0.5)  # discs overlap: thin vessels stay connected
            heading += curl * step / 2 + rng.normal(0, 0.06 * np.sqrt(step / 2))
            point = point + step * np.array([np.sin(heading), np.cos(heading)])
            if np.hypot(*(point - centre)) > radius:
                break
            _paint_disc(vessels, point, w / 2)
            painted += 1
            w *= 0.997 ** (step / 2)
            if rng.random() < 0.012 * step / 2:
                todo.append((point, heading + rng.choice([-1, 1]) * rng.uniform(0.4, 1.0), w * rng.uniform(0.6, 0.8)))
    contrast = rng.uniform(0.15, 0.3)
    image = image - contrast * ndimage.gaussian_filter(vessels.astype(np.float32), 0.6) * field
    return np.clip(image, 0, 1).astype(np.float32), vessels & field


def _paint_disc(canvas: np.ndarray, centre: np.ndarray, radius: float) -> None:
    """Set the pixels within ``radius`` of ``centre`` (y, x) on a 2D boolean canvas."""
    reach = int(np.ceil(radius)) + 1
    y0, x0 = (int(v) for v in np.floor(centre))
    ys = slice(max(y0 - reach, 0), min(y0 + reach + 1, canvas.shape[0]))
    xs = slice(max(x0 - reach, 0), min(x0 + reach + 1, canvas.shape[1]))
    if ys.start >= ys.stop or xs.start >= xs.stop:  # wholly off the canvas
        return
    yy, xx = np.mgrid[ys, xs]
    canvas[ys, xs] |= (yy + 0.5 - centre[0]) ** 2 + (xx + 0.5 - centre[1]) ** 2 <= max(radius, 0.5) ** 2


def _splits(n: int, fractions: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    order = rng.permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    splits = np.empty(n, dtype=object)
    splits[order[:n_train]] = "train"
    splits[order[n_train : n_train + n_val]] = "val"
    splits[order[n_train + n_val :]] = "test"
    return splits.astype(str)


def _phantom(label: int, size: int, rng: np.random.Generator, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth anatomical background with a lesion of class ``label``; returns (image, lesion map)."""
    image, body, grid, centre, radii = _background(size, rng, ndim)
    lesion = _lesion(label, grid, centre, radii, rng) * body if label > 0 else np.zeros_like(image)
    return (image + lesion).astype(np.float32), lesion.astype(np.float32)


def _background(
    size: int, rng: np.random.Generator, ndim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A smooth anatomical background: (image, body mask, coordinate grid, body centre, body radii)."""
    grid = np.mgrid[(slice(0, size),) * ndim].astype(np.float32)
    centre = size / 2 + rng.normal(0, size * 0.03, ndim)
    radii = size * rng.uniform(0.33, 0.45, ndim)
    body = sum(((axis - c) / r) ** 2 for axis, c, r in zip(grid, centre, radii, strict=True)) <= 1.0
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (size,) * ndim), sigma=size / 10)
    texture = (texture - texture.min()) / (np.ptp(texture) + 1e-6)
    return 0.08 + body * (0.30 + 0.15 * texture), body, grid, centre, radii


def _lesion(
    label: int, grid: np.ndarray, centre: np.ndarray, radii: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Lesion intensity map: class 1 a blob (ball), 2 a ring (shell), 3 a bar (rod), then repeating, brighter."""
    ndim, size = len(grid), grid.shape[1]
    angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.5)
    direction = _unit_vector(angle, rng.uniform(-np.pi / 2, np.pi / 2) if ndim == 3 else None)
    lesion_centre = centre + dist * radii * direction
    r = size * rng.uniform(0.08, 0.13) * (1.6 if ndim == 3 else 1.0)  # a few % of a volume, as of an image
    offsets = grid - lesion_centre.reshape((ndim,) + (1,) * ndim)
    d = np.sqrt((offsets**2).sum(axis=0))
    contrast = rng.uniform(0.25, 0.5)
    kind = (label - 1) % 3
    if kind == 0:
        mask = np.exp(-((d / r) ** 2) * 1.5)
    elif kind == 1:
        mask = np.exp(-(((d - r) / (0.35 * r)) ** 2))
    else:  # a bar (2D) or rod (3D) along a random axis
        axis = _unit_vector(rng.uniform(0, np.pi), rng.uniform(-np.pi / 2, np.pi / 2) if ndim == 3 else None)
        along = np.tensordot(axis, offsets, axes=1)
        across_sq = np.maximum(d**2 - along**2, 0.0)
        mask = np.exp(-across_sq / (0.3 * r) ** 2) * (np.abs(along) < 1.6 * r)
    return contrast * (1 + 0.3 * (label - 1) // 3) * mask


def _unit_vector(azimuth: float, elevation: float | None) -> np.ndarray:
    """A unit vector in array-axis order: (y, x) in 2D, (z, y, x) in 3D."""
    if elevation is None:
        return np.array([np.sin(azimuth), np.cos(azimuth)])
    return np.array([np.sin(elevation), np.cos(elevation) * np.sin(azimuth), np.cos(elevation) * np.cos(azimuth)])


def _apply_shift(image: np.ndarray, shift: ScannerShift, rng: np.random.Generator) -> np.ndarray:
    if shift.downsample > 1:
        low = ndimage.zoom(image, 1 / shift.downsample, order=1)
        image = ndimage.zoom(low, np.array(image.shape) / np.array(low.shape), order=1)
    if shift.blur > 0:
        image = ndimage.gaussian_filter(image, shift.blur)
    image = np.clip(image, 0, 1) ** shift.gamma
    image = shift.scale * image + shift.offset + rng.normal(0, shift.noise, image.shape)
    return np.clip(image, 0, 1).astype(np.float32)
