"""Model weights on the wire and on disk: ArrayRecord conversion, update validation, checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from safetensors.torch import load_file, save_file
from torch import nn

from medfed.config import Config, ConfigError

__all__ = [
    "CheckpointError",
    "UpdateRejected",
    "array_bytes",
    "checkpoint_config",
    "compress_update",
    "decompress_update",
    "load_checkpoint",
    "load_state",
    "model_to_arrays",
    "moving_average",
    "save_checkpoint",
    "set_model_arrays",
    "validate_update",
]


class UpdateRejected(ValueError):
    """A site's update failed validation and is left out of aggregation."""


def model_to_arrays(model: nn.Module) -> ArrayRecord:
    """The model's state (parameters and buffers) as an ArrayRecord."""
    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})


def set_model_arrays(model: nn.Module, arrays: ArrayRecord) -> None:
    """Load an ArrayRecord into ``model``; keys and shapes must match exactly."""
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)


def moving_average(average: ArrayRecord | None, latest: ArrayRecord, decay: float) -> ArrayRecord:
    """``decay * average + (1 - decay) * latest`` for floating arrays (others: latest); ``latest``
    when there is no average yet."""
    if average is None:
        return latest
    out = {}
    for (key, old), new in zip(
        average.to_torch_state_dict().items(), latest.to_torch_state_dict().values(), strict=True
    ):
        out[key] = torch.lerp(new, old, decay) if new.is_floating_point() else new
    return ArrayRecord(out)


def array_bytes(arrays: ArrayRecord) -> int:
    """Serialized bytes of an ArrayRecord's tensors (what one transfer of it moves, headers included)."""
    return int(sum(len(array.data) for array in arrays.values()))


SCALE_SUFFIX = "::int8-scale"


def compress_update(reference: ArrayRecord, trained: ArrayRecord, kind: str) -> ArrayRecord:
    """What a site sends: its trained weights (``none``), or their difference from the model it
    received as float16 (``fp16``, half the bytes) or as int8 with one float32 scale per tensor
    (``int8``, about a quarter: symmetric, round to nearest). Non-float tensors go as they are."""
    if kind == "none":
        return trained
    out: dict[str, torch.Tensor] = {}
    ref = reference.to_torch_state_dict()
    for key, value in trained.to_torch_state_dict().items():
        if not value.is_floating_point():
            out[key] = value
            continue
        delta = value.double() - ref[key].double()
        if kind == "fp16":
            out[key] = delta.to(torch.float16)
            continue
        scale = float(delta.abs().max()) / 127.0 if delta.numel() else 0.0
        out[key] = torch.round(delta / scale).to(torch.int8) if scale > 0 else torch.zeros_like(delta, dtype=torch.int8)
        out[key + SCALE_SUFFIX] = torch.tensor([scale], dtype=torch.float32)
    return ArrayRecord(out)


def decompress_update(reference: ArrayRecord, received: ArrayRecord, kind: str) -> ArrayRecord:
    """The weights a site trained, from what :func:`compress_update` sent (in the reference's key order).

    Raises :class:`UpdateRejected` when the record does not have the compressed form's names or dtypes.
    """
    if kind == "none":
        return received
    got = received.to_torch_state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, ref in reference.to_torch_state_dict().items():
        if key not in got:
            raise UpdateRejected(f"compressed update lacks tensor {key}")
        value = got[key]
        if not ref.is_floating_point():
            out[key] = value
            continue
        expected = torch.float16 if kind == "fp16" else torch.int8
        if value.dtype != expected or value.shape != ref.shape:
            raise UpdateRejected(f"tensor {key}: got {value.dtype}{list(value.shape)}, expected {expected} ({kind})")
        delta = value.double()
        if kind == "int8":
            scale = got.get(key + SCALE_SUFFIX)
            if scale is None or scale.numel() != 1:
                raise UpdateRejected(f"compressed update lacks the scale of tensor {key}")
            delta = delta * float(scale)
        out[key] = (ref.double() + delta).to(ref.dtype)
    return ArrayRecord(out)


@dataclass(frozen=True)
class UpdateCheck:
    """The outcome of validating one update: its L2 distance from the global model."""

    update_norm: float


