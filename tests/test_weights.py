from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from medfed.tasks import get_task
from medfed.weights import (
    UpdateRejected,
    array_bytes,
    load_checkpoint,
    model_to_arrays,
    save_checkpoint,
    set_model_arrays,
    validate_update,
)
from tests.conftest import tiny_config


def _model() -> torch.nn.Module:
    return get_task("classification").build_model(tiny_config())


def test_model_arrays_round_trip() -> None:
    source, target = _model(), _model()
    set_model_arrays(target, model_to_arrays(source))
    for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    raw = sum(t.numel() * 4 for t in source.state_dict().values())
    serialized = array_bytes(model_to_arrays(source))
    assert raw <= serialized <= raw + 200 * len(source.state_dict())  # payload plus small per-tensor headers


def _arrays_with(reference: ArrayRecord, key: str, value: np.ndarray) -> ArrayRecord:
    arrays = reference.to_numpy_ndarrays()
    names = list(reference.keys())
    arrays[names.index(key)] = value
    return ArrayRecord(dict(zip(names, [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays], strict=True)))


def test_validation_accepts_a_small_update_and_rejects_bad_ones() -> None:
    reference = model_to_arrays(_model())
    key = next(iter(reference.keys()))
    original = reference[key].numpy()
    ok = _arrays_with(reference, key, original + 0.01)
    assert validate_update(reference, ok, 10.0).update_norm > 0
    with pytest.raises(UpdateRejected, match="NaN or Inf"):
        validate_update(reference, _arrays_with(reference, key, original * np.nan), 10.0)
    with pytest.raises(UpdateRejected, match="expected float32"):
        validate_update(reference, _arrays_with(reference, key, np.zeros((2, 2), np.float32)), 10.0)
    with pytest.raises(UpdateRejected, match="exceeds run.max-update-norm"):
        validate_update(reference, _arrays_with(reference, key, original + 100.0), 10.0)
    with pytest.raises(UpdateRejected, match="tensor names differ"):
        validate_update(reference, ArrayRecord({"x": torch.zeros(1)}), 10.0)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    arrays = model_to_arrays(_model())
    path = save_checkpoint(tmp_path / "ck" / "round-001.safetensors", arrays, {"round": 1, "config": {}})
    state, meta = load_checkpoint(path)
    assert meta["round"] == 1
    assert set(state) == set(arrays.keys())
    (tmp_path / "ck" / "round-001.json").unlink()
    with pytest.raises(FileNotFoundError, match="metadata not found"):
        load_checkpoint(path)
