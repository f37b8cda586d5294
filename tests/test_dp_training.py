"""DP-SGD switches in the one train loop: augmentation multiplicity and physical batches."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad
from torch.utils.data import DataLoader

from medfed.config import ConfigError
from medfed.data.arrays import PrivacyUnitDataset
from medfed.data.synthetic import synthetic_site
from medfed.privacy import make_private
from medfed.tasks import get_task
from medfed.training import build_optimizer, train
from tests.conftest import tiny_config

TASK = get_task("classification")
LR = 0.5


def _config(**overrides: object):
    return tiny_config(**{"train.lr": LR, "train.momentum": 0.0, **overrides})


def _batch(images: int, views: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    if views == 1:
        return {"image": torch.rand(images, 1, 28, 28, generator=generator), "label": torch.arange(images) % 2}
    labels = (torch.arange(images) % 2)[:, None].repeat(1, views)  # as PrivacyUnitDataset stacks them
    return {"image": torch.rand(images, views, 1, 28, 28, generator=generator), "label": labels}


def _private_step(batch: dict[str, torch.Tensor], clip: float, **train_options: int) -> list[torch.Tensor]:
    """Weights after one DP-SGD step without noise (so the update is exactly the mean clipped gradient)."""
    config = _config()
    torch.manual_seed(0)
    model = TASK.build_model(config)
    images = len(batch["image"])
    placeholder = DataLoader([{"image": torch.zeros(1, 28, 28), "label": torch.tensor(0)}] * images, batch_size=images)
    model, optimizer, _ = make_private(model, build_optimizer(model, config.train), placeholder, 0.0, clip)
    train(TASK, model, [batch], optimizer, torch.device("cpu"), epochs=1, **train_options)
    return [p.detach().clone() for p in model._module.parameters()]


def _expected_step(batch: dict[str, torch.Tensor], clip: float, views: int) -> list[torch.Tensor]:
    """The same step computed by hand: per image, the mean gradient over its views, clipped; then the mean."""
    config = _config()
    torch.manual_seed(0)
    model = TASK.build_model(config)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def sample_loss(weights: dict[str, torch.Tensor], image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return TASK.loss(functional_call(model, weights, (image[None],)), {"label": label[None]})

    clipped_sum = {name: torch.zeros_like(p) for name, p in params.items()}
    for b in range(len(batch["image"])):
        views_of_b = batch["image"][b] if views > 1 else batch["image"][b][None]
        label = batch["label"][b][0] if views > 1 else batch["label"][b]
        grads = [grad(sample_loss)(params, view, label) for view in views_of_b]
        mean = {name: torch.stack([g[name] for g in grads]).mean(0) for name in params}
        norm = torch.sqrt(sum((g**2).sum() for g in mean.values()))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for name in params:
            clipped_sum[name] += mean[name] * factor
    images = len(batch["image"])
    return [params[name] - LR * clipped_sum[name] / images for name in params]


def test_augmentation_multiplicity_clips_each_images_mean_gradient_over_its_views() -> None:
    batch = _batch(images=4, views=3)
    after = _private_step(batch, clip=0.05, views=3)
    for got, want in zip(after, _expected_step(batch, clip=0.05, views=3), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_averaging_views_is_not_clipping_each_view() -> None:
    """Clipping views one by one would give a different (and less useful) update."""
    batch = _batch(images=4, views=3)
    with_views = _private_step(batch, clip=0.05, views=3)
    flat = {"image": batch["image"].flatten(0, 1), "label": batch["label"].flatten()}
    per_view = _private_step(flat, clip=0.05)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(with_views, per_view, strict=True))


def test_a_batch_in_physical_parts_takes_the_same_dp_step_as_whole() -> None:
    batch = _batch(images=6, views=2)
    whole = _private_step(batch, clip=0.05, views=2)
    in_parts = _private_step(batch, clip=0.05, views=2, physical_batch_size=4)  # parts of 4 and 2 images
    for a, b in zip(whole, in_parts, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_batch_in_physical_parts_takes_the_same_step_without_dp() -> None:
    config = _config()
    batch = _batch(images=6)
    results = []
    for part in (0, 4):
        torch.manual_seed(0)
        model = TASK.build_model(config)
        stats = train(TASK, model, [batch], build_optimizer(model, config.train), torch.device("cpu"), epochs=1,
                      physical_batch_size=part)  # fmt: skip
        assert stats.steps == 1
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_unit_yields_several_different_views_of_one_image() -> None:
    config = _config(**{"train.augment": True, "train.augmentations": 3})
    data = synthetic_site(0, 40, seed=0)
    _, units = data.privacy_units("train", "image")
    views = PrivacyUnitDataset(data.split("train"), units, TASK.train_transform(config), views=3)
    item = views[0]
    assert item["image"].shape == (3, 1, 28, 28) and item["label"].shape == (3,)
    assert len(set(item["label"].tolist())) == 1
    assert not torch.equal(item["image"][0], item["image"][1])
    batch = next(iter(DataLoader(views, batch_size=5)))
    assert batch["image"].shape == (5, 3, 1, 28, 28)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"train.augmentations": 2}, "train.augment = true"),
        ({"run.task": "segmentation", "train.augmentations": 2}, "data.patch-size > 0"),
        ({"train.physical-batch-size": -1}, "train.physical-batch-size"),
    ],
)
def test_views_without_randomness_and_bad_part_sizes_are_refused(overrides: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        tiny_config(**overrides)


@pytest.mark.parametrize("trainable", ["all", "bias-norm"])
def test_unet_dp_step_is_the_mean_clipped_per_sample_gradient(trainable: str) -> None:
    """Per-sample gradients of convolutions, transposed convolutions and GroupNorm, also when only
    biases and norms train (then no weight gradient is computed at all): one noiseless DP-SGD step
    equals clipping each image's own gradient, computed image by image."""
    segmentation = get_task("segmentation")
    config = tiny_config(**{"run.task": "segmentation", "data.image-size": 16, "train.lr": LR,
                            "train.momentum": 0.0, "train.trainable": trainable})  # fmt: skip
    generator = torch.Generator().manual_seed(5)
    batch = {"image": torch.rand(3, 1, 16, 16, generator=generator),
             "mask": (torch.rand(3, 1, 16, 16, generator=generator) > 0.7).long()}  # fmt: skip
    torch.manual_seed(0)
    reference = segmentation.build_model(config)
    build_optimizer(reference, config.train)  # freezes what train.trainable leaves out
    start = {name: p.detach().clone() for name, p in reference.named_parameters()}
    trained = {name for name, p in reference.named_parameters() if p.requires_grad}
    clipped_sum = {name: torch.zeros_like(start[name]) for name in trained}
    for b in range(3):
        reference.zero_grad()
        segmentation.loss(reference(batch["image"][b : b + 1]), {"mask": batch["mask"][b : b + 1]}).backward()
        grads = {name: p.grad.detach().clone() for name, p in reference.named_parameters() if name in trained}
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        for name in trained:
            clipped_sum[name] += grads[name] * min(1.0, 0.05 / (float(norm) + 1e-6))

    torch.manual_seed(0)
    model = segmentation.build_model(config)
    optimizer = build_optimizer(model, config.train)
    placeholder = DataLoader([{k: v[0] for k, v in batch.items()}] * 3, batch_size=3)
    model, optimizer, _ = make_private(model, optimizer, placeholder, 0.0, 0.05)
    train(segmentation, model, [batch], optimizer, torch.device("cpu"), epochs=1)
    for name, param in model._module.named_parameters():
        expected = start[name] - LR * clipped_sum[name] / 3 if name in trained else start[name]
        torch.testing.assert_close(param.detach(), expected, atol=1e-6, rtol=1e-4, msg=name)