def validate_update(reference: ArrayRecord, update: ArrayRecord, max_update_norm: float) -> UpdateCheck:
    """Check an update against the global model it was trained from.

    Same keys, shapes and dtypes; every value finite; ``||update - reference||_2`` at most
    ``max_update_norm``. Raises :class:`UpdateRejected` naming what is wrong.
    """
    ref = reference.to_numpy_ndarrays()
    keys = list(reference.keys())
    if list(update.keys()) != keys:
        missing = sorted(set(keys) - set(update.keys()))
        extra = sorted(set(update.keys()) - set(keys))
        raise UpdateRejected(f"tensor names differ from the global model (missing {missing[:3]}, extra {extra[:3]})")
    squared = 0.0
    for key, expected, got in zip(keys, ref, update.to_numpy_ndarrays(), strict=True):
        if got.shape != expected.shape or got.dtype != expected.dtype:
            raise UpdateRejected(
                f"tensor {key}: got {got.dtype}{list(got.shape)}, expected {expected.dtype}{list(expected.shape)}"
            )
        if np.issubdtype(got.dtype, np.floating):
            if not np.isfinite(got).all():
                raise UpdateRejected(f"tensor {key} contains NaN or Inf")
            squared += float(np.sum((got.astype(np.float64) - expected) ** 2))
    norm = float(np.sqrt(squared))
    if norm > max_update_norm:
        raise UpdateRejected(f"update norm {norm:.3g} exceeds run.max-update-norm = {max_update_norm:.3g}")
    return UpdateCheck(norm)


def save_checkpoint(path: str | Path, arrays: ArrayRecord, metadata: dict[str, Any]) -> Path:
    """Write ``path`` (.safetensors) and ``path`` with .json (metadata: round, config, metrics)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()}
    save_file(tensors, str(path), metadata={"medfed": json.dumps({"round": metadata.get("round")})})
    path.with_suffix(".json").write_text(json.dumps(metadata, indent=1, sort_keys=True, default=str))
    return path


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and what was expected."""


CHECKPOINT_FORM = "a medfed checkpoint: a .safetensors file with the .json metadata written beside it"


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(state_dict, metadata)``.

    Only the safetensors format is read (never a pickle, whatever the file's name); a file that is
    not one, or metadata that is not a JSON object, is a :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"checkpoint metadata not found: {meta_path} (written beside every checkpoint)")
    try:
        state = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors and torch raise several types for a foreign file
        raise CheckpointError(f"{path} is not a safetensors file ({err}): expected {CHECKPOINT_FORM}") from None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{meta_path} is not readable JSON ({err}): expected {CHECKPOINT_FORM}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} holds a JSON {type(meta).__name__}: expected {CHECKPOINT_FORM}")
    return state, meta


def checkpoint_config(meta: dict[str, Any], path: str | Path) -> Config:
    """The run config stored in a checkpoint's metadata, validated; :class:`CheckpointError` naming
    the metadata file when it is missing or invalid."""
    meta_path = Path(path).with_suffix(".json")
    raw = meta.get("config")
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{meta_path} has no 'config' table: expected {CHECKPOINT_FORM}")
    try:
        return Config.from_dict(raw, source=str(meta_path))
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"{err} (in the metadata of checkpoint {Path(path).name})") from None


def load_state(
    model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, model_name: str, remedy: str
) -> None:
    """Load ``state`` (read from checkpoint ``path``) into ``model`` (``model_name`` in messages):
    the same tensor names and shapes, finite values. Otherwise a :class:`CheckpointError` naming
    the file, what differs and the ``remedy``, and the model is left as it was."""
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if wrong or missing or extra:
        detail = "; ".join(
            filter(
                None,
                [
                    f"shapes differ: {', '.join(wrong[:3])}" if wrong else "",
                    f"missing: {', '.join(missing[:3])}" if missing else "",
                    f"unexpected: {', '.join(extra[:3])}" if extra else "",
                ],
            )
        )
        raise CheckpointError(f"{path} does not fit {model_name} ({detail}): {remedy}")
    not_finite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not_finite:
        raise CheckpointError(f"{path} holds NaN or Inf weights in {', '.join(not_finite[:3])}: {remedy}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as err:  # e.g. a tensor of a dtype the parameter cannot take
        raise CheckpointError(f"{path} does not fit {model_name} ({err}): {remedy}") from None
