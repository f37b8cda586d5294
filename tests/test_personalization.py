"""Personal models (run.personalization): FedBN, local fine-tuning and Ditto, on tiny simulated sites."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from typer.testing import CliRunner

from medfed import wire
from medfed.config import Config, ConfigError
from medfed.data import load_simulated_site, write_site
from medfed.federation import initial_model, run_federation, run_key
from medfed.personalization import latest_personal_model, norm_keys, personal_model_path, privacy_shape
from medfed.privacy import PrivacyLedger, plan_privacy
from medfed.site import handle_train
from medfed.tasks import get_task
from medfed.weights import load_checkpoint, model_to_arrays
from tests.conftest import tiny_config
from tests.test_federation import InProcessGrid

pytestmark = pytest.mark.usefixtures("task_identity")
TWO_SITES = {0: {"partition-id": 0}, 1: {"partition-id": 1}}


def _tiny(mode: str, **overrides: object) -> Config:
    base = {
        "run.personalization": mode,
        "run.finetune-steps": 3,
        "data.image-size": 16,
        "data.samples-per-site": 30,
        "train.local-steps": 2,
        "evaluation.replicates": 20,
        "privacy.enabled": False,
        "evaluation.cross-site": False,
        "evaluation.example-images": 0,
    }
    return tiny_config(**base | overrides)


def _run(config: Config, out: Path) -> dict[str, Any]:
    return run_federation(InProcessGrid(TWO_SITES), config, out / "run", simulation_state_root=out / "state")


def _personal(out: Path, config: Config, site: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(personal_model_path(out / "state" / site, run_key(config)))[0]


@pytest.fixture(scope="module", params=["fedbn", "finetune", "ditto"])
def federation(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Federation:
    """A 2-round federation of two 16 px simulated sites with each personalization (Ditto with
    the cross-site matrix)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    mode = request.param
    config = _tiny(mode, **{"evaluation.cross-site": mode == "ditto"})
    out = tmp_path_factory.mktemp(mode)
    return Federation(mode, config, _run(config, out), out)


@dataclass
class Federation:
    mode: str
    config: Config
    report: dict[str, Any]
    out: Path


def test_each_mode_reports_global_and_personal_per_site_with_intervals(federation: Federation) -> None:
    mode, config, report, tmp_path = federation.mode, federation.config, federation.report, federation.out
    personal = report["final"]["personalization"]
    assert personal["method"] == mode and set(personal["per_site"]) == set(report["sites"])
    for site, entry in personal["per_site"].items():
        for model in ("global", "personal"):
            cell = entry[model]
            assert cell["low"] <= cell["value"] <= cell["high"], (site, model, cell)
        assert math.isclose(entry["global"]["value"], report["final"]["per_site"][site]["auroc"], abs_tol=1e-9)
        assert math.isclose(entry["personal"]["value"], personal["metrics"][site]["auroc"], abs_tol=1e-9)
        assert math.isclose(entry["gain"]["value"], entry["personal"]["value"] - entry["global"]["value"])
    global_model = load_checkpoint(tmp_path / "run" / "checkpoints" / "global.safetensors")[0]
    for site in report["sites"]:
        kept = _personal(tmp_path, config, site)
        assert any(not torch.equal(kept[k], global_model[k]) for k in kept), "the personal model is the global one"
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Personal models" in page
    if mode == "ditto":
        cross = report["final"]["cross_site"]
        assert cross["models"][-1] == "personal"
        assert cross["matrix"][-1] == [personal["metrics"][s]["auroc"] for s in cross["sites"]]


