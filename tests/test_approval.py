"""The site approves what it runs: `medfed site approve/approvals/revoke`, and a site with
require-approval = true refusing an unapproved run before it reads any data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import MessageType
from typer.testing import CliRunner

from medfed.approval import APPROVALS_FILE, approve, config_digest, revoke
from medfed.cli import app
from medfed.config import Config, load_config
from medfed.site import handle_evaluate, handle_train
from tests.conftest import REPO, tiny_config
from tests.test_site import _no_paths, _node, _request

pytestmark = pytest.mark.usefixtures("task_identity")

runner = CliRunner()
CONFIG = REPO / "configs" / "classification-synthetic.toml"


def _status(reply) -> tuple[str, str]:  # noqa: ANN001
    return str(reply.content["site"]["status"]), str(reply.content["site"]["reason"])


def _approving_node(tmp_path: Path, data: Path, **extra: object) -> dict:
    return _node(data, tmp_path, **{"require-approval": True, **extra})


def test_every_shipped_config_keeps_its_digest_through_the_wire() -> None:
    """The site recomputes the digest from the config JSON the server sends: the same as approved."""
    for path in sorted((REPO / "configs").glob("*.toml")):
        config = load_config(path, {"run.rounds": 2})
        assert config_digest(Config.from_json(config.to_json())) == config_digest(config)
        assert config_digest(config) != config_digest(load_config(path))


@pytest.mark.parametrize("handler", ["train", "evaluate"])
def test_an_unapproved_run_is_refused_before_any_data_is_read(tmp_path: Path, handler: str) -> None:
    """The site folder does not exist: a site that read its data would answer with a data error."""
    config = tiny_config()
    missing = tmp_path / "no-such-site-folder"
    node = _approving_node(tmp_path, missing)
    if handler == "train":
        reply = handle_train(_request(config, MessageType.TRAIN), node, run_id=1)
    else:
        reply = handle_evaluate(_request(config, MessageType.EVALUATE, split="val"), node)
    status, reason = _status(reply)
    assert status == "refused"
    assert "not approved" in reason and config_digest(config)[:16] in reason
    assert "arrays" not in reply.content
    _no_paths(reply, missing, tmp_path)
    assert not (tmp_path / "state" / "privacy.json").exists()  # nothing charged
    # Without require-approval the same site does try to read its folder and fails on it.
    plain = handle_train(_request(config, MessageType.TRAIN), _node(missing, tmp_path), run_id=1)
    assert _status(plain)[0] == "error"


def test_an_approved_run_trains_and_a_revoked_one_is_refused_again(site_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(**{"run.rounds": 1, "evaluation.cross-site": False})
    node = _approving_node(tmp_path, site_dir)
    other = tiny_config(**{"run.rounds": 1, "evaluation.cross-site": False, "privacy.target-epsilon": 7.0})
    approve(tmp_path / "state", other, by="DPO")  # another config's approval does not cover this one
    assert _status(handle_train(_request(config, MessageType.TRAIN), node, run_id=1))[0] == "refused"

    approve(tmp_path / "state", config, by="DPO")
    assert _status(handle_train(_request(config, MessageType.TRAIN), node, run_id=1))[0] == "ok"
    assert _status(handle_evaluate(_request(config, MessageType.EVALUATE, split="val"), node))[0] == "ok"

    revoke(tmp_path / "state", config_digest(config)[:12], by="DPO")
    status, reason = _status(handle_train(_request(config, MessageType.TRAIN), node, run_id=2))
    assert status == "refused" and "withdrawn" in reason


HOSTILE = {
    "not-json": b"{approvals",
    "not-utf8": b'{"format": 1, "approvals": ["\xff"]}',
    "a-list": b"[]",
    "no-format": b'{"approvals": []}',
    "approvals-not-a-list": b'{"format": 1, "approvals": {"digest": "x"}}',
    "digest-a-number": b'{"format": 1, "approvals": [{"digest": 5}]}',
    "digest-short": json.dumps(
        {
            "format": 1,
            "approvals": [{"digest": "ab", "run-name": "r", "task": "t", "approved-by": "a", "approved-at": "t"}],
        }
    ).encode(),
    "unknown-field": json.dumps({"format": 1, "approvals": [{"digest": "0" * 64, "approved": True}]}).encode(),
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "huge": b'{"format": 1, "approvals": [' + b" " * 1_100_000 + b"]}",
}


def _with_approval_of(config: Config, text: bytes, state: Path) -> None:
    """``state`` holds an approvals file with a valid approval of ``config`` followed by ``text``'s damage."""
    approve(state, config, by="DPO")
    path = state / APPROVALS_FILE
    path.write_bytes(text)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_broken_approvals_file_is_never_taken_for_approved(site_dir: Path, tmp_path: Path, case: str) -> None:
    config = tiny_config(**{"run.rounds": 1})
    _with_approval_of(config, HOSTILE[case], tmp_path / "state")
    reply = handle_train(_request(config, MessageType.TRAIN), _approving_node(tmp_path, site_dir), run_id=1)
    status, reason = _status(reply)
    assert status == "refused" and "approvals are broken" in reason
    _no_paths(reply, site_dir, tmp_path)

    for args in (["approvals"], ["revoke", "0" * 12, "--by", "DPO"], ["approve", str(CONFIG), "--by", "DPO"]):
        result = runner.invoke(app, ["site", *args, "--state-dir", str(tmp_path / "state")])
        assert result.exit_code == 2, result.output
        assert str(tmp_path / "state" / APPROVALS_FILE) in " ".join(result.output.split())
        assert "Traceback" not in result.output


