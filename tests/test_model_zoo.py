"""Every network ``model.name`` can pick builds, is Opacus-valid, gives the task's output shape in
2D and 3D, and trains one DP-SGD step through the project's own path (``make_private`` +
``train``) with per-sample gradients equal to each image's own gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import UNet
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from medfed.config import MODEL_NAMES, Config, ConfigError
from medfed.data import load_simulated_site
from medfed.data.tabular import model_width
from medfed.models import OUTPUT_STRIDES, CenterNet, ConvClassifier, zoo
from medfed.privacy import make_private
from medfed.tasks import get_task, predict
from medfed.training import build_optimizer, train
from tests.conftest import tiny_config

# instance segmentation builds the segmentation networks (the same builders, 3 output maps): not tested twice;
# the mask-conditioned generator takes each image's mask too: tests/test_generative_masks.py
CASES = [
    (task, name)
    for task, names in MODEL_NAMES.items()
    for name in names
    if task != "instance-segmentation" and name != "ddpm-mask"
]
# 3D DP steps that take about 10 s or more on one CPU core (large fixed-size networks)
SLOW_DP_3D = frozenset({"resnet34", "resnet50", "efficientnet-b0"})


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _cases_2d_3d(slow_3d: frozenset[str] = frozenset()) -> list:
    cases = []
    for task, name in CASES:
        for dims in (2, 3) if task not in ("detection", "tabular", "generation") else (2,):  # these: 2D only
            marks = [pytest.mark.slow] if dims == 3 and name in slow_3d else []
            cases.append(pytest.param(task, name, dims, marks=marks, id=f"{name}-{dims}d"))
    return cases


def _config(task: str, name: str, dims: int = 2, **overrides: object) -> Config:
    """Tiny settings every network accepts: 32 px (16 px volumes where a network allows), width 8."""
    if name == "swinunetr":
        pytest.importorskip("einops")
    large = name in ("densenet121", "efficientnet-b0", "swinunetr")  # need 32 px at least
    settings = {
        "run.task": task,
        "model.name": name,
        "data.spatial-dims": dims,
        "data.image-size": 32 if dims == 2 or large else 16,
        "data.samples-per-site": 10,
        "model.width": 12 if name == "swinunetr" else 8,  # a multiple of its attention heads
        "model.depth": 3 if name == "dynunet" else 2,  # DynUNet needs 3 levels at least
    }
    return tiny_config(**{**settings, **overrides})


def _expected_shape(config: Config, batch: int) -> tuple[int, ...]:
    d = config.data
    spatial = (d.image_size,) * d.spatial_dims
    return {
        "classification": (batch, d.num_classes),
        "tabular": (batch, d.num_classes),
        "generation": (batch, d.num_classes),  # denoising error under each class
        "segmentation": (batch, d.num_classes, *spatial),
        "detection": (
            batch,
            d.num_classes + 2 * d.spatial_dims,
            *(s // OUTPUT_STRIDES[d.spatial_dims] for s in spatial),
        ),
    }[config.run.task]


def _without_dropout(model: nn.Module) -> nn.Module:
    """No random masks (EfficientNet's dropout and drop-connect), so one image alone gives the same output."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        if hasattr(module, "drop_connect_rate"):
            module.drop_connect_rate = 0.0
    return model


def test_zoo_names_are_the_config_names() -> None:
    assert {task: tuple(builders) for task, builders in zoo.MODEL_BUILDERS.items()} == MODEL_NAMES


@pytest.mark.parametrize(("task", "name", "dims"), _cases_2d_3d())
def test_network_is_opacus_valid_with_the_task_output_shape(task: str, name: str, dims: int) -> None:
    config = _config(task, name, dims)
    model = get_task(task).build_model(config)
    assert ModuleValidator.validate(model, strict=False) == []
    if task == "tabular":  # rows of the synthetic sites' features and their missing indicators, as a 1 x 2F grid
        images = torch.rand(2, 1, 1, model_width(config.data))
    else:
        images = torch.rand(2, 1, *(config.data.image_size,) * dims)
    assert tuple(model(images).shape) == _expected_shape(config, 2)


@pytest.mark.parametrize(("task", "name", "dims"), _cases_2d_3d(SLOW_DP_3D))
def test_dp_step_trains_with_per_image_gradients(task: str, name: str, dims: int) -> None:
    _check_dp_step(task, _config(task, name, dims))


@pytest.mark.parametrize("task", ["segmentation", "instance-segmentation"])
def test_full_resolution_unet_starts_at_stride_one_and_trains_under_dp(task: str) -> None:
    config = _config(task, "unet", **{"model.full-resolution": True})
    model = get_task(task).build_model(config)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.stride == (1, 1) and first.out_channels == config.model.width
    plain = get_task(task).build_model(_config(task, "unet"))
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in plain.parameters())
    _check_dp_step(task, config)


def _check_dp_step(task: str, config: Config) -> None:
    """One DP-SGD step through ``make_private`` + ``train`` changes every parameter, and Opacus'
    per-sample gradients equal each image's own gradient."""
    module = get_task(task)
    torch.manual_seed(0)
    model = _without_dropout(module.build_model(config))
    reference = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    loader = DataLoader(load_simulated_site(config, 0)[1].split("train"), batch_size=2)
    batch = next(iter(loader))
    private, optimizer, _ = make_private(model, build_optimizer(model, config.train), loader, 1.0, 1.0)
    stats = train(module, private, [batch], optimizer, torch.device("cpu"), epochs=1)
    assert stats.steps == 1 and stats.examples == 2
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    if task == "generation":  # its loss draws fresh noise at every call: no two passes to compare
        return
    for index in range(2):  # Opacus' per-sample gradient of each image = that image's own gradient
        reference.zero_grad()
        one = {key: value[index : index + 1] for key, value in batch.items()}
        module.loss(reference(one["image"]), one).backward()
        own = torch.cat([p.grad.flatten() for p in reference.parameters()])
        per_sample = torch.cat([p.grad_sample[index].flatten() for p in model.parameters()])
        assert float((per_sample - own).norm() / own.norm()) < 1e-2


