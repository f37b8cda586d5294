import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medfed.data.synthetic import synthetic_site
from medfed.tasks import get_task
from medfed.training import build_optimizer, evaluate, resolve_device, train
from tests.conftest import tiny_config

TASK = get_task("classification")


def test_training_lowers_the_loss() -> None:
    torch.manual_seed(0)
    config = tiny_config(**{"train.lr": 0.05})
    model = TASK.build_model(config)
    data = synthetic_site(0, 200, seed=0).split("train")
    before = evaluate(TASK, model, data, config, torch.device("cpu"))["loss"]
    loader = DataLoader(data, batch_size=16, shuffle=True)
    train(TASK, model, loader, build_optimizer(model, config.train), torch.device("cpu"), epochs=6)
    after = evaluate(TASK, model, data, config, torch.device("cpu"))["loss"]
    assert after < before


def test_local_steps_override_epochs() -> None:
    config = tiny_config()
    model = TASK.build_model(config)
    loader = DataLoader(synthetic_site(0, 40).split("train"), batch_size=4)
    stats = train(
        TASK, model, loader, build_optimizer(model, config.train), torch.device("cpu"), epochs=1, max_steps=13
    )
    assert stats.steps == 13


def test_proximal_term_keeps_weights_closer_to_the_global_model() -> None:
    config = tiny_config(**{"train.lr": 0.1, "train.momentum": 0.0})
    data = synthetic_site(0, 80).split("train")
    distances = []
    for mu in (0.0, 5.0):
        torch.manual_seed(1)
        model = TASK.build_model(config)
        start = [p.detach().clone() for p in model.parameters()]
        torch.manual_seed(2)
        loader = DataLoader(data, batch_size=8, shuffle=True)
        train(TASK, model, loader, build_optimizer(model, config.train), torch.device("cpu"), epochs=2, proximal_mu=mu)
        distances.append(sum(float((p - s).norm() ** 2) for p, s in zip(model.parameters(), start, strict=True)))
    assert distances[1] < distances[0]


def test_device_auto_is_cpu_without_gpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_an_empty_poisson_batch_takes_a_noise_only_dp_step_with_group_norm_3d() -> None:
    from medfed.privacy import make_private

    seg = get_task("segmentation")
    config = tiny_config(**{"run.task": "segmentation", "data.spatial-dims": 3, "data.image-size": 8})
    model = seg.build_model(config)
    data = [{"image": torch.zeros(1, 8, 8, 8), "mask": torch.zeros(1, 8, 8, 8, dtype=torch.long)}]
    model, optimizer, _ = make_private(
        model, build_optimizer(model, config.train), DataLoader(data, batch_size=1), 1.0, 1.0
    )
    before = [p.detach().clone() for p in model.parameters()]
    empty = {"image": torch.zeros(0, 1, 8, 8, 8), "mask": torch.zeros(0, 1, 8, 8, 8, dtype=torch.long)}
    stats = train(seg, model, [empty, empty], optimizer, torch.device("cpu"), epochs=1)
    assert stats.steps == 2 and stats.examples == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # noise was added


def test_cosine_schedule_runs_over_all_rounds_with_warm_up() -> None:
    from medfed.config import TrainConfig
    from medfed.training import lr_schedule

    settings = TrainConfig(lr=1.0, schedule="cosine", warmup_rounds=1)
    rates = []
    for server_round in range(1, 4):  # 3 rounds of 4 steps, a fresh optimizer each round as at a site
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = lr_schedule(optimizer, settings, (server_round - 1) * 4, 12, 4)
        for _ in range(4):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warm-up over the first round
    assert rates[4] == 1.0 and all(a > b for a, b in zip(rates[4:], rates[5:], strict=False))
    assert 0 < rates[-1] < 0.1
    assert lr_schedule(optimizer, TrainConfig(), 0, 12, 4) is None  # constant: nothing to schedule


def test_logit_adjustment_adds_the_site_log_prior_in_training_only() -> None:
    from medfed.config import ConfigError
    from medfed.tasks import classification

    adjust = classification.LogitAdjustment(None, np.array([0, 0, 0, 1]), 2)
    assert torch.allclose(adjust.offset, torch.log(torch.tensor([4 / 6, 2 / 6])))
    sample = adjust({"image": torch.zeros(1, 4, 4), "label": torch.tensor(1)})
    logits = torch.tensor([[0.5, -0.5]])
    batch = {"label": torch.tensor([1]), "logit_offset": sample["logit_offset"][None]}
    expected = torch.nn.functional.cross_entropy(logits + adjust.offset, torch.tensor([1]))
    assert torch.isclose(classification.loss(logits, batch), expected)
    assert not torch.isclose(classification.loss(logits, {"label": torch.tensor([1])}), expected)
    with pytest.raises(ConfigError, match="train.logit-adjust"):
        tiny_config(**{"train.logit-adjust": True})  # DP is on by default
    assert tiny_config(**{"train.logit-adjust": True, "privacy.enabled": False}).train.logit_adjust