def test_a_folder_in_place_of_the_approvals_file_and_a_bad_setting_refuse(site_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(**{"run.rounds": 1})
    (tmp_path / "state" / APPROVALS_FILE).mkdir(parents=True)
    reply = handle_train(_request(config, MessageType.TRAIN), _approving_node(tmp_path, site_dir), run_id=1)
    assert _status(reply)[0] == "refused"
    for value in ("yes", 1, "true"):  # only a TOML boolean says whether approval is required
        node = _node(site_dir, tmp_path / "other", **{"require-approval": value})
        reply = handle_evaluate(_request(config, MessageType.EVALUATE, split="val"), node)
        assert _status(reply)[0] == "refused"


def test_the_cli_approves_lists_and_revokes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    node_config = tmp_path / "node-config.toml"
    node_config.write_text(f'site-name = "a"\nstate-dir = "{state}"\nrequire-approval = true\n')
    approved = runner.invoke(app, ["site", "approve", str(CONFIG), "--by", "Dr A", "--node-config", str(node_config)])
    assert approved.exit_code == 0, approved.output
    digest = config_digest(load_config(CONFIG))
    assert digest in approved.output
    with_rounds = runner.invoke(app, ["site", "approve", str(CONFIG), "--by", "Dr A", "--set", "run.rounds=9",
                                      "--state-dir", str(state)])  # fmt: skip
    assert config_digest(load_config(CONFIG, {"run.rounds": 9})) in with_rounds.output

    listed = runner.invoke(app, ["site", "approvals", "--state-dir", str(state)])
    assert listed.exit_code == 0 and listed.output.count(" approved  run") == 2 and "Dr A" in listed.output
    revoked = runner.invoke(app, ["site", "revoke", digest[:10], "--by", "Ms B", "--state-dir", str(state)])
    assert revoked.exit_code == 0, revoked.output
    listed = runner.invoke(app, ["site", "approvals", "--state-dir", str(state)])
    assert "REVOKED" in listed.output and "Ms B" in listed.output
    entries = json.loads((state / APPROVALS_FILE).read_text())["approvals"]
    assert [e["digest"] for e in entries if "revoked-at" in e] == [digest]
    assert all(e["approved-at"].endswith("Z") for e in entries)

    again = runner.invoke(app, ["site", "revoke", digest[:10], "--by", "Ms B", "--state-dir", str(state)])
    assert again.exit_code == 2 and "no active approval" in again.output
    for args in (["revoke", "xyz", "--by", "B"], ["approve", str(CONFIG), "--by", " "], ["approve", str(CONFIG)]):
        result = runner.invoke(app, ["site", *args, "--state-dir", str(state)])
        assert result.exit_code == 2 and "Traceback" not in result.output
