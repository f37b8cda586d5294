"""A generated corpus of hostile settings, config files, privacy ledgers and manifests: each is
refused with a clear error that names the key, option or file (exit code 2 for usage and config
errors, 1 for data and state errors), and none ends in a traceback, a hang or silent acceptance.
Copies of an image in a training split are the one accepted case: they count as one privacy unit.
Plus property-based tests (hypothesis) of config loading, overrides and ledger reading."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from flwr.app import MessageType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.main import get_command

from medfed.cli import app as typer_app
from medfed.config import Config, ConfigError, load_config, parse_override
from medfed.privacy import LEDGER_FILE, LedgerError, PrivacyLedger, plan_privacy
from tests.conftest import time_limit

app = get_command(typer_app)  # built once: Typer builds the command anew at every invoke (0.3 s)
runner = CliRunner()
HUGE_TEXT = "x" * 5_000_000


@pytest.fixture(autouse=True)
def _no_hang() -> Iterator[None]:
    """Any single case taking over 60 s is a hang."""
    with time_limit(60, "a hostile input"):
        yield


def _text(output: str) -> str:
    """Command output with its line wrapping undone (a console wraps at its width)."""
    return " ".join(output.split())


def _keys(kinds: tuple[type, ...]) -> list[str]:
    """Every ``section.key`` of the config whose type is one of ``kinds``."""
    keys = []
    for section in dataclasses.fields(Config):
        section_cls = typing.get_type_hints(Config)[section.name]
        for name, hint in typing.get_type_hints(section_cls).items():
            if hint in kinds and name != "recipe":
                keys.append(f"{section.name}.{name.replace('_', '-')}")
    return keys


NUMERIC_KEYS = _keys((int, float))
TEXT_KEYS = _keys((str,))
INT_KEYS = set(_keys((int,)))


def _as_raw(dotted: str, value: object) -> dict:
    section, key = dotted.split(".", 1)
    return {section: {key: value}}


def _refused(raw: dict, key: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        Config.from_dict(raw)
    message = str(caught.value)
    assert key in message and len(message) < 600, message
    return caught.value


# 1. every numeric key with values that must always be refused
NUMERIC_VALUES: dict[str, object] = {
    "nan": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
    "negative": -1,
    "huge": 10**30,
    "huge-float": 1e308,
    "beyond-float": 10**400,
    "text": "1",
    "bool": True,
    "list": [1],
    "table": {"a": 1},
}


@pytest.mark.parametrize("value_id", list(NUMERIC_VALUES))
@pytest.mark.parametrize("key", NUMERIC_KEYS)
def test_numeric_key_refuses_hostile_value(key: str, value_id: str) -> None:
    error = _refused(_as_raw(key, NUMERIC_VALUES[value_id]), key)
    assert error.key == key


@pytest.mark.parametrize("key", NUMERIC_KEYS)
def test_numeric_key_at_zero_or_fraction_loads_or_names_the_key(key: str) -> None:
    """0 (and 0.5 for an integer key) is valid for some keys: then it loads, else it is refused."""
    for value in (0, 0.5) if key in INT_KEYS else (0,):
        try:
            Config.from_dict(_as_raw(key, value))
        except ConfigError as err:
            assert err.key == key, err


# 2. every text key with what must be refused; markup is text like any other
TEXT_VALUES: dict[str, object] = {
    "huge": HUGE_TEXT,
    "nul": "a\x00b",
    "escape-code": "\x1b[31mred",
    "newline": "two\nlines",
    "tab": "a\tb",
    "delete": "a\x7f",
    "markup-and-control": "[/][bold]\x00",
    "number": 5,
    "list": ["a"],
    "table": {"a": "b"},
}


@pytest.mark.parametrize("value_id", list(TEXT_VALUES))
@pytest.mark.parametrize("key", TEXT_KEYS)
def test_text_key_refuses_hostile_value(key: str, value_id: str) -> None:
    error = _refused(_as_raw(key, TEXT_VALUES[value_id]), key)
    assert error.key == key


@pytest.mark.parametrize(
    "value",
    [["a", "a"], ["a\x00", "b"], ["x" * 1000, "b"], ["a"] * 5000, [1, 2], "ab"],
    ids=["repeated", "control", "long", "too-many", "numbers", "text"],
)
def test_class_names_refuse_hostile_lists(value: object) -> None:
    _refused({"data": {"class-names": value, "num-classes": 2}}, "data.class-names")


def test_markup_in_the_run_name_is_plain_text() -> None:
    assert Config.from_dict({"run": {"name": "[/]run [bold]one"}}).run.name == "[/]run [bold]one"


# 3. structure: sections, keys and whole configs of the wrong shape
STRUCTURES: dict[str, tuple[object, str]] = {
    "not-a-table": ([1, 2], "table of sections"),
    "section-not-table": ({"run": 5}, "[run]"),
    "section-list": ({"train": [{"lr": 1}]}, "[train]"),
    "unknown-section": ({"trian": {}}, "unknown section"),
    "huge-section-name": ({HUGE_TEXT: {}}, "unknown section"),
    "control-section-name": ({"run\x1b[2J": {}}, "unknown section"),
    "number-section-name": ({1: {}, "run": {}}, "unknown section"),
    "unknown-key": ({"run": {"round": 3}}, "unknown key 'run.round'"),
    "huge-key": ({"run": {HUGE_TEXT: 1}}, "unknown key"),
    "number-key": ({"run": {1: 1}}, "unknown key"),
    "recipe-key": ({"train": {"recipe": []}}, "train.recipe"),
    "task-unhashable": ({"run": {"task": ["classification"]}}, "run.task"),
    "task-unknown": ({"run": {"task": "regression"}}, "run.task"),
    "deep-list": ({"run": {"rounds": json.loads("[" * 200 + "]" * 200)}}, "run.rounds"),
    "ct-window-inf": ({"data": {"ct-window": [-math.inf, math.inf]}}, "data.ct-window"),
    "ct-window-nan": ({"data": {"ct-window": [math.nan, 1]}}, "data.ct-window"),
    "ct-window-three": ({"data": {"ct-window": [1, 2, 3]}}, "data.ct-window"),
    "spacing-inf": ({"data": {"target-spacing": [math.inf, 1]}}, "data.target-spacing"),
    "spacing-tiny": ({"data": {"target-spacing": [1e-300, 1e-300]}}, "data.target-spacing"),
    "spacing-many": ({"data": {"target-spacing": [1.0] * 10_000}}, "data.target-spacing"),
    "epsilon-tiny": ({"privacy": {"target-epsilon": 1e-300}}, "privacy.target-epsilon"),
    "epsilon-large": ({"privacy": {"target-epsilon": 1000}}, "privacy.target-epsilon"),
    "delta-one": ({"privacy": {"delta": 1.0}}, "privacy.delta"),
    "delta-large": ({"privacy": {"delta": 0.5}}, "privacy.delta"),
    "lr-large": ({"train": {"lr": 100}}, "train.lr"),
    "clip-large": ({"privacy": {"max-grad-norm": 1e4}}, "privacy.max-grad-norm"),
    "classes-million": ({"data": {"num-classes": 1_000_000}}, "data.num-classes"),
    "image-size-huge": ({"data": {"image-size": 100_000}}, "data.image-size"),
    "image-size-3d": ({"data": {"image-size": 2048, "spatial-dims": 3}}, "data.image-size"),
    "seed-negative": ({"run": {"seed": -5}}, "run.seed"),
    "model-name-markup": ({"model": {"name": "[/]"}}, "model.name"),
    "site-level-dp-under-secure-aggregation": (
        {
            "run": {"secure-aggregation": True},
            "privacy": {"enabled": True, "level": "sample+site"},
            "evaluation": {"cross-site": False},
        },
        "privacy.level",
    ),
    # each task's own rules (its check_config hook)
    "classification-one-class": ({"data": {"num-classes": 1}}, "data.num-classes"),
    "classification-views-without-augment": ({"train": {"augmentations": 4}}, "train.augmentations"),
    "classification-logit-adjust-under-dp": (
        {"train": {"logit-adjust": True}, "privacy": {"enabled": True}},
        "train.logit-adjust",
    ),
    "segmentation-one-class": ({"run": {"task": "segmentation"}, "data": {"num-classes": 1}}, "data.num-classes"),
    "segmentation-views-without-patches": (
        {"run": {"task": "segmentation"}, "train": {"augmentations": 4}},
        "train.augmentations",
    ),
    "segmentation-logit-adjust": (
        {"run": {"task": "segmentation"}, "train": {"logit-adjust": True}},
        "train.logit-adjust",
    ),
    "detection-spacing": (
        {"run": {"task": "detection"}, "data": {"target-spacing": [1.0, 1.0]}},
        "data.target-spacing",
    ),
    "detection-logit-adjust": ({"run": {"task": "detection"}, "train": {"logit-adjust": True}}, "train.logit-adjust"),
}


@pytest.mark.parametrize("case", list(STRUCTURES))
def test_config_of_the_wrong_shape_is_refused(case: str) -> None:
    raw, expected = STRUCTURES[case]
    with pytest.raises(ConfigError) as caught:
        Config.from_dict(raw)  # type: ignore[arg-type]
    assert expected in str(caught.value) and len(str(caught.value)) < 600


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[" * 100_000 + "]" * 100_000,
        "[1, 2]",
        "null",
        '{"run": {"rounds": NaN}}',
        '{"run": {"rounds": 1e999}}',
    ],
    ids=["garbage", "deep", "list", "null", "nan", "overflow"],
)
def test_a_json_config_from_the_wire_is_refused_cleanly(text: str) -> None:
    with pytest.raises(ConfigError):
        Config.from_json(text)


# 4. --set forms, through the command line: exit 2, the key or the form named, no traceback
CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "classification-synthetic.toml")
OVERRIDES: dict[str, tuple[str, str]] = {
    "no-equals": ("run.rounds", "section.key=value"),
    "no-key": ("=5", "section.key=value"),
    "no-dot": ("rounds=5", "section.key"),
    "empty-key": ("run.=5", "section.key"),
    "empty-section": (".rounds=5", "unknown section"),
    "empty-value": ("run.rounds=", "run.rounds"),
    "deep-value": ("run.rounds=" + "[" * 100_000, "run.rounds"),
    "nan": ("run.rounds=nan", "run.rounds"),
    "inf-lr": ("train.lr=inf", "train.lr"),
    "neg-inf-epsilon": ("privacy.target-epsilon=-inf", "privacy.target-epsilon"),
    "tiny-epsilon": ("privacy.target-epsilon=1e-300", "privacy.target-epsilon"),
    "huge-epsilon": ("privacy.target-epsilon=1e308", "privacy.target-epsilon"),
    "overflow": ("train.lr=1e400", "train.lr"),
    "inf-clip": ("privacy.max-grad-norm=inf", "privacy.max-grad-norm"),
    "delta-one": ("privacy.delta=1", "privacy.delta"),
    "quoted-number": ('run.rounds="3"', "run.rounds"),
    "classes": ("data.num-classes=1000000", "data.num-classes"),
    "huge-name": ("run.name=" + "n" * 1_000_000, "run.name"),
    "markup-name": ("run.name=[/]\x07", "run.name"),
    "nested-key": ("run.rounds.x=1", "unknown key"),
    "unknown-section": ("nosuch.key=1", "unknown section"),
    "table-value": ("run.rounds={a=1}", "run.rounds"),
}


@pytest.mark.parametrize("case", list(OVERRIDES))
def test_set_override_is_refused_with_exit_2(case: str) -> None:
    text, expected = OVERRIDES[case]
    result = runner.invoke(app, ["simulate", CONFIG, "--set", text])
    assert result.exit_code == 2, result.output[-2000:]
    assert expected in _text(result.output) and "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert len(result.output) < 5000


# 5. config files: encodings, structure, size, and what is not a file
def _deep_tables(path: Path) -> None:
    path.write_text("[" + ".".join(["a"] * 5000) + "]\nv = 1\n")


CONFIG_FILES: dict[str, tuple[bytes | Callable[[Path], None], str]] = {
    "latin-1": ('[run]\nname = "café"\n'.encode("latin-1"), "UTF-8"),
    "utf-16": ("[run]\nrounds = 2\n".encode("utf-16"), "UTF-8"),
    "bom-then-invalid": (b"\xef\xbb\xbf[run]\nrounds = 0\n", "run.rounds"),
    "binary": (bytes(range(256)) * 20, "UTF-8"),
    "nul-bytes": (b'[run]\nname = "a\x00b"\n', "TOML"),
    "deep-array": (b"v = " + b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "deep-inline-table": (b"v = " + b"{a = " * 50_000 + b"1" + b"}" * 50_000, "TOML"),
    "deep-tables": (_deep_tables, "unknown section"),
    "too-large": (b"# " + b"x" * 2_000_000 + b"\n", "too large"),
    "duplicate-key": (b"[run]\nrounds = 2\nrounds = 3\n", "TOML"),
    "section-is-value": (b"run = 5\n", "[run]"),
    "array-of-tables": (b"[[run]]\nrounds = 2\n", "[run]"),
    "inf-literal": (b"[privacy]\ntarget-epsilon = inf\n", "privacy.target-epsilon"),
    "nan-literal": (b"[train]\nlr = nan\n", "train.lr"),
    "control-key": (b'[run]\n"a\\u0000" = 1\n', "unknown key"),
    "huge-string": (b'[run]\nname = "' + b"n" * 900_000 + b'"\n', "run.name"),
    "escaped-control-value": (b'[run]\nname = "\\u001b[2J"\n', "run.name"),
}


def _config_file(tmp_path: Path, case: str) -> Path:
    content, _ = CONFIG_FILES[case]
    path = tmp_path / "run.toml"
    if callable(content):
        content(path)
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("case", list(CONFIG_FILES))
def test_hostile_config_file_is_refused(tmp_path: Path, case: str) -> None:
    path = _config_file(tmp_path, case)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert CONFIG_FILES[case][1] in str(caught.value) and len(str(caught.value)) < 600


@pytest.mark.parametrize("case", ["latin-1", "binary", "deep-array", "too-large", "huge-string", "inf-literal"])
def test_hostile_config_file_exits_2_from_the_command_line(tmp_path: Path, case: str) -> None:
    path = _config_file(tmp_path, case)
    for args in (["simulate", str(path)], ["privacy", "plan", "--site-size", "10", "--config", str(path)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output[-2000:]


@pytest.mark.parametrize("kind", ["folder", "missing", "empty", "whitespace-only"])
def test_config_path_that_is_not_a_config(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "run.toml"
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_text("")
    elif kind == "whitespace-only":
        path.write_text("\n  \n\t\n")
    if kind in ("empty", "whitespace-only"):  # nothing set: the defaults, a valid config
        assert load_config(path) == Config.from_dict({})
        return
    with pytest.raises(ConfigError, match="folder, not a file" if kind == "folder" else "not found"):
        load_config(path)


# 6. `privacy plan` options: every numeric option out of range, never falsy-as-unset
PLAN_OPTIONS = ["--site-size", "--rounds", "--batch", "--epsilon", "--local-epochs", "--local-steps", "--delta"]
PLAN_VALUES = ["nan", "inf", "-inf", "0", "-1", "1e308", "99999999999999999999", "abc"]
VALID_PLAN_VALUES = {("--local-steps", "0"), ("--delta", "0")}  # local epochs; automatic δ


@pytest.mark.parametrize(
    ("option", "value"),
    [(option, value) for option in PLAN_OPTIONS for value in PLAN_VALUES if (option, value) not in VALID_PLAN_VALUES],
)
def test_privacy_plan_refuses_out_of_range_options(option: str, value: str) -> None:
    args = ["privacy", "plan", "--site-size", "100", option, value]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output[-2000:]
    assert option in _text(result.output) and "Traceback" not in result.output


def test_privacy_plan_delta_must_be_below_one_over_n() -> None:
    result = runner.invoke(app, ["privacy", "plan", "--site-size", "100", "--delta", "0.05"])
    assert result.exit_code == 2 and "--delta" in result.output and "1/n" in _text(result.output)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"units": 0},
        {"batch_size": 0},
        {"rounds": -1},
        {"target_epsilon": math.nan},
        {"target_epsilon": math.inf},
        {"target_epsilon": 1e308},
        {"delta": math.nan},
        {"delta": 1.0},
        {"local_steps": -1},
        {"local_epochs": 0},
        {"runs_per_round": 4},
        {"extra_steps": -1},
    ],
    ids=lambda kwargs: "-".join(f"{k}={v}" for k, v in kwargs.items()),
)
def test_plan_privacy_refuses_out_of_range_numbers(kwargs: dict) -> None:
    settings = {"units": 100, "batch_size": 8, "rounds": 2, "target_epsilon": 8.0, **kwargs}
    with pytest.raises(ValueError):
        plan_privacy(
            settings.pop("units"),
            settings.pop("batch_size"),
            settings.pop("rounds"),
            settings.pop("target_epsilon"),
            **settings,
        )


# 7. state folders and privacy ledgers: exit 1 naming the file, never "has not trained yet"
def _ledger(payload: object) -> Callable[[Path], None]:
    def write(state: Path) -> None:
        state.mkdir(parents=True, exist_ok=True)
        text = payload if isinstance(payload, (str, bytes)) else json.dumps(payload)
        (state / LEDGER_FILE).write_bytes(text if isinstance(text, bytes) else text.encode())

    return write


GOOD = {"delta": 1e-5, "accountant": "rdp", "history": [[1.0, 0.1, 10]], "calibrations": {"run": 1.0}}


def _with(**changes: object) -> dict:
    return {**GOOD, **changes}


def _folder_ledger(state: Path) -> None:
    (state / LEDGER_FILE).mkdir(parents=True)


def _state_is_file(state: Path) -> None:
    state.parent.mkdir(parents=True)
    state.write_text("not a folder")


def _state_under_file(state: Path) -> None:
    state.parent.mkdir(parents=True, exist_ok=True)
    (state.parent / "file").write_text("x")


def _fifo_ledger(state: Path) -> None:
    state.mkdir(parents=True)
    os.mkfifo(state / LEDGER_FILE)


def _dangling_ledger(state: Path) -> None:
    state.mkdir(parents=True)
    (state / LEDGER_FILE).symlink_to(state / "nowhere.json")


def _sparse_huge_ledger(state: Path) -> None:
    state.mkdir(parents=True)
    with (state / LEDGER_FILE).open("wb") as handle:
        handle.truncate(20_000_000)


LEDGERS: dict[str, Callable[[Path], None]] = {
    "folder": _folder_ledger,
    "state-is-file": _state_is_file,
    "state-under-file": _state_under_file,
    "fifo": _fifo_ledger,
    "dangling-link": _dangling_ledger,
    "huge": _sparse_huge_ledger,
    "empty": _ledger(""),
    "invalid-json": _ledger("{not json"),
    "non-utf8": _ledger(b"\xff\xfe{}"),
    "deep-json": _ledger("[" * 100_000 + "]" * 100_000),
    "json-list": _ledger([1, 2]),
    "json-null": _ledger("null"),
    "missing-history": _ledger({"delta": 1e-5, "accountant": "rdp", "calibrations": {}}),
    "delta-zero": _ledger(_with(delta=0)),
    "delta-one": _ledger(_with(delta=1)),
    "delta-nan": _ledger(json.dumps(_with(delta=math.nan))),
    "delta-text": _ledger(_with(delta="small")),
    "accountant-unknown": _ledger(_with(accountant="gdp")),
    "history-not-list": _ledger(_with(history={"a": 1})),
    "entry-short": _ledger(_with(history=[[1.0, 0.1]])),
    "entry-text": _ledger(_with(history=[["1", "0.1", "10"]])),
    "entry-bool": _ledger(_with(history=[[True, 0.1, 10]])),
    "negative-noise": _ledger(_with(history=[[-1.0, 0.1, 10]])),
    "zero-noise": _ledger(_with(history=[[0.0, 0.1, 10]])),
    "inf-noise": _ledger(json.dumps(_with(history=[[math.inf, 0.1, 10]]))),
    "rate-above-one": _ledger(_with(history=[[1.0, 2.0, 10]])),
    "negative-steps": _ledger(_with(history=[[1.0, 0.1, -10]])),
    "fractional-steps": _ledger(_with(history=[[1.0, 0.1, 1.5]])),
    "huge-steps": _ledger(_with(history=[[1.0, 0.1, 1e300]])),
    "calibration-negative": _ledger(_with(calibrations={"run": -2.0})),
    "calibrations-list": _ledger(_with(calibrations=[1.0])),
}


@pytest.mark.parametrize("case", list(LEDGERS))
def test_hostile_state_is_an_error_naming_the_file(tmp_path: Path, case: str) -> None:
    state = tmp_path / "site" / "state"
    LEDGERS[case](state)
    if case == "state-under-file":
        state = tmp_path / "site" / "file" / "state"
    with pytest.raises(LedgerError) as caught:
        PrivacyLedger.open(state, 1e-5)
    assert str(state) in str(caught.value)
    result = runner.invoke(app, ["site", "status", "--state-dir", str(state)])
    assert result.exit_code == 1, result.output[-2000:]
    text = _text(result.output)
    assert "has not trained" not in text and "Traceback" not in text
    assert "privacy.json" in text or "not a folder" in text


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\xff\xfe", 1),
        (b"state-dir = [", 1),
        (b"v = " + b"[" * 100_000, 1),
        (b'state-dir = "s"\nprivacy-budget = nan\n', 2),
        (b'state-dir = "s"\nprivacy-budget = -1\n', 2),
        (b'state-dir = "s"\nprivacy-budget = "lots"\n', 2),
        (b'state-dir = "s"\nprivacy-budget = true\n', 2),
    ],
    ids=["non-utf8", "invalid-toml", "deep", "budget-nan", "budget-negative", "budget-text", "budget-bool"],
)
def test_site_status_refuses_a_hostile_node_config(tmp_path: Path, content: bytes, expected: int) -> None:
    node_config = tmp_path / "node-config.toml"
    node_config.write_bytes(content)
    result = runner.invoke(app, ["site", "status", "--node-config", str(node_config)])
    assert result.exit_code == expected, result.output[-2000:]
    assert "Traceback" not in result.output


def test_simulate_refuses_an_unreadable_ledger_before_any_site_starts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _ledger("{not json")(state / "site-1")
    args = ["simulate", CONFIG, "--state-dir", str(state), "--out", str(tmp_path / "out")]
    result = runner.invoke(app, [*args, "--set", "data.samples-per-site=10"])
    text = _text(result.output)
    assert result.exit_code == 1 and "privacy.json" in text and "refusing to train" in text


@pytest.mark.parametrize("budget", [math.nan, math.inf, -1.0, 0.0, "lots", True])
def test_a_site_refuses_a_budget_that_is_not_a_finite_positive_number(budget: object) -> None:
    from medfed.site import site_budget

    with pytest.raises(ValueError, match="privacy-budget"):
        site_budget({"privacy-budget": budget}, Config())


# 8. manifests: a file on several rows is refused, naming it and the lines; copies are one privacy unit
def _png(path: Path, seed: int, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16)).astype(np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def _site(tmp_path: Path, rows: list[str], extra: Callable[[Path], None] | None = None) -> Path:
    site = tmp_path / "site"
    for k in range(6):
        _png(site / "images" / f"{k}.png", k)
    if extra is not None:
        extra(site)
    split = ["train"] * 4 + ["val", "test"]
    base = [f"images/{k}.png,{k % 2},{split[k]}" for k in range(6)]
    (site / "manifest.csv").write_text("\n".join(["image,label,split", *base, *rows]) + "\n")
    return site


def _copy_of_0(site: Path) -> None:
    (site / "images" / "copy.png").write_bytes((site / "images" / "0.png").read_bytes())


def _bmp_of_0(site: Path) -> None:
    _png(site / "images" / "same.bmp", 0, "BMP")


MANIFESTS: dict[str, list[str]] = {
    "row-twice": ["images/0.png,0,train"],
    "row-twice-other-spelling": ["./images/../images/0.png,0,train"],
    "row-in-train-and-test": ["images/0.png,0,test"],
    "row-many-times": [f"images/{k % 4}.png,0,train" for k in range(400)],
}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_an_image_on_several_rows_fails_the_check_naming_file_and_lines(tmp_path: Path, case: str) -> None:
    site = _site(tmp_path, MANIFESTS[case])
    result = runner.invoke(app, ["data", "check", str(site), "--image-size", "16"])
    assert result.exit_code == 1, result.output[-2000:]
    text = _text(result.output)
    assert "manifest.csv line 2: images/0.png is listed again on line(s) 8" in text and "privacy unit" in text


@pytest.mark.parametrize(("extra", "row"), [(_copy_of_0, "images/copy.png"), (_bmp_of_0, "images/same.bmp")])
def test_copies_of_an_image_in_training_are_one_privacy_unit(
    tmp_path: Path, extra: Callable[[Path], None], row: str
) -> None:
    site = _site(tmp_path, [f"{row},0,train"], extra)
    result = runner.invoke(app, ["data", "check", str(site), "--image-size", "16"])
    assert result.exit_code == 0, result.output[-2000:]
    text = _text(result.output)
    assert "1 image(s) are copies of another training image" in text
    assert "privacy unit: image (4 in train)" in text  # 5 training rows, 4 different images


def test_the_same_bytes_read_as_two_images_fail_the_check(tmp_path: Path) -> None:
    site = _site(tmp_path, ["images/copy.png,0,train,0.5"], _copy_of_0)
    manifest = site / "manifest.csv"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([lines[0] + ",spacing", *(f"{line},1.0" for line in lines[1:-1]), lines[-1]]) + "\n")
    config = tmp_path / "run.toml"
    config.write_text("[data]\nimage-size = 16\ntarget-spacing = [1.0, 1.0]\n")
    result = runner.invoke(app, ["data", "check", str(site), "--config", str(config)])
    assert result.exit_code == 1, result.output[-2000:]
    assert "holds the same bytes as line(s) 8 in the train split, read differently" in _text(result.output)


def test_identical_images_under_different_patients_merge_their_units() -> None:
    from medfed.data.arrays import SiteArrays

    images = np.random.default_rng(0).random((6, 1, 4, 4)).astype(np.float32)
    images[3], images[5] = images[0], images[1]
    site = SiteArrays(images, np.zeros(6, np.int64), np.array(["train"] * 6), np.array(list("aabccd")))
    unit, units = site.privacy_units()
    assert unit == "patient" and [u.tolist() for u in units] == [[0, 1, 3, 4, 5], [2]]
    assert [u.tolist() for u in site.privacy_units("train", "image")[1]] == [[0, 3], [1, 5], [2], [4]]


def test_a_site_without_training_rows_fails_the_check(tmp_path: Path) -> None:
    site = tmp_path / "site"
    for k in range(3):
        _png(site / "images" / f"{k}.png", k)
    (site / "manifest.csv").write_text("image,label,split\nimages/0.png,0,val\nimages/1.png,1,test\n")
    result = runner.invoke(app, ["data", "check", str(site), "--image-size", "16"])
    assert result.exit_code == 1 and "no training samples" in _text(result.output)


@pytest.mark.parametrize(
    ("option", "value"),
    [("--num-classes", "1000000"), ("--num-classes", "0"), ("--image-size", "0"), ("--image-size", "99999"),
     ("--spatial-dims", "7"), ("--channels", "0"), ("--task", "[/]"), ("--class-names", "a,a")],
)  # fmt: skip
def test_data_check_options_are_checked_before_reading(tmp_path: Path, option: str, value: str) -> None:
    result = runner.invoke(app, ["data", "check", str(tmp_path), option, value])
    assert result.exit_code == 2 and option in _text(result.output) and "Traceback" not in result.output


@pytest.mark.slow
def test_four_images_listed_10000_times_are_refused(tmp_path: Path) -> None:
    site = _site(tmp_path, [f"images/{k % 4}.png,{k % 2},train" for k in range(10_000)])
    result = runner.invoke(app, ["data", "check", str(site), "--image-size", "16"])
    assert result.exit_code == 1
    assert "listed again" in _text(result.output) and "10000 in train" not in result.output


# 9. a site whose update is not finite does not send it, and the run that aggregates nothing fails
@pytest.mark.slow  # DP training at a site: about 20 s on one core
def test_a_diverged_local_update_is_not_sent_and_stays_charged(
    site_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task_identity: None
) -> None:
    import torch

    import medfed.site
    from medfed.site import handle_train
    from tests.conftest import tiny_config
    from tests.test_site import _node, _request

    def diverge(task, model, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        stats = original(task, model, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).fill_(math.nan)
        return stats

    original = medfed.site.train
    monkeypatch.setattr(medfed.site, "train", diverge)
    config = tiny_config(**{"run.rounds": 1, "evaluation.cross-site": False})
    node = _node(site_dir, tmp_path)
    reply = handle_train(_request(config, MessageType.TRAIN), node, run_id=1)
    assert reply.content["site"]["status"] == "error" and "not sent" in reply.content["site"]["reason"]
    assert "arrays" not in reply.content
    spent = reply.content["metrics"]["epsilon"]
    assert spent > 0 and PrivacyLedger.open(node["state-dir"], 1e-5).epsilon() == pytest.approx(spent)


def test_a_run_that_aggregated_nothing_is_a_failure() -> None:
    from medfed.federation import untrained_reason

    report = {
        "config": {"run": {"min-sites": 2}},
        "rounds": [{"round": 0, "sites_aggregated": []}, {"round": 1, "sites_aggregated": []}],
        "site_notes": {"a": ["error: local training diverged"], "b": ["refused: privacy budget exhausted"]},
    }
    reason = untrained_reason(report)
    assert "no round aggregated an update" in reason and "a: error" in reason and "b: refused" in reason
    report["rounds"][1]["sites_aggregated"] = ["a", "b"]
    assert untrained_reason(report) == ""


def test_simulate_exits_1_when_no_update_was_aggregated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medfed.simulation

    def untrained(config: Config, out: Path, *_: object) -> dict:
        return {
            "config": config.to_public_dict(),
            "rounds": [{"round": 0, "sites_aggregated": []}, {"round": 1, "sites_aggregated": []}],
            "site_notes": {"site-1": ["error: ConfigError; details are in the site's log"]},
        }

    monkeypatch.setattr(medfed.simulation, "simulate", untrained)
    args = ["simulate", CONFIG, "--out", str(tmp_path / "out"), "--set", "data.samples-per-site=10"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output[-2000:]
    assert "no round aggregated" in _text(result.output)


# 10. properties: loading anything never raises anything but ConfigError / LedgerError
JSON_LIKE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
SECTION_KEYS = st.sampled_from([k.split(".", 1)[1] for k in NUMERIC_KEYS + TEXT_KEYS] + ["task", "x"])
CONFIG_DICTS = st.dictionaries(
    st.sampled_from(["run", "data", "model", "train", "privacy", "evaluation", "other"]),
    st.dictionaries(SECTION_KEYS, JSON_LIKE, max_size=4) | JSON_LIKE,
    max_size=4,
)


@settings(max_examples=100, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(raw=CONFIG_DICTS | JSON_LIKE)
def test_config_from_any_dict_is_a_config_or_a_config_error(raw: object) -> None:
    try:
        config = Config.from_dict(raw)  # type: ignore[arg-type]
    except ConfigError as err:
        assert len(str(err)) < 2000
    else:
        assert Config.from_json(config.to_json()) == config


@settings(max_examples=150, deadline=2000)
@given(text=st.text(max_size=60))
def test_any_override_text_parses_or_is_a_config_error(text: str) -> None:
    try:
        key, value = parse_override(text)
        Config().with_overrides({key: value})
    except ConfigError:
        pass


@settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=JSON_LIKE | st.fixed_dictionaries({"delta": JSON_LIKE, "accountant": JSON_LIKE, "history": JSON_LIKE,
                                                  "calibrations": JSON_LIKE}))  # fmt: skip
def test_any_ledger_file_opens_or_is_a_ledger_error(tmp_path: Path, payload: object) -> None:
    (tmp_path / LEDGER_FILE).write_text(json.dumps(payload))
    try:
        ledger = PrivacyLedger.open(tmp_path, 1e-5)
    except LedgerError as err:
        assert str(tmp_path / LEDGER_FILE) in str(err)
    else:
        assert all(math.isfinite(v) for entry in ledger.history for v in entry)