def test_fedbn_keeps_normalisation_layers_at_each_site(federation: Federation) -> None:
    if federation.mode != "fedbn":
        pytest.skip("FedBN only")
    config, tmp_path = federation.config, federation.out
    start = initial_model(config).state_dict()
    norms = norm_keys(initial_model(config))
    assert norms, "the tiny model has normalisation layers"
    global_model = load_checkpoint(tmp_path / "run" / "checkpoints" / "global.safetensors")[0]
    names = sorted(p.name for p in (tmp_path / "state").iterdir())
    alpha, beta = (_personal(tmp_path, config, site) for site in names)
    for key in norms:  # never aggregated: the global model keeps its starting layers, each site its own
        assert torch.equal(global_model[key], start[key])
    assert any(not torch.equal(alpha[k], start[k]) for k in norms)
    assert any(not torch.equal(alpha[k], beta[k]) for k in norms)
    for key in set(global_model) - norms:  # the rest of a personal model is the global model
        assert torch.equal(alpha[key], global_model[key]) and torch.equal(beta[key], global_model[key])


def _request(config: Config, phase: str, arrays: Any = None) -> Message:
    arrays = arrays or model_to_arrays(get_task(config.run.task).build_model(config))
    settings = {wire.PHASE: phase, wire.SERVER_ROUND: 1, wire.RUN_KEY: "run-1"}
    record = wire.request_config(config, "", "run-1", settings)
    return Message(content=RecordDict({wire.ARRAYS: arrays, wire.CONFIG: record}), dst_node_id=1,
                   message_type=MessageType.TRAIN)  # fmt: skip


def test_fine_tuning_is_charged_to_the_ledger_and_refused_past_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("medfed.privacy._calibrate", lambda *_: 1.0)  # a fixed σ: the charges are what is tested
    config = _tiny("finetune", **{"privacy.enabled": True, "run.rounds": 1, "run.finetune-steps": 4})
    state = tmp_path / "state"
    node = {"partition-id": 0}

    def send(phase: str, budget: float | None = None) -> Message:
        msg = _request(config, phase)
        msg.content.config_records[wire.CONFIG][wire.STATE_ROOT] = str(state)
        return handle_train(msg, node if budget is None else {**node, "privacy-budget": budget}, run_id=1)

    trained = send(wire.PHASE_FEDERATED)
    assert trained.content["site"]["status"] == "ok"
    spent = trained.content["metrics"]["epsilon"]
    refused = send(wire.PHASE_PERSONALIZE, budget=spent * 1.0001)
    assert refused.content["site"]["status"] == "refused"
    assert "privacy budget exhausted" in refused.content["site"]["reason"]
    tuned = send(wire.PHASE_PERSONALIZE)
    assert tuned.content["site"]["status"] == "ok" and "arrays" not in tuned.content
    assert tuned.content["metrics"]["steps"] == 4
    assert tuned.content["metrics"]["epsilon"] > spent
    site = next(state.iterdir())
    ledger = json.loads((site / "privacy.json").read_text())
    assert sum(h[2] for h in ledger["history"]) == 2 + 4  # one round's 2 steps, then the 4 fine-tuning steps
    assert PrivacyLedger.open(site, ledger["delta"]).epsilon() == pytest.approx(tuned.content["metrics"]["epsilon"])


def _ditto_distance(tmp_path: Path, ditto_lambda: float) -> float:
    config = _tiny("ditto", **{"run.ditto-lambda": ditto_lambda, "train.lr": 0.1})
    received = model_to_arrays(get_task(config.run.task).build_model(config))
    msg = _request(config, wire.PHASE_FEDERATED, received)
    state = tmp_path / f"lambda-{ditto_lambda}"
    msg.content.config_records[wire.CONFIG][wire.STATE_ROOT] = str(state)
    reply = handle_train(msg, {"partition-id": 0}, run_id=1)
    assert reply.content["site"]["status"] == "ok"
    kept = load_checkpoint(personal_model_path(next(state.iterdir()), "run-1"))[0]
    sent = received.to_torch_state_dict()
    return sum(float((kept[k].float() - sent[k].float()).norm() ** 2) for k in sent) ** 0.5


def test_ditto_regulariser_pulls_the_personal_model_toward_the_global_one(tmp_path: Path) -> None:
    loose, tight = _ditto_distance(tmp_path, 0.01), _ditto_distance(tmp_path, 10_000.0)
    assert loose > 0
    assert tight < 0.05 * loose  # λ → ∞: the personal model is the global one


