"""The runs a site has approved: its operator's list of run configurations it agrees to train.

A run is identified by its **config digest**: the SHA-256 of the run's config as the server sends
it to the sites (:meth:`medfed.config.Config.to_json` of the resolved config, recipe keys left at
``auto``). The site recomputes it from the config it receives, so an approval cannot be borrowed
by a run that changes any setting: another model, more rounds, a larger ε, DP off. ``medfed site
approve CONFIG`` computes it from the same TOML and overrides the coordinator runs, and records it
in ``STATE_DIR/approvals.json`` with the run's name and task, who approved it and when (UTC);
``medfed site revoke`` marks an approval withdrawn (the record stays: who approved what, and when
it stopped, is the site's audit trail).

With ``require-approval = true`` in its node config a site refuses every message of a run whose
digest it has not approved (or has revoked), before it reads any data. The approvals file is
hostile input like any other: a file that cannot be read, is too large or holds the wrong types
is an :class:`ApprovalError` naming the file, and the site refuses to train; never "approved".
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medfed.config import Config

__all__ = [
    "APPROVALS_FILE",
    "Approval",
    "ApprovalError",
    "approve",
    "config_digest",
    "load_approvals",
    "requires_approval",
    "revoke",
]

APPROVALS_FILE = "approvals.json"
MAX_APPROVALS_BYTES = 1_000_000  # a few hundred bytes per approval
FORMAT = 1
_DIGEST = re.compile(r"[0-9a-f]{64}")
_FIELDS = ("digest", "run-name", "task", "approved-by", "approved-at", "revoked-by", "revoked-at")
MAX_TEXT = 200  # longest name, task or time kept in the file


class ApprovalError(RuntimeError):
    """The approvals file (or the require-approval setting) is not what it must be; the message names it."""


@dataclass(frozen=True)
class Approval:
    """One approved run configuration; ``revoked_at`` is set once the approval is withdrawn."""

    digest: str
    run_name: str
    task: str
    approved_by: str
    approved_at: str
    revoked_by: str = ""
    revoked_at: str = ""

    @property
    def active(self) -> bool:
        return not self.revoked_at


def config_digest(config: Config) -> str:
    """The digest a site approves: SHA-256 (hex) of the config exactly as the server sends it."""
    return hashlib.sha256(config.to_json().encode()).hexdigest()


def requires_approval(node_config: dict[str, Any]) -> bool:
    """Whether the node config's ``require-approval`` asks for approved runs only.

    Raises:
        ApprovalError: the value is not a TOML boolean (``"yes"``, 1): the site refuses to train
            rather than guess which was meant.
    """
    value = node_config.get("require-approval", False)
    if not isinstance(value, bool):
        raise ApprovalError(f"node config require-approval = {str(value)[:40]!r}: expected true or false")
    return value


def load_approvals(state_dir: Path) -> list[Approval]:
    """The approvals recorded in ``state_dir`` (none when it holds no approvals file).

    Raises:
        ApprovalError: the file is not a readable, well-formed approvals file (the message names it).
    """
    path = state_dir / APPROVALS_FILE
    if not os.path.lexists(path):
        return []
    try:
        if not path.is_file():
            raise ValueError("it is not a regular file")
        if path.stat().st_size > MAX_APPROVALS_BYTES:
            raise ValueError(f"it is larger than {MAX_APPROVALS_BYTES} bytes")
        return _parsed(json.loads(path.read_bytes().decode("utf-8")))
    except (ValueError, TypeError, KeyError, OSError, RecursionError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise ApprovalError(
            f"approvals file {path} is unreadable ({type(err).__name__}: {reason}); expected the JSON file "
            "`medfed site approve` writes. No run is taken as approved until it is restored or removed."
        ) from None


def approve(state_dir: Path, config: Config, by: str) -> Approval:
    """Record (under a lock, written atomically) that ``by`` approves ``config`` now; an approval of
    the same digest that is still active is kept as it is and returned."""
    digest = config_digest(config)
    with _locked(state_dir) as approvals:
        current = next((a for a in approvals if a.digest == digest and a.active), None)
        if current is not None:
            return current
        approval = Approval(digest, config.run.name, config.run.task, _checked_name(by), _now())
        _save(state_dir, [*approvals, approval])
    return approval


def revoke(state_dir: Path, digest_prefix: str, by: str) -> list[Approval]:
    """Withdraw the active approvals whose digest starts with ``digest_prefix`` (at least 8 hex
    characters); the revoked records are returned.

    Raises:
        ApprovalError: the prefix is too short or not hex, or no active approval matches it.
    """
    prefix = digest_prefix.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", prefix):
        raise ApprovalError(f"digest {digest_prefix[:70]!r}: expected at least 8 hex characters of a config digest")
    name, when = _checked_name(by), _now()
    with _locked(state_dir) as approvals:
        revoked = [
            replace(a, revoked_by=name, revoked_at=when) for a in approvals if a.active and a.digest.startswith(prefix)
        ]
        if not revoked:
            raise ApprovalError(
                f"no active approval in {state_dir / APPROVALS_FILE} has a digest starting with {prefix}"
            )
        by_digest = {a.digest: a for a in revoked}
        _save(state_dir, [by_digest.get(a.digest, a) if a.active else a for a in approvals])
    return revoked


def _checked_name(by: str) -> str:
    name = by.strip()
    if not name or len(name) > MAX_TEXT or not name.isprintable():
        raise ApprovalError(f"--by {by[:70]!r}: expected the approver's name (printable, 1-{MAX_TEXT} characters)")
    return name


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextmanager
def _locked(state_dir: Path) -> Iterator[list[Approval]]:
    """The approvals of ``state_dir``, read under an exclusive lock held for the block."""
    if os.path.lexists(state_dir) and not state_dir.is_dir():
        raise ApprovalError(f"state folder {state_dir} is not a folder")
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "approvals.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield load_approvals(state_dir)


def _save(state_dir: Path, approvals: list[Approval]) -> None:
    payload = {"format": FORMAT, "approvals": [_as_record(a) for a in approvals]}
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".approvals-")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=1)
    os.replace(tmp, state_dir / APPROVALS_FILE)


def _as_record(approval: Approval) -> dict[str, str]:
    record = {k.replace("_", "-"): v for k, v in asdict(approval).items()}
    return {k: v for k, v in record.items() if v or not k.startswith("revoked")}


def _parsed(raw: object) -> list[Approval]:
    """The approvals of a file's JSON, checked: ValueError/TypeError naming what is wrong."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("approvals"), list):
        raise ValueError(f'expected {{"format": {FORMAT}, "approvals": [...]}}')
    approvals = []
    for entry in raw["approvals"]:
        if not isinstance(entry, dict) or set(entry) - set(_FIELDS):
            raise ValueError(f"approval {str(entry)[:80]} is not an object of {', '.join(_FIELDS)}")
        if not all(isinstance(v, str) and len(v) <= MAX_TEXT for v in entry.values()):
            raise TypeError(f"approval {str(entry)[:80]}: every value must be text of at most {MAX_TEXT} characters")
        if not _DIGEST.fullmatch(entry.get("digest", "")):
            raise ValueError(f"approval {str(entry)[:80]}: digest must be 64 lowercase hex characters")
        missing = [k for k in _FIELDS[:5] if not entry.get(k)]
        if missing:
            raise ValueError(f"approval of {entry['digest'][:12]} lacks {', '.join(missing)}")
        approvals.append(Approval(*(entry.get(k, "") for k in _FIELDS)))
    return approvals
