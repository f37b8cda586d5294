"""Tabular site folders: a features manifest, read and made model-ready at the site.

A features manifest is ``manifest.csv`` with one row per patient: ``label`` (a class index),
``split`` (train/val/test), optional ``patient_id``, and one column per feature (the config's
``data.features`` names those the model takes, in order; other columns are ignored). A cell that
is empty, ``?`` or ``NA`` is a missing value; any other cell must be a finite number.

What is fitted where: each site fits its own median imputer and standardiser
(:func:`fit_preprocessor`, scikit-learn's ``SimpleImputer`` + ``StandardScaler``) on its own
**train** rows only, and applies them to all its rows; the val and test rows never shape them,
and nothing of them leaves the site (the federated model sees features already on the site's
own scale). A feature missing from every train row of a site is imputed as 0 before
standardising, i.e. left at the site's mean. Each feature also gets a 0/1 missing indicator
(the model sees ``2F`` values per row): on the four heart hospitals a plain FedAvg script gained
about 4 points of test accuracy from them (``benchmarks/heart.py``).

Rows become ``(N, 1, 1, 2F)`` float32 "images" (one channel, a 1 x F grid), so that the loaders,
the privacy accounting (identical rows are one privacy unit) and the train loop take them as
they take images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.impute import MissingIndicator, SimpleImputer
from sklearn.pipeline import FeatureUnion, make_pipeline, make_union
from sklearn.preprocessing import StandardScaler

from medfed.config import DataConfig
from medfed.data.arrays import SPLITS, SiteArrays
from medfed.data.vocabulary import MANIFEST, DataError, DataProblem

__all__ = [
    "MISSING",
    "SYNTHETIC_FEATURES",
    "feature_rows",
    "fit_preprocessor",
    "missing_rates",
    "model_features",
    "model_width",
    "parse_feature",
    "read_feature_site",
    "stratified_splits",
    "synthetic_tabular_site",
]

MISSING = ("", "?", "NA")  # cells that mean "not measured"
SYNTHETIC_FEATURES = tuple(f"x{i}" for i in range(1, 9))  # the columns of synthetic tabular sites


def model_features(data: DataConfig) -> tuple[str, ...]:
    """The feature columns a tabular model takes: ``data.features``, or those of synthetic sites."""
    return data.features or (SYNTHETIC_FEATURES if data.source == "synthetic" else ())


def stratified_splits(labels: np.ndarray, seed: int, fractions: tuple[float, float] = (0.2, 0.2)) -> np.ndarray:
    """Seeded train/val/test names per row, stratified by label: of each class, ``fractions`` (val,
    test) of its rows, rounded, at least one each when the class has 3 rows or more."""
    rng = np.random.default_rng(seed)
    splits = np.full(len(labels), "train", dtype="<U5")
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        n = len(rows)
        n_val = max(1, round(fractions[0] * n)) if n >= 3 else 0
        n_test = max(1, round(fractions[1] * n)) if n >= 3 else 0
        splits[rows[:n_val]] = "val"
        splits[rows[n_val : n_val + n_test]] = "test"
    return splits


def parse_feature(text: str) -> float | None:
    """A feature cell as a number, NaN when missing (:data:`MISSING`), None when it is neither."""
    cell = text.strip()
    if cell in MISSING:
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def fit_preprocessor(train: np.ndarray) -> FeatureUnion:
    """Median imputer + standardiser fitted on a site's train rows ``(n, F)`` (NaN = missing), beside
    a missing-value indicator for every feature: ``(n, 2F)`` model rows (:func:`model_width`).
    Whether a value was measured carries information of its own (a test not ordered, a hospital
    that never records it); imputation alone would erase it."""
    scaled = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler())
    return make_union(scaled, MissingIndicator(features="all")).fit(train)


def model_width(data: DataConfig) -> int:
    """The length of a model row: each feature's standardised value and its missing indicator."""
    return 2 * len(model_features(data))


def missing_rates(values: np.ndarray) -> np.ndarray:
    """The fraction of missing cells of each feature column."""
    return np.isnan(values).mean(axis=0) if len(values) else np.zeros(values.shape[1])


def feature_rows(
    rows: Sequence[dict[str, str]], features: Sequence[str], first_line: int = 2, where: str = MANIFEST
) -> tuple[np.ndarray, list[DataProblem]]:
    """The ``features`` cells of ``rows`` as ``(N, F)`` floats (NaN: missing), and a problem naming the
    line and column of every cell that is not a number."""
    values = np.full((len(rows), len(features)), np.nan)
    problems = []
    for i, row in enumerate(rows):
        for j, name in enumerate(features):
            value = parse_feature(row.get(name) or "")
            if value is None:
                cell = (row.get(name) or "")[:40]
                problems.append(
                    DataProblem(
                        f"{where} line {i + first_line}",
                        f"feature {name} = {cell!r} is not a number: expected a finite number, or empty / ? when missing",
                    )
                )
            else:
                values[i, j] = value
    return values, problems


