"""A site's label map: how its own label values translate to the federation's classes, and so which
of those classes the site labels (``label-map.toml`` in the site folder).

Sites rarely label the same things: one hospital outlines only the liver, another liver and
spleen, and each writes its own label values. The file maps each value the site writes to one
of the federation's classes (a name from ``data.class-names`` or a class index)::

    # label-map.toml
    [labels]
    "0" = "background"   # mask value 0 (segmentation), or manifest label "0" (classification)
    "1" = "liver"
    "7" = "spleen"

Keys are what the site's files hold: for segmentation the integer values in its mask files, for
classification the text of its manifest's ``label`` cells (a number or a name, e.g.
``"pneumonia" = "pneumonia"``). Several values may map to one class (a site's left and right
kidney to ``kidney``). The classes a site labels are the mapped ones; the others are unlabelled
there: its loss leaves them alone and its metrics show them as n/a (see the tasks). A
segmentation site must map a value to class 0, background. Without the file the site labels
every class and its values are the federation's class indices.

The map never leaves the site; its replies say only which classes it labels.
"""

from __future__ import annotations

import tomllib
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfed.data.field_of_view import IGNORE
from medfed.data.vocabulary import DataError, DataProblem

__all__ = ["LABEL_MAP", "LabelMap", "labelled_vector", "read_label_map", "write_label_map"]

LABEL_MAP = "label-map.toml"
MAX_ENTRIES = 1024
MAX_BYTES = 1_000_000
MAX_KEY = 64
MAX_MASK_VALUE = 65535  # mask files hold at most 16-bit values here


@dataclass(frozen=True)
class LabelMap:
    """A site's values (``label`` text or mask values, as written) and the federation class each stands for."""

    values: dict[str, int]
    num_classes: int
    target: str  # "label" (manifest text) or "mask" (integer mask values)

    @property
    def labelled(self) -> tuple[int, ...]:
        """The federation's classes this site labels, in class order."""
        return tuple(sorted(set(self.values.values())))

    def label(self, text: str) -> int | None:
        """The class of a manifest ``label`` cell, or None when the map has no such value."""
        return self.values.get(text.strip())

    def mask_bound(self) -> int:
        """One more than the largest mask value the map names: what mask files are read up to."""
        return max(int(key) for key in self.values) + 1

    def translate_mask(self, mask: np.ndarray) -> np.ndarray:
        """A mask of site values as federation classes (``IGNORE`` stays); ValueError naming the
        values the map does not hold."""
        keys = np.array([int(key) for key in self.values], dtype=np.int64)
        lookup = np.full(self.mask_bound(), -2, dtype=np.int64)
        lookup[keys] = [self.values[key] for key in self.values]
        inside = mask != IGNORE
        found = np.unique(mask[inside])
        unknown = [int(v) for v in found if not 0 <= v < len(lookup) or lookup[int(v)] == -2]
        if unknown:
            raise ValueError(f"mask value(s) {unknown[:8]} are not in {LABEL_MAP}; it maps {sorted(keys.tolist())}")
        return np.where(inside, lookup[np.where(inside, mask, 0)], IGNORE)

    def lines(self, class_names: tuple[str, ...] = ()) -> list[str]:
        """The map for people: one line per site value, then the classes it leaves unlabelled."""
        out = [f"{key!r} -> {_class_text(value, class_names)}" for key, value in self.values.items()]
        missing = [_class_text(k, class_names) for k in range(self.num_classes) if k not in self.labelled]
        out.append(f"not labelled here: {', '.join(missing)}" if missing else "labels every class")
        return out


def labelled_vector(labelled: tuple[int, ...] | list[int], num_classes: int) -> np.ndarray | None:
    """Which classes are labelled, as a boolean ``(num_classes,)`` vector; None when all are
    (the site is then like any site without a label map)."""
    vector = np.zeros(num_classes, dtype=bool)
    vector[list(labelled)] = True
    return None if vector.all() else vector


