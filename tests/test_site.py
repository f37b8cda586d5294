"""A site's ClientApp logic in its own process, as hospital IT runs it (node_config with data-path)."""

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from medfed import wire
from medfed.site import handle_evaluate, handle_train
from medfed.tasks import get_task
from medfed.weights import model_to_arrays
from tests.conftest import tiny_config


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _request(config, message_type: str, **extra) -> Message:
    arrays = model_to_arrays(get_task(config.run.task).build_model(config))
    record = ConfigRecord({wire.MEDFED_CONFIG: config.to_json(), wire.STATE_ROOT: "/nonexistent", **extra})
    return Message(
        content=RecordDict({wire.ARRAYS: arrays, wire.CONFIG: record}), dst_node_id=1, message_type=message_type
    )


def _node(site_dir: Path, tmp_path: Path, **extra) -> dict:
    return {"data-path": str(site_dir), "site-name": "hospital-a", "state-dir": str(tmp_path / "state"), **extra}


def _no_paths(reply: Message, *paths: Path) -> None:
    text = repr(dict(reply.content["site"])) + repr(dict(reply.content["metrics"]))
    for path in paths:
        assert str(path) not in text


def test_train_reply_has_update_metrics_and_no_paths(site_dir: Path, tmp_path: Path) -> None:
    config = tiny_config()
    reply = handle_train(_request(config, MessageType.TRAIN), _node(site_dir, tmp_path), run_id=7)
    assert reply.content["site"]["status"] == "ok"
    assert reply.content["site"]["name"] == "hospital-a"
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 42  # 70% of 60 train samples: samples, not batches
    assert 0 < metrics["epsilon"] <= metrics["budget"]
    assert "arrays" in reply.content
    assert (tmp_path / "state" / "privacy.json").is_file()
    _no_paths(reply, site_dir, tmp_path)


