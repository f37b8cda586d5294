"""The server loop against real site logic, over an in-process transport (no Ray, no network):
update validation, refusals, min-sites, strategies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message

from medfed.data import write_site
from medfed.federation import build_strategy, run_federation
from medfed.in_process import InProcessGrid
from medfed.run_folder import RunFolder
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("task_identity")


def test_poisoned_update_is_rejected_and_the_round_goes_on(nodes: dict, tmp_path: Path) -> None:
    def poison(node: int, reply: Message) -> None:
        if node == 12 and "arrays" in reply.content:
            arrays = reply.content["arrays"]
            reply.content["arrays"] = ArrayRecord(
                {k: torch.full_like(v, float("nan")) for k, v in arrays.to_torch_state_dict().items()}
            )

    config = tiny_config(**{"evaluation.cross-site": False})
    report = run_federation(InProcessGrid(nodes, poison), config, tmp_path / "out")
    for entry in report["rounds"][1:]:
        assert entry["sites_aggregated"] == ["alpha", "beta"]
    assert report["sites"] == ["alpha", "beta", "gamma"]
    final = report["final"]["per_site"]
    assert all(np.isfinite(m["loss"]) for m in final.values())


def test_a_site_out_of_budget_is_skipped_but_the_federation_continues(nodes: dict, tmp_path: Path) -> None:
    nodes[11]["privacy-budget"] = 0.05
    config = tiny_config(**{"evaluation.cross-site": False})
    report = run_federation(InProcessGrid(nodes), config, tmp_path / "out")
    assert all(entry["sites_aggregated"] == ["alpha", "gamma"] for entry in report["rounds"][1:])
    assert report["privacy"]["beta"]["epsilon"] == 0.0
    assert report["privacy"]["beta"]["budget"] == 0.05
    assert 0 < report["privacy"]["alpha"]["epsilon"] <= 8.0


def test_too_few_usable_updates_keep_the_global_model(nodes: dict, tmp_path: Path) -> None:
    for node in (11, 12):
        nodes[node]["privacy-budget"] = 0.05
    config = tiny_config(**{"evaluation.cross-site": False, "run.rounds": 1})
    report = run_federation(InProcessGrid(nodes), config, tmp_path / "out")
    assert report["rounds"][1]["sites_aggregated"] == []
    before, after = report["rounds"][0]["metrics"], report["rounds"][1]["metrics"]
    assert {s: m["loss"] for s, m in after.items()} == {s: m["loss"] for s, m in before.items()}


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
def test_other_strategies_train(nodes: dict, tmp_path: Path, strategy: str) -> None:
    for node in nodes.values():
        node["allow-training-without-privacy"] = True
    config = tiny_config(
        **{
            "run.strategy": strategy,
            "run.proximal-mu": 0.1,
            "run.rounds": 2,
            "evaluation.cross-site": False,
            "privacy.enabled": False,
        }
    )
    assert type(build_strategy(config)).__name__.lower() == strategy
    report = run_federation(InProcessGrid(nodes), config, tmp_path / "out")
    # round 2 too: FedAdam's float64 result is cast back, so float32 updates still validate
    for entry in report["rounds"][1:]:
        assert entry["sites_aggregated"] == ["alpha", "beta", "gamma"]
    losses = [{s: m["loss"] for s, m in r["metrics"].items()} for r in report["rounds"]]
    assert losses[0] != losses[1] != losses[2]
    assert report["privacy"] == {}


def test_sites_refuse_a_run_without_privacy_unless_they_allow_it(nodes: dict, tmp_path: Path) -> None:
    nodes[10]["allow-training-without-privacy"] = True
    config = tiny_config(
        **{"evaluation.cross-site": False, "run.rounds": 1, "privacy.enabled": False, "run.min-sites": 1}
    )
    report = run_federation(InProcessGrid(nodes), config, tmp_path / "out")
    assert report["rounds"][1]["sites_aggregated"] == ["alpha"]


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda reply: reply.content["metrics"].__setitem__("num-examples", -99.0),
        lambda reply: reply.content["metrics"].__setitem__("num-examples", 0.0),
        lambda reply: reply.content["metrics"].__setitem__("num-examples", float("nan")),
        lambda reply: reply.content["metrics"].__setitem__("local-seconds", [1.0, 2.0]),
        lambda reply: reply.content.__delitem__("site"),
        lambda reply: reply.content.__delitem__("arrays"),
    ],
    ids=["negative-count", "zero-count", "nan-count", "list-metric", "no-site", "no-arrays"],
)
def test_malformed_replies_are_left_out_without_crashing(nodes: dict, tmp_path: Path, corrupt) -> None:
    def tamper(node: int, reply: Message) -> None:
        if node == 11 and reply.content.get("site") is not None and "arrays" in reply.content:
            corrupt(reply)

    for node in nodes.values():  # privacy off here: this is about screening, and it is faster
        node["allow-training-without-privacy"] = True
    config = tiny_config(**{"evaluation.cross-site": False, "run.rounds": 1, "privacy.enabled": False})
    report = run_federation(InProcessGrid(nodes, tamper), config, tmp_path / "out")
    aggregated = report["rounds"][1]["sites_aggregated"]
    assert len(aggregated) == 2 and "beta" not in aggregated


def test_cross_site_matrix_and_checkpoints(nodes: dict, tmp_path: Path) -> None:
    report = run_federation(InProcessGrid(nodes), tiny_config(**{"run.rounds": 1}), tmp_path / "out")
    cross = report["final"]["cross_site"]
    assert cross["models"] == ["alpha", "beta", "gamma", "global"]
    assert np.asarray(cross["matrix"], dtype=float).shape == (4, 3)
    meta = json.loads(RunFolder(tmp_path / "out").round_model(1).with_suffix(".json").read_text())
    assert meta["round"] == 1 and meta["config"]["run"]["rounds"] == 1
    # the local-only baselines spend from the same ledger and stay within the budget
    assert all(p["epsilon"] <= p["budget"] + 1e-6 for p in report["privacy"].values())


def test_segmentation_federation_with_dp(tmp_path: Path) -> None:
    from medfed.data.synthetic import synthetic_segmentation_site

    nodes = {}
    for i, name in enumerate(["alpha", "beta"]):
        folder = write_site(tmp_path / "data" / name, synthetic_segmentation_site(i, 40, image_size=32, seed=2))
        nodes[i] = {"data-path": str(folder), "site-name": name, "state-dir": str(tmp_path / "state" / name)}
    config = tiny_config(**{"run.task": "segmentation", "data.image-size": 32, "run.rounds": 1})
    report = run_federation(InProcessGrid(nodes), config, tmp_path / "out")
    assert report["primary_metric"] == "dice"
    assert report["rounds"][1]["sites_aggregated"] == ["alpha", "beta"]
    assert {"dice", "iou", "hd95"} <= set(report["final"]["per_site"]["alpha"])
    assert report["final"]["cross_site"]["models"] == ["alpha", "beta", "global"]
    assert all(0 < p["epsilon"] <= p["budget"] + 1e-6 for p in report["privacy"].values())


def test_compressed_updates_shrink_uploads_and_still_train(nodes: dict, tmp_path: Path) -> None:
    for node in nodes.values():
        node["allow-training-without-privacy"] = True
    reports = {}
    for kind in ("none", "int8"):
        config = tiny_config(
            **{
                "run.rounds": 1,
                "evaluation.cross-site": False,
                "privacy.enabled": False,
                "run.update-compression": kind,
            }
        )
        reports[kind] = run_federation(InProcessGrid(nodes), config, tmp_path / kind)
    plain, packed = reports["none"]["rounds"][1], reports["int8"]["rounds"][1]
    assert packed["sites_aggregated"] == plain["sites_aggregated"] == ["alpha", "beta", "gamma"]
    assert packed["bytes_up"] < 0.65 * plain["bytes_up"]  # 1 byte for 4, plus a 128-byte header per small tensor
    for site, metrics in reports["none"]["final"]["per_site"].items():
        assert reports["int8"]["final"]["per_site"][site]["loss"] == pytest.approx(metrics["loss"], rel=0.05)