def read_label_map(site_dir: Path, num_classes: int, class_names: tuple[str, ...], target: str) -> LabelMap | None:
    """The site folder's :data:`LABEL_MAP`, or None when it has none; :class:`DataError` naming the
    file and each bad entry (unknown class name, class index out of range, a value mapped twice,
    a mask value that is not an integer, a file that is not TOML of that shape)."""
    path = site_dir / LABEL_MAP
    if not path.exists():
        return None

    def refuse(reason: str) -> DataError:
        return DataError(site_dir, [DataProblem(LABEL_MAP, reason)])

    if target not in ("label", "mask"):
        raise refuse(f"label maps are for classification labels and segmentation masks, not {target}")
    try:
        if path.stat().st_size > MAX_BYTES:
            raise refuse(f"{path.stat().st_size} bytes: expected a small TOML file (at most {MAX_BYTES})")
        raw = tomllib.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise refuse(f"not a readable UTF-8 TOML file: {err}") from None
    table = raw.get("labels")
    extra = sorted(set(raw) - {"labels"})
    if extra or not isinstance(table, dict) or not table:
        raise refuse(
            f'expected one [labels] table of site value = class (e.g. "1" = "liver"); found keys {extra[:5]}'
            if extra
            else 'expected a non-empty [labels] table of site value = class (e.g. "1" = "liver")'
        )
    if len(table) > MAX_ENTRIES:
        raise refuse(f"{len(table)} entries in [labels]: expected at most {MAX_ENTRIES}")
    problems: list[DataProblem] = []
    values: dict[str, int] = {}
    seen: dict[str, str] = {}
    for key, value in table.items():
        where = f"{LABEL_MAP} [labels] {_shown(key)}"
        name = _key_problem(key, target)
        if name:
            problems.append(DataProblem(where, name))
            continue
        normal = str(int(key)) if target == "mask" else key.strip()
        if normal in seen:
            problems.append(DataProblem(where, f"site value {normal} is mapped twice (also as {_shown(seen[normal])})"))
            continue
        seen[normal] = key
        index = _class_index(value, num_classes, class_names)
        if isinstance(index, str):
            problems.append(DataProblem(where, index))
            continue
        values[normal] = index
    if not problems and target == "mask" and 0 not in values.values():
        problems.append(DataProblem(LABEL_MAP, "no site value maps to class 0 (background): a mask needs one"))
    if problems:
        raise DataError(site_dir, problems)
    return LabelMap(values, num_classes, target)


def write_label_map(site_dir: Path, values: dict[str, int | str]) -> Path:
    """Write ``values`` (site value -> class name or index) as the site folder's :data:`LABEL_MAP`."""
    entries = (
        f"{_quoted(key)} = {value if isinstance(value, int) else _quoted(value)}" for key, value in values.items()
    )
    lines = ["[labels]", *entries]
    path = Path(site_dir) / LABEL_MAP
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _key_problem(key: str, target: str) -> str:
    """Why ``key`` cannot be a site value, or ""."""
    if not key.strip() or len(key) > MAX_KEY or any(unicodedata.category(c) == "Cc" for c in key):
        return f"expected a site value of 1 to {MAX_KEY} characters without control characters"
    if target == "mask":
        try:
            number = int(key)
        except ValueError:
            return "expected an integer mask value (the value the site's mask files hold)"
        if not 0 <= number <= MAX_MASK_VALUE:
            return f"mask value {number}: expected an integer in [0, {MAX_MASK_VALUE}]"
    return ""


def _class_index(value: object, num_classes: int, class_names: tuple[str, ...]) -> int | str:
    """The federation class ``value`` names, or why it names none."""
    if isinstance(value, str):
        if value in class_names:
            return class_names.index(value)
        if not class_names:
            return f"unknown class name {_shown(value)}: data.class-names is not set, so classes are indices 0..{num_classes - 1}"
        return (
            f"unknown class name {_shown(value)}: the federation's classes (data.class-names) are {list(class_names)}"
        )
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < num_classes:
            return value
        return f"class index {value} is out of range: expected 0..{num_classes - 1} (data.num-classes = {num_classes})"
    return f"{_shown(value)}: expected a class name (data.class-names) or a class index 0..{num_classes - 1}"


def _class_text(index: int, class_names: tuple[str, ...]) -> str:
    return f"{class_names[index]} ({index})" if index < len(class_names) else f"class {index}"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
