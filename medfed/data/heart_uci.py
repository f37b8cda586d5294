"""``medfed data import --from heart-uci``: the UCI Heart Disease files of four hospitals (Janosi et
al. 1989; the data of FLamby's Fed-Heart-Disease), one tabular site folder per hospital.

The source folder holds the "processed" 14-column files (``processed.cleveland.data``,
``processed.hungarian.data``, ``processed.switzerland.data``, ``processed.va.data``; any subset),
with or without a header row: 13 features then ``num`` (0 = no disease, 1-4 = disease). A missing
value is ``?`` or an empty cell; ``chol`` = 0 and ``trestbps`` = 0 are not measured either (all of
Switzerland's cholesterol values are 0) and are written as missing. Each hospital becomes a
features manifest (:mod:`medfed.data.tabular`) with the binary target ``label`` = (num > 0), as
FLamby does, and a seeded train/val/test split stratified by label (a repeated row follows its
first copy into one split). Nothing is imputed here: each
site imputes and standardises with its own train split when it reads its folder.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from medfed.data.import_guard import real_folder, resolve_inside
from medfed.data.tabular import feature_rows, parse_feature, stratified_splits
from medfed.data.vocabulary import MANIFEST, DataError, DataProblem

__all__ = ["COLUMNS", "FEATURES", "HOSPITALS", "heart_sites", "import_heart_uci"]

FEATURES = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak", "slope", "ca",
            "thal")  # fmt: skip
COLUMNS = (*FEATURES, "num")
HOSPITALS = {  # file -> site folder
    "processed.cleveland.data": "cleveland",
    "processed.hungarian.data": "hungary",
    "processed.switzerland.data": "switzerland",
    "processed.va.data": "va-long-beach",
}
ZERO_MEANS_MISSING = ("trestbps", "chol")  # a blood pressure or cholesterol of 0 was not measured
MAX_FILE_BYTES = 2_000_000  # the four files hold 43 KB together


def import_heart_uci(src: Path, out: Path, seed: int = 0, fractions: tuple[float, float] = (0.2, 0.2)) -> list[str]:
    """Write ``out/<hospital>/manifest.csv`` for every hospital file in ``src`` (:func:`heart_sites`);
    return notes for the operator (patients and missing values per site)."""
    sites, notes = heart_sites(src, seed, fractions)
    for site, rows in sites.items():
        (out / site).mkdir(parents=True)
        with (out / site / MANIFEST).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, ["label", "split", *FEATURES])
            writer.writeheader()
            writer.writerows(rows)
    return notes


def heart_sites(
    src: str | Path, seed: int = 0, fractions: tuple[float, float] = (0.2, 0.2)
) -> tuple[dict[str, list[dict[str, str]]], list[str]]:
    """The features-manifest rows (``label``, ``split``, the features; missing values empty) of every
    hospital file in ``src``, by site name in :data:`HOSPITALS` order, each site split with seed
    ``seed`` + its place in that order; and notes (patients and missing values per site).
    :class:`DataError` naming the file and line of every bad row; FileNotFoundError when ``src``
    holds none of the files."""
    root = real_folder(src, "--from heart-uci")
    found = {index: name for index, name in enumerate(HOSPITALS) if (root / name).exists()}
    if not found:
        raise FileNotFoundError(f"{src} holds none of the UCI heart files {list(HOSPITALS)}")
    tables = {}
    problems: list[DataProblem] = []
    for name in found.values():
        rows, file_problems = _read_file(resolve_inside(root, name), name)
        problems += file_problems
        tables[name] = rows
    if problems:
        raise DataError(root, problems)
    sites, notes = {}, []
    for index, name in found.items():
        rows = tables[name]
        labels = np.asarray([int(float(row["num"])) > 0 for row in rows], dtype=np.int64)
        splits = stratified_splits(labels, seed + index, fractions)
        first: dict[tuple[str, ...], str] = {}
        for i, row in enumerate(rows):  # a repeated row (one privacy unit) stays in one split
            splits[i] = first.setdefault(tuple(row[c].strip() for c in COLUMNS), str(splits[i]))
        written, zeros = [], 0
        for row, label, split in zip(rows, labels, splits, strict=True):
            cells = {"label": str(label), "split": str(split)}
            for feature in FEATURES:
                value = parse_feature(row[feature])
                zero = feature in ZERO_MEANS_MISSING and value == 0
                zeros += zero
                cells[feature] = "" if zero or value is None or np.isnan(value) else row[feature].strip()
            written.append(cells)
        sites[HOSPITALS[name]] = written
        values, _ = feature_rows(written, FEATURES)
        notes.append(
            f"{HOSPITALS[name]}: {len(rows)} patients ({int(labels.sum())} with disease), "
            f"{np.isnan(values).mean():.1%} of feature cells missing (of which {zeros} zero blood pressure / "
            "cholesterol values)"
        )
    return sites, notes


def _read_file(path: Path, name: str) -> tuple[list[dict[str, str]], list[DataProblem]]:
    """The rows of one UCI file as ``{column: cell}``, and the problems of its bad lines."""
    if path.stat().st_size > MAX_FILE_BYTES:
        return [], [DataProblem(name, f"{path.stat().st_size} bytes: a UCI heart file is under {MAX_FILE_BYTES}")]
    try:
        text = path.read_text(encoding="utf-8-sig")
        lines = list(csv.reader(io.StringIO(text)))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        return [], [DataProblem(name, f"not a readable CSV file: {err}")]
    if lines and lines[0] and lines[0][0].strip().lower() == "age":  # a header row
        lines = [[]] + lines[1:]  # keep line numbers
    rows, problems = [], []
    for number, cells in enumerate(lines, start=1):
        if not cells or not any(c.strip() for c in cells):
            continue
        where = f"{name} line {number}"
        if len(cells) != len(COLUMNS):
            problems.append(DataProblem(where, f"{len(cells)} values: expected {len(COLUMNS)} ({', '.join(COLUMNS)})"))
            continue
        row = dict(zip(COLUMNS, cells, strict=True))
        _, bad = feature_rows([row], FEATURES, number, name)
        problems += bad
        target = row["num"].strip()
        if target not in ("0", "1", "2", "3", "4", "0.0", "1.0", "2.0", "3.0", "4.0"):
            problems.append(DataProblem(where, f"num = {target[:40]!r}: expected the diagnosis 0-4"))
        rows.append(row)
    if not rows and not problems:
        problems.append(DataProblem(name, "no rows"))
    return rows, problems
