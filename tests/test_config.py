from pathlib import Path

import pytest

from medfed.config import Config, ConfigError, load_config, parse_override

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    config = load_config(path)
    assert config.run.rounds >= 1


def test_unknown_key_names_the_key_and_lists_accepted(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlearning-rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning-rate'.*lr"):
        load_config(path)


def test_unknown_section(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[trian]\nlr = 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[trian\]"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[run]\nstrategy = "fedsgd"\n', r"run.strategy = 'fedsgd' is invalid: expected one of \['fedavg'"),
        ("[run]\nrounds = 0\n", r"run.rounds = 0 is invalid: expected an integer in \[1, 10000\]"),
        ('[train]\nlr = "fast"\n', r"train.lr = 'fast' is invalid: expected a number"),
        ("[privacy]\nenabled = 1\n", r"privacy.enabled = 1 is invalid: expected true or false"),
        (
            "[model]\nwidth = 6\nnorm-groups = 4\n",
            r"model.norm-groups = 4 is invalid: expected a divisor of model.width",
        ),
        ('[data]\nsource = "medmnist"\n', r"data.path = '' is invalid"),
    ],
)
def test_bad_values_name_key_and_expectation(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_overrides_and_json_round_trip() -> None:
    config = Config().with_overrides({"run.rounds": 7, "train.lr": 1})
    assert config.run.rounds == 7 and config.train.lr == 1.0
    assert Config.from_json(config.to_json()) == config
    assert parse_override("train.optimizer=adam") == ("train.optimizer", "adam")
    assert parse_override("run.rounds=3") == ("run.rounds", 3)
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("rounds")
    with pytest.raises(ConfigError, match="unknown key 'run.round'"):
        Config().with_overrides({"run.round": 3})


def test_privacy_budget_defaults_to_target() -> None:
    assert Config().privacy.site_budget == 8.0
    assert Config().with_overrides({"privacy.budget": 20}).privacy.site_budget == 20.0


def test_train_settings_left_out_come_from_the_recipe_of_the_task_and_mode(tmp_path) -> None:
    from medfed.config import RECIPES, ConfigError, load_config

    path = tmp_path / "run.toml"
    path.write_text('[run]\ntask = "segmentation"\n[train]\nlr = 0.01\nschedule = "auto"\n')
    private = load_config(path)
    dp_recipe = RECIPES[("segmentation", True)]
    assert private.train.lr == 0.01  # set in the file
    assert private.train.optimizer == dp_recipe["optimizer"] and private.train.schedule == dp_recipe["schedule"]
    assert "lr" not in private.train.recipe and "schedule" in private.train.recipe
    # switching DP off switches the recipe, not the explicit lr
    plain = private.with_overrides({"privacy.enabled": False})
    assert plain.train.optimizer == RECIPES[("segmentation", False)]["optimizer"] and plain.train.lr == 0.01
    assert plain.to_dict()["train"]["optimizer"] == "auto"
    assert plain.to_public_dict()["train"]["optimizer"] == RECIPES[("segmentation", False)]["optimizer"]
    path.write_text("[train]\nrecipe = []\n")
    with pytest.raises(ConfigError, match="train.recipe"):
        load_config(path)


def test_model_names_are_checked_per_task() -> None:
    from medfed.config import MODEL_NAMES, ConfigError

    assert Config().model.name == MODEL_NAMES["classification"][0]
    with pytest.raises(ConfigError, match="model.name"):
        Config.from_dict({"run": {"task": "segmentation"}, "model": {"name": "resnet18"}})