@pytest.mark.parametrize(("task", "name"), CASES)
def test_predictions_and_metrics_work_with_every_network(task: str, name: str) -> None:
    config = _config(task, name)
    module = get_task(task)
    model = module.build_model(config).eval()
    batch = next(iter(DataLoader(load_simulated_site(config, 0)[1].split("train"), batch_size=2)))
    with torch.no_grad():
        predictions = predict(module, model, batch["image"], config)
    accumulator = module.metrics(config)
    accumulator.update(predictions, batch)
    assert module.PRIMARY_METRIC in accumulator.compute()


@pytest.mark.parametrize(("task", "name"), [(task, name) for task, name in CASES if task != "tabular"])
def test_three_channels_make_a_model_taking_three_channels(task: str, name: str) -> None:
    config = _config(task, name, **{"data.channels": 3})
    model = get_task(task).build_model(config)
    size = config.data.image_size
    assert tuple(model(torch.rand(2, 3, size, size)).shape) == _expected_shape(config, 2)
    with pytest.raises(RuntimeError):
        model(torch.rand(2, 1, size, size))


def test_default_networks_are_unchanged() -> None:
    """The task defaults keep their structure, parameter names and initialisation (checkpoints rely on them)."""
    for task, legacy in (
        ("classification", lambda m: ConvClassifier(1, 2, 2, m.width, m.depth, m.norm_groups, m.dropout, m.norm)),
        (
            "segmentation",
            lambda m: UNet(
                spatial_dims=2,
                in_channels=1,
                out_channels=2,
                channels=(m.width, 2 * m.width),
                strides=(2,),
                num_res_units=0,
                act=("relu", {"inplace": False}),
                norm=("group", {"num_groups": m.norm_groups}),
                dropout=m.dropout,
            ),
        ),
        ("detection", lambda m: CenterNet(1, 2, m.width, m.depth, m.norm_groups, m.norm)),
    ):
        config = tiny_config(**{"run.task": task, "data.image-size": 32})
        torch.manual_seed(0)
        built = get_task(task).build_model(config).state_dict()
        torch.manual_seed(0)
        expected = legacy(config.model).state_dict()
        assert list(built) == list(expected), task
        assert all(torch.equal(built[key], expected[key]) for key in expected), task


@pytest.mark.parametrize(
    ("task", "overrides", "message"),
    [
        (
            "segmentation",
            {"model.name": "unet", "model.depth": 3, "data.image-size": 30},
            r"data.image-size = 30 is invalid for model.name = 'unet' with model.depth = 3: expected a multiple of 4",
        ),
        (
            "segmentation",
            {"model.name": "swinunetr", "model.width": 12, "data.image-size": 48, "data.patch-size": 24},
            r"data.patch-size = 24 is invalid for model.name = 'swinunetr': expected a multiple of 32",
        ),
        (
            "classification",
            {"model.name": "densenet121", "data.image-size": 28},
            r"data.image-size = 28 is invalid for model.name = 'densenet121': expected >= 32",
        ),
        ("segmentation", {"model.name": "swinunetr", "data.image-size": 32}, r"model.width = 8 is invalid"),
        ("segmentation", {"model.name": "dynunet", "model.depth": 2}, r"model.depth = 2 is invalid for .*'dynunet'"),
        (
            "instance-segmentation",
            {"model.name": "basicunet", "model.full-resolution": True},
            r"model.full-resolution = true is invalid for model.name = 'basicunet': only 'unet' has it",
        ),
    ],
)
def test_unusable_settings_are_refused_naming_them(task: str, overrides: dict, message: str) -> None:
    if overrides["model.name"] == "swinunetr":
        pytest.importorskip("einops")
    with pytest.raises(ConfigError, match=message):
        get_task(task).build_model(tiny_config(**{"run.task": task, **overrides}))


def test_swinunetr_without_einops_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo, "optional_import", lambda name: (None, False))
    config = tiny_config(
        **{"run.task": "segmentation", "model.name": "swinunetr", "model.width": 12, "data.image-size": 32}
    )
    with pytest.raises(ConfigError, match="needs the einops package"):
        get_task("segmentation").build_model(config)


@pytest.mark.parametrize(("task", "name"), [("classification", "resnet18"), ("segmentation", "attentionunet")])
def test_norm_none_leaves_no_normalisation(task: str, name: str) -> None:
    model = get_task(task).build_model(_config(task, name, **{"model.norm": "none"}))
    norms = (nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    assert not any(isinstance(module, norms) for module in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []


@pytest.mark.parametrize("name", MODEL_NAMES["classification"])
def test_every_classifier_gets_a_grad_cam_example(name: str, tmp_path) -> None:
    from medfed.evaluation.explain import example_images

    config = _config("classification", name)
    task = get_task("classification")
    _, site = load_simulated_site(config, 0)
    paths = example_images(task, task.build_model(config), site.split("test"), config, tmp_path, "example")
    assert len(paths) == 1 and paths[0].stat().st_size > 0


def test_input_norm_makes_scores_blind_to_brightness_and_contrast() -> None:
    config = _config("classification", "cnn", **{"model.input-norm": True})
    torch.manual_seed(0)
    model = get_task("classification").build_model(config).eval()
    images = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(images), model(0.5 * images + 0.2), atol=1e-4)
    assert set(model.state_dict()) == set(
        get_task("classification").build_model(_config("classification", "cnn")).state_dict()
    )
