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


@pytest.mark.parametrize(("kind", "size_ratio", "tolerance"), [("fp16", 0.5, 1e-3), ("int8", 0.25, 2e-2)])
def test_compressed_updates_are_smaller_and_restore_the_weights(kind: str, size_ratio: float, tolerance: float) -> None:
    from medfed.weights import array_bytes, compress_update, decompress_update

    torch.manual_seed(0)
    reference = ArrayRecord({"w": torch.randn(256, 128), "b": torch.randn(128), "steps": torch.tensor([3])})
    trained = ArrayRecord({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                           for k, v in reference.to_torch_state_dict().items()})  # fmt: skip
    sent = compress_update(reference, trained, kind)
    assert array_bytes(sent) < size_ratio * 1.1 * array_bytes(trained)
    restored = decompress_update(reference, sent, kind).to_torch_state_dict()
    original = trained.to_torch_state_dict()
    assert list(restored) == list(original) and torch.equal(restored["steps"], original["steps"])
    change = (original["w"] - reference.to_torch_state_dict()["w"]).abs().max()
    assert (restored["w"] - original["w"]).abs().max() <= tolerance * change * 10
    assert restored["w"].dtype == torch.float32


def test_a_compressed_update_of_the_wrong_form_is_rejected() -> None:
    from medfed.weights import UpdateRejected, compress_update, decompress_update

    reference = ArrayRecord({"w": torch.zeros(4, 4)})
    with pytest.raises(UpdateRejected, match="expected torch.int8"):
        decompress_update(reference, compress_update(reference, reference, "fp16"), "int8")
    with pytest.raises(UpdateRejected, match="lacks the scale"):
        decompress_update(reference, ArrayRecord({"w": torch.zeros(4, 4, dtype=torch.int8)}), "int8")
