"""Every registered task satisfies the same interface: a new task is tested by construction."""

import pytest
import torch
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader

from medfed.data import load_simulated_site
from medfed.privacy import make_private
from medfed.tasks import TASKS, Task, get_task, predict
from medfed.training import build_optimizer, evaluate, train
from tests.conftest import tiny_config

# every task in 2D, and the tasks whose 3D form has no test of its own here (tiny volumes)
CASES = [(name, 2) for name in sorted(TASKS)] + [("detection", 3)]
VOLUMES = {"data.spatial-dims": 3, "data.image-size": 16, "data.samples-per-site": 16, "model.depth": 1}


@pytest.fixture(params=CASES, ids=[f"{name}-{dims}d" for name, dims in CASES])
def task(request: pytest.FixtureRequest):
    name, dims = request.param
    module = get_task(name)
    return module if dims == 2 else _InVolumes(module)


class _InVolumes:
    """A task module, asked for its 3D form (``spatial_dims`` = 3 wherever it is chosen)."""

    DIMS = 3

    def __init__(self, module) -> None:
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    def synthetic_site(self, *args, **kwargs):
        return self._module.synthetic_site(*args, **{**kwargs, "spatial_dims": 3})


def _config(task):
    overrides = {"run.task": task.NAME, "data.image-size": 32, "data.samples-per-site": 64}
    return tiny_config(**{**overrides, **(VOLUMES if getattr(task, "DIMS", 2) == 3 else {})})


def _site(task):
    return load_simulated_site(_config(task), 0)[1]


def test_interface_names(task) -> None:
    protocol = {*Task.__annotations__, *(name for name in vars(Task) if not name.startswith("_"))}
    for name in sorted(protocol):
        assert hasattr(task, name), name
    assert task.SAMPLE_KEYS == ("image", task.TARGET)


def test_synthetic_site_holds_the_task_target(task) -> None:
    site = task.synthetic_site(0, 20, 32 if getattr(task, "DIMS", 2) == 2 else 16, 2, seed=0)
    assert site.target_key == task.TARGET and len(site.targets) == 20


def test_model_is_opacus_valid_and_dp_training_runs(task) -> None:
    config = _config(task)
    model = task.build_model(config)
    assert ModuleValidator.validate(model, strict=False) == []
    data = _site(task).split("train")
    loader = DataLoader(data, batch_size=8, shuffle=True)
    optimizer = build_optimizer(model, config.train)
    model, optimizer, loader = make_private(model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0)
    stats = train(task, model, loader, optimizer, torch.device("cpu"), epochs=1)
    assert stats.steps == len(loader) and stats.examples > 0
    results = evaluate(task, model._module, data, config, torch.device("cpu"))
    assert task.PRIMARY_METRIC in results and "loss" in results


def test_predict_and_loss_shapes(task) -> None:
    config = _config(task)
    model = task.build_model(config)
    batch = next(iter(DataLoader(_site(task).split("train"), batch_size=4)))
    assert set(batch) == {*task.SAMPLE_KEYS, "spacing"}
    assert task.loss(model(batch["image"]), batch).ndim == 0
    predictions = predict(task, model, batch["image"], config)
    assert len(predictions) == 4
    accumulator = task.metrics(config)
    accumulator.update(predictions, batch)
    assert isinstance(accumulator.compute(), dict)


def test_unknown_task_is_named() -> None:
    with pytest.raises(ValueError, match="unknown task 'pose'"):
        get_task("pose")