def test_budget_is_enforced_across_runs(site_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(**{"run.rounds": 1, "evaluation.cross-site": False})
    node = _node(site_dir, tmp_path)
    first = handle_train(_request(config, MessageType.TRAIN), node, run_id=1)
    assert first.content["site"]["status"] == "ok"
    # A new run at the same site: its ledger remembers the first run's spending.
    second = handle_train(_request(config, MessageType.TRAIN), node, run_id=2)
    assert second.content["site"]["status"] == "refused"
    assert "privacy budget exhausted" in second.content["site"]["reason"]
    assert "arrays" not in second.content
    # The operator may raise the budget deliberately.
    third = handle_train(_request(config, MessageType.TRAIN), {**node, "privacy-budget": 30.0}, run_id=3)
    assert third.content["site"]["status"] == "ok"
    assert third.content["metrics"]["epsilon"] > first.content["metrics"]["epsilon"]


def test_bad_site_data_is_reported_without_paths(site_dir: Path, tmp_path: Path) -> None:
    (site_dir / "images" / "000001.png").unlink()
    reply = handle_train(_request(tiny_config(), MessageType.TRAIN), _node(site_dir, tmp_path), run_id=1)
    assert reply.content["site"]["status"] == "error"
    assert "site data failed the pre-flight check: 1 missing file" in reply.content["site"]["reason"]
    _no_paths(reply, site_dir)
    assert "000001" not in reply.content["site"]["reason"]


def test_evaluate_on_requested_split(site_dir: Path, tmp_path: Path) -> None:
    reply = handle_evaluate(_request(tiny_config(), MessageType.EVALUATE, split="test"), _node(site_dir, tmp_path))
    metrics = reply.content["metrics"]
    assert reply.content["site"]["status"] == "ok"
    assert metrics["num-examples"] == 9 and "auroc" in metrics


def test_deployed_site_refuses_to_train_without_privacy(site_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(**{"privacy.enabled": False})
    reply = handle_train(_request(config, MessageType.TRAIN), _node(site_dir, tmp_path), run_id=1)
    assert reply.content["site"]["status"] == "refused"
    assert "only with differential privacy" in reply.content["site"]["reason"]
    as_text = _node(site_dir, tmp_path, **{"allow-training-without-privacy": "false"})  # a string is not a yes
    assert handle_train(_request(config, MessageType.TRAIN), as_text, run_id=1).content["site"]["status"] == "refused"
    allowed = _node(site_dir, tmp_path, **{"allow-training-without-privacy": True})
    reply = handle_train(_request(config, MessageType.TRAIN), allowed, run_id=1)
    assert reply.content["site"]["status"] == "ok" and "train-loss" in reply.content["metrics"]


def test_site_refuses_tasks_outside_its_allow_list_before_reading_data(site_dir: Path, tmp_path: Path) -> None:
    (site_dir / "manifest.csv").unlink()  # not even looked at
    node = _node(site_dir, tmp_path, **{"allowed-tasks": "segmentation, detection"})
    for handle, kind in ((handle_train, MessageType.TRAIN), (handle_evaluate, MessageType.EVALUATE)):
        reply = handle(_request(tiny_config(), kind, split="val"), node, *((1,) if kind == MessageType.TRAIN else ()))
        assert reply.content["site"]["status"] == "refused"
        assert reply.content["site"]["reason"] == (
            "task 'classification' is not in this site's allowed-tasks ['segmentation', 'detection']"
        )


def test_no_evaluation_on_the_training_split(site_dir: Path, tmp_path: Path) -> None:
    reply = handle_evaluate(_request(tiny_config(), MessageType.EVALUATE, split="train"), _node(site_dir, tmp_path))
    assert reply.content["site"]["status"] == "refused"


def test_any_site_error_reaches_the_server_without_paths(site_dir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "privacy.json").write_text("{broken")
    reply = handle_train(_request(tiny_config(), MessageType.TRAIN), _node(site_dir, tmp_path), run_id=1)
    assert reply.content["site"]["status"] == "error"
    assert reply.content["site"]["reason"] == "LedgerError; details are in the site's log"
    _no_paths(reply, site_dir, tmp_path)


def test_site_data_is_read_once_until_its_files_change(site_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import medfed.site as site_module

    reads = []
    real_check = site_module.run_preflight
    monkeypatch.setattr(site_module, "run_preflight", lambda *a, **k: reads.append(a) or real_check(*a, **k))
    site_module._SITE_CACHE.clear()
    config = tiny_config()
    node = _node(site_dir, tmp_path)
    for _ in range(2):
        assert (
            handle_evaluate(_request(config, MessageType.EVALUATE, split="val"), node).content["site"]["status"] == "ok"
        )
    assert len(reads) == 1
    manifest = site_dir / "manifest.csv"
    manifest.write_text(manifest.read_text() + "\n")  # the hospital updates its data: read again
    handle_evaluate(_request(config, MessageType.EVALUATE, split="val"), node)
    assert len(reads) == 2
    handle_evaluate(_request(tiny_config(**{"data.image-size": 32}), MessageType.EVALUATE, split="val"), node)
    assert len(reads) == 3  # another input size: another copy
    site_module._SITE_CACHE.clear()  # a new process, as each Flower message gets in a deployment
    reply = handle_evaluate(_request(tiny_config(**{"data.image-size": 32}), MessageType.EVALUATE, split="val"), node)
    assert len(reads) == 3 and reply.content["site"]["status"] == "ok"  # from STATE_DIR/cache, not re-read
    assert len(list((tmp_path / "state" / "cache").glob("*.npz"))) == 1  # one copy kept


def test_site_status_shows_what_the_ledger_says(site_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medfed.cli import app

    node_config = tmp_path / "node-config.toml"
    node_config.write_text(f'site-name = "hospital-a"\nstate-dir = "{tmp_path / "state"}"\nprivacy-budget = 20.0\n')
    runner = CliRunner()
    before = runner.invoke(app, ["site", "status", "--node-config", str(node_config)])
    assert before.exit_code == 0 and "has not trained with differential privacy yet" in before.output
    reply = handle_train(_request(tiny_config(), MessageType.TRAIN), _node(site_dir, tmp_path), run_id=7)
    spent = reply.content["metrics"]["epsilon"]
    after = runner.invoke(app, ["site", "status", "--node-config", str(node_config)])
    text = " ".join(after.output.split())
    assert after.exit_code == 0, after.output
    assert f"ε spent (all runs) │ {spent:.3f}" in text and f"remaining │ {20.0 - spent:.3f}" in text
    assert "rounds trained │ 1" in text