def read_feature_site(
    site_dir: Path,
    columns: Sequence[str],
    rows: list[dict[str, str]],
    features: Sequence[str],
    num_classes: int,
    found: Sequence[DataProblem] = (),
) -> SiteArrays:
    """A site folder's features manifest (rows already read) as model-ready arrays; :class:`DataError`
    listing every bad row, after the problems ``found`` already. See the module docstring for what
    is fitted on which rows."""
    missing = [c for c in ("label", "split", *features) if c not in columns]
    if missing:
        raise DataError(site_dir, [DataProblem(MANIFEST, f"missing column(s) {missing}; found {list(columns)}")])
    values, problems = feature_rows(rows, features)
    problems = [*found, *problems]
    labels = np.zeros(len(rows), dtype=np.int64)
    for line, row in enumerate(rows, start=2):
        where = f"{MANIFEST} line {line}"
        if row["split"] not in SPLITS:
            problems.append(DataProblem(where, f"split {row['split']!r} is not one of {list(SPLITS)}"))
        try:
            labels[line - 2] = int(row["label"])
            if not 0 <= labels[line - 2] < num_classes:
                raise ValueError
        except ValueError:
            problems.append(
                DataProblem(where, f"label {row['label']!r} is not a class index in [0, {num_classes - 1}]")
            )
    splits = np.asarray([row["split"] for row in rows], dtype=str)
    train = splits == "train"
    if not problems and not train.any():
        problems.append(DataProblem("train", "no training samples: the site needs manifest rows with split train"))
    if problems:
        raise DataError(site_dir, problems)
    model_ready = fit_preprocessor(values[train]).transform(values).astype(np.float32)
    return SiteArrays(
        model_ready.reshape(len(rows), 1, 1, -1),
        labels,
        splits,
        np.asarray([row.get("patient_id") or "" for row in rows], dtype=str),
        card=_card(values, train, features),
    )


def _card(values: np.ndarray, train: np.ndarray, features: Sequence[str]) -> tuple[str, ...]:
    """Data-card lines: the feature count and the missing values (aggregate only)."""
    rates = missing_rates(values)
    most = sorted(zip(rates, features, strict=True), key=lambda pair: -pair[0])
    worst = ", ".join(f"{name} {rate:.1%}" for rate, name in most[:6] if rate > 0) or "none"
    empty = [name for name, rate in zip(features, missing_rates(values[train]), strict=True) if rate == 1.0]
    return (
        f"features: {len(features)} ({', '.join(features)})",
        f"missing values: {np.isnan(values).mean():.1%} of cells; most missing: {worst}",
        "imputed with the train split's medians and standardised with its mean and SD, fitted at this site "
        "only; a missing indicator beside each feature"
        + (f"; missing in every train row (left at 0): {', '.join(empty)}" if empty else ""),
    )


def synthetic_tabular_site(index: int, samples: int, num_classes: int, seed: int) -> SiteArrays:
    """Synthetic hospital ``index``: :data:`SYNTHETIC_FEATURES` from a linear-Gaussian model whose class
    means are shared, with a site shift of the features, a site-specific class balance and
    (sites > 0) a site-specific share of missing values, imputed and standardised at the site as
    real rows are (:func:`fit_preprocessor` on its train split)."""
    rng = np.random.default_rng([seed, index])
    shared = np.random.default_rng(seed).normal(0.0, 1.0, (num_classes, len(SYNTHETIC_FEATURES)))
    prior = rng.dirichlet(np.full(num_classes, 4.0))
    labels = rng.choice(num_classes, size=samples, p=prior)
    labels[:num_classes] = np.arange(num_classes)  # every class occurs
    values = shared[labels] + rng.normal(0.0, 1.0, (samples, len(SYNTHETIC_FEATURES))) + rng.normal(0, 0.5)
    values[rng.random(values.shape) < 0.05 * index] = np.nan
    splits = stratified_splits(labels, seed + index)
    train = splits == "train"
    model_ready = fit_preprocessor(values[train]).transform(values).astype(np.float32)
    return SiteArrays(
        model_ready.reshape(samples, 1, 1, -1),
        labels.astype(np.int64),
        splits,
        card=_card(values, train, SYNTHETIC_FEATURES),
    )
