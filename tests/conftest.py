"""Shared fixtures: tiny configs, site folders, and the real datasets in ../shared (when present)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from medfed.config import Config
from medfed.data import write_site
from medfed.data.synthetic import synthetic_site

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_config(**overrides: object) -> Config:
    """A config small enough for DP training in a second on CPU."""
    base = {
        "run.rounds": 2,
        "data.sites": 2,
        "data.samples-per-site": 80,
        "model.width": 8,
        "model.depth": 2,
        "train.batch-size": 16,
        "train.lr": 0.05,
        "evaluation.example-images": 1,
    }
    base.update(overrides)
    return Config().with_overrides(base)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module: tiny tensors train several times faster on one thread than on
    two CPUs shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def task_identity() -> None:
    """Flower's task identity, which building a Message outside a Flower process needs."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture
def nodes(tmp_path: Path) -> dict[int, dict]:
    """Three deployed-style sites (node_config dicts) with 60 synthetic images each."""
    result = {}
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        folder = write_site(tmp_path / "data" / name, synthetic_site(i, 60, seed=4))
        result[10 + i] = {"data-path": str(folder), "site-name": name, "state-dir": str(tmp_path / "state" / name)}
    return result


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    """A valid classification site folder with 60 synthetic images."""
    return write_site(tmp_path / "hospital-a", synthetic_site(0, 60, seed=1))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (they sit beside the repository in CI)")
    return SHARED_DATA


@contextlib.contextmanager
def time_limit(seconds: int, what: str) -> Iterator[None]:
    """Raise TimeoutError ("``what`` made ... hang") when the body runs over ``seconds``: the
    per-case hang guard of the bad-input corpora (SIGALRM, main thread)."""

    def _timeout(*_: object) -> None:
        raise TimeoutError(f"{what} made it hang (over {seconds} s)")

    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