def test_ditto_and_fine_tuning_steps_are_in_the_privacy_plan() -> None:
    def steps(mode: str) -> int:
        config = _tiny(mode, **{"privacy.enabled": True, "run.rounds": 2, "run.finetune-steps": 5})
        return plan_privacy(40, 16, 2, 8.0, local_steps=2, **privacy_shape(config)).run_steps

    assert steps("none") == 4 and steps("fedbn") == 4
    assert steps("ditto") == 8 and steps("finetune") == 9


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("run.personalization", "fedper"),
        ("run.finetune-steps", 0),
        ("run.finetune-steps", 2.5),
        ("run.ditto-lambda", 0.0),
        ("run.ditto-lambda", float("nan")),
        ("run.ditto-lambda", "strong"),
    ],
)
def test_bad_personalization_settings_are_refused_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Config().with_overrides({key: value})


def test_fedbn_without_normalisation_layers_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"run\.personalization.*fedbn"):
        Config().with_overrides({"run.personalization": "fedbn", "model.norm": "none"})
    tabular = {"run.task": "tabular", "data.source": "synthetic", "run.personalization": "fedbn"}
    with pytest.raises(ConfigError, match=r"run\.personalization.*fedbn"):  # an MLP: no norm setting, no norm layers
        Config().with_overrides(tabular)


def test_evaluate_and_predict_take_a_sites_personal_model(federation: Federation, tmp_path: Path) -> None:
    from medfed.cli import app

    if federation.mode != "finetune":
        pytest.skip("one personalization is enough")
    config = federation.config
    name, data = load_simulated_site(config, 0)
    site_dir = write_site(tmp_path / "site", data)
    state = federation.out / "state" / name
    assert latest_personal_model(state) == personal_model_path(state, run_key(config))
    runner = CliRunner()
    out = tmp_path / "scored"
    result = runner.invoke(app, ["evaluate", "--site-model", str(state), "--data", str(site_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "auroc" in json.loads((out / "metrics.json").read_text())
    image = next(p for p in sorted(site_dir.rglob("*.png")))
    result = runner.invoke(app, ["predict", "--site-model", str(state), "--input", str(image), "--out",
                                 str(tmp_path / "calls")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "calls" / "predictions.csv").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["evaluate", "--site-model", str(empty), "--data", str(site_dir)])
    assert result.exit_code != 0 and "no personal model" in result.output
    result = runner.invoke(app, ["evaluate", "--data", str(site_dir)])
    assert result.exit_code != 0


def test_no_personal_model_is_evaluated_when_the_site_has_none(tmp_path: Path) -> None:
    config = _tiny("ditto")
    msg = _request(config, wire.PHASE_FEDERATED)
    record = msg.content.config_records[wire.CONFIG]
    evaluate = Message(
        content=RecordDict({wire.ARRAYS: msg.content.array_records[wire.ARRAYS],
                            wire.CONFIG: ConfigRecord({**record, wire.SPLIT: "test", wire.PERSONAL: True,
                                                       wire.STATE_ROOT: str(tmp_path)})}),
        dst_node_id=1, message_type=MessageType.EVALUATE,
    )  # fmt: skip
    from medfed.site import handle_evaluate

    reply = handle_evaluate(evaluate, {"partition-id": 0})
    assert reply.content["site"]["status"] == "refused"


def test_a_run_without_personalization_makes_no_personal_model(tmp_path: Path) -> None:
    config = _tiny("none")
    msg = _request(config, wire.PHASE_PERSONALIZE)
    msg.content.config_records[wire.CONFIG][wire.STATE_ROOT] = str(tmp_path)
    reply = handle_train(msg, {"partition-id": 0}, run_id=1)
    assert reply.content["site"]["status"] == "refused"
    assert not list(tmp_path.rglob("personal-*"))
