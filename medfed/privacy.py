"""DP-SGD at a site (Opacus), with a privacy ledger that outlives rounds, runs and restarts.

The ledger (``STATE_DIR/privacy.json``) holds the accountant history, one ``(noise_multiplier,
sample_rate, steps)`` entry per round trained, the noise multiplier calibrated for each run, and
the key of every round charged (:class:`Release`): a round that is repeated exactly (after a
coordinator crash and ``--resume``: the same run, round, data, received model and noise) draws
the same seeded noise on the same data, releases nothing new and is not charged again; a round
whose data or received model changed draws fresh noise and is charged.
ε is always recomputed from the whole history, so it composes across rounds and across runs. A
new Opacus ``PrivacyEngine`` is built for each round (live Opacus objects cannot be kept between
Flower calls), but its noise comes from the run's one calibration and its spend goes to the ledger.

Spending is recorded before the data is touched and is never given back: a round that fails
after training, or whose update the site refuses to send because it is not finite, stays
charged. The DP steps did run on the data, and the failure the site reports is itself computed
from their noisy result (post-processing, covered by the charge); refunding it would release
that signal unaccounted. The ledger can only over-count, never under-count.

Every number the accountant is given (σ, sample rate, steps, ε, δ) is checked first, and the noise
search is bounded, so a hostile setting is a clear ``ValueError`` rather than a hang or a NaN ε.

Importing this module also teaches Opacus to skip the per-sample weight gradients of convolutions
whose weight is frozen (``train.trainable = "bias-norm"``): only the bias's are computed.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import torch
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

__all__ = [
    "BudgetExceeded",
    "LedgerError",
    "PrivacyLedger",
    "PrivacyPlan",
    "Release",
    "calibrate_noise",
    "check_delta",
    "default_delta",
    "make_private",
    "plan_privacy",
    "quiet_accountant",
]

LEDGER_FILE = "privacy.json"
MAX_LEDGER_BYTES = 16_000_000  # a ledger grows by one short entry per round trained
MAX_SIGMA = 1e6  # as Opacus' search: a larger noise multiplier means the target ε cannot be met
MAX_SEARCH_STEPS = 60  # bisection steps of the noise search (it needs about 20; 60 halve σ's range to 1e-12)
MAX_TARGET_EPSILON = 1000.0  # a target beyond this is no privacy (config.py allows at most 100)
EPSILON_TOLERANCE = 0.01  # as Opacus' search
MAX_COUNT = 10**12  # most units, steps or rounds a plan or ledger may hold: beyond it no real setting


@dataclass(frozen=True)
class Release:
    """One round of DP-SGD at a site, as the ledger keys its charge.

    Args:
        round_key: the run key, phase, round and a digest of the site's training data.
        request: a digest of what the server sent for it (model weights and settings).
    """

    round_key: str
    request: str


class BudgetExceeded(RuntimeError):
    """Training would take the site past its privacy budget; the site refuses the round."""


class LedgerError(RuntimeError):
    """The site's state folder or privacy ledger is not what it must be; the message names the file."""


def _check_mechanism(noise_multiplier: float, sample_rate: float, steps: float) -> None:
    """σ finite and > 0, sample rate in (0, 1], steps a whole number in [0, 10^12]."""
    if not (math.isfinite(noise_multiplier) and 0 < noise_multiplier <= MAX_SIGMA):
        raise ValueError(f"noise multiplier {noise_multiplier!r}: expected a number in (0, {MAX_SIGMA:g}]")
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample rate {sample_rate!r}: expected a number in (0, 1]")
    if not (float(steps).is_integer() and 0 <= steps <= MAX_COUNT):
        raise ValueError(f"steps {steps!r}: expected a whole number in [0, {MAX_COUNT:g}]")


def _check_target(target_epsilon: float, delta: float) -> None:
    """ε in (0, 1000], δ in (0, 1)."""
    if not 0 < target_epsilon <= MAX_TARGET_EPSILON:
        raise ValueError(f"target ε {target_epsilon!r}: expected a number in (0, {MAX_TARGET_EPSILON:g}]")
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"δ {delta!r}: expected a number in (0, 1)")


@functools.lru_cache(maxsize=256)
def _calibrate(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prior: tuple[tuple[float, float, int], ...] = (),
) -> float:
    """The smallest noise multiplier (within Opacus' tolerance) at which ``steps`` steps spend at most
    ``target_epsilon``: Opacus' own search (:func:`opacus.accountants.utils.get_noise_multiplier`,
    same steps, same result), with its bisection bounded so that no setting can make it loop for
    ever. Seconds on CPU, so once per process per setting: simulated sites of equal size share it.
    ``prior`` entries ``(noise multiplier, sample rate, steps)`` of the same run (a site's
    generator) are composed with the steps: together they spend at most ``target_epsilon``."""
    _check_target(target_epsilon, delta)
    _check_mechanism(1.0, sample_rate, steps)
    ledger = PrivacyLedger(path=Path(os.devnull), delta=delta, accountant=accountant, history=[list(e) for e in prior])
    sigma_low, sigma_high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        sigma_high *= 2
        if sigma_high > MAX_SIGMA:
            raise ValueError(
                f"ε = {target_epsilon:g} at δ = {delta:.1e} cannot be met over {steps} steps at sample rate "
                f"{sample_rate:.4g} (it would take a noise multiplier above {MAX_SIGMA:g}): raise the target ε, "
                "or take fewer steps or smaller batches"
            )
        eps_high = ledger.epsilon([[sigma_high, sample_rate, steps]])
    for _ in range(MAX_SEARCH_STEPS):
        if target_epsilon - eps_high <= EPSILON_TOLERANCE:
            break
        sigma = (sigma_low + sigma_high) / 2
        eps = ledger.epsilon([[sigma, sample_rate, steps]])
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest noise multiplier at which ``steps`` draws of the sampled Gaussian mechanism at
    ``sample_rate`` spend at most ``target_epsilon`` at ``delta`` (the bounded search every DP-SGD
    plan uses; ``ValueError`` when no σ up to 10^6 meets it)."""
    return _calibrate(target_epsilon, delta, sample_rate, steps, accountant)


@contextmanager
def quiet_accountant() -> Iterator[None]:
    """Hide, inside the block, the RDP accountant's note that a tighter bound lies outside its orders:
    harmless, and not for a user's screen."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        yield


def default_delta(num_samples: int) -> float:
    """δ = 1/(10 n): well below 1/n, the usual ceiling for a meaningful guarantee."""
    return 1.0 / (10.0 * max(num_samples, 1))


def check_delta(delta: float, units: int) -> None:
    """Refuse a chosen δ (0: automatic) that is not below 1/n for a site of ``units`` privacy units:
    with δ >= 1/n, releasing one unit's data outright would meet the guarantee."""
    if delta and not delta < 1 / max(units, 1):
        raise ValueError(
            f"privacy.delta = {delta:g} is not below 1/n = 1/{units} (n: the site's privacy units): the "
            "guarantee would mean nothing. Set it lower, or 0 for 1/(10 n)"
        )


@dataclass
class PrivacyLedger:
    """The persisted privacy state of one site.

    Args:
        path: the JSON file (inside the site's state folder).
        delta: fixed at first use; a site keeps one δ for its lifetime so ε values compose.
        accountant: ``rdp`` or ``prv``.
        history: accountant entries ``[noise_multiplier, sample_rate, steps]``.
        calibrations: noise multiplier chosen for each run id.
        rounds: for each :attr:`Release.round_key`, the request first trained for it.
        charged: the keys of the releases charged (:meth:`reserve`). Ledgers written before
            these keys existed have neither: their rounds count as charged once each, and a
            repetition of one is charged again (an over-count, never an under-count).
    """

    path: Path
    delta: float
    accountant: str = "rdp"
    history: list[list[float]] = field(default_factory=list)
    calibrations: dict[str, float] = field(default_factory=dict)
    rounds: dict[str, str] = field(default_factory=dict)
    charged: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, state_dir: str | Path, delta: float, accountant: str = "rdp") -> PrivacyLedger:
        """Load the site's ledger, or start one with ``delta`` and ``accountant`` when the state
        folder holds none yet. :class:`LedgerError` (naming the file) when the state folder is not a
        folder or the ledger is not a readable, well-formed ledger file: never taken for "no spending"."""
        folder = Path(state_dir)
        path = folder / LEDGER_FILE
        _check_state_folder(folder)
        if not os.path.lexists(path):
            return cls(path=path, delta=delta, accountant=accountant)
        try:
            if not path.is_file():
                raise ValueError("it is not a regular file (a folder, link to nowhere or device?)")
            if path.stat().st_size > MAX_LEDGER_BYTES:
                raise ValueError(f"it is larger than {MAX_LEDGER_BYTES} bytes")
            raw = json.loads(path.read_bytes().decode("utf-8"))
            return cls(path=path, **_parsed_ledger(raw))
        except (KeyError, ValueError, TypeError, OverflowError, OSError, RecursionError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            raise LedgerError(
                f"privacy ledger {path} is unreadable ({type(err).__name__}: {reason}); refusing to train rather "
                "than forget past privacy spending. Expected the JSON file medfed writes ({delta, accountant, "
                "history, calibrations[, rounds, charged]}): restore it from backup."
            ) from None

    def save(self) -> None:
        """Write atomically, so a crash never leaves a half-written ledger."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "delta": self.delta,
            "accountant": self.accountant,
            "history": self.history,
            "calibrations": self.calibrations,
            "rounds": self.rounds,
            "charged": self.charged,
        }
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".privacy-")
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=1)
        os.replace(tmp, self.path)

    def epsilon(self, extra: list[list[float]] | None = None) -> float:
        """ε spent by the whole history (plus ``extra`` planned entries); never negative (the RDP
        conversion can dip below 0 at huge noise, which would read as credit)."""
        entries = [tuple(e) for e in self.history + (extra or []) if e[2] > 0]
        if not entries:
            return 0.0
        merged: dict[tuple[float, float], int] = {}  # the same mechanism n1 then n2 times = n1 + n2 times
        for sigma, q, n in entries:
            merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(n)
        acc = RDPAccountant() if self.accountant == "rdp" else PRVAccountant()
        acc.history = [(sigma, q, n) for (sigma, q), n in merged.items()]
        with quiet_accountant():
            epsilon = float(acc.get_epsilon(delta=self.delta))
        if math.isnan(epsilon):
            raise ValueError(f"the accountant returned ε = nan for {acc.history} at δ = {self.delta}")
        return max(epsilon, 0.0)

    def noise_for_run(
        self,
        run_id: str,
        target_epsilon: float,
        sample_rate: float,
        steps: int,
        prior: tuple[tuple[float, float, int], ...] = (),
    ) -> float:
        """The noise multiplier for this run: calibrated once so ``steps`` steps spend ``target_epsilon``
        (with the ``prior`` steps of the same run, e.g. its generator's, when given)."""
        if run_id not in self.calibrations:
            self.calibrations[run_id] = _calibrate(
                target_epsilon, self.delta, sample_rate, max(steps, 1), self.accountant, prior
            )
            self.save()
        return self.calibrations[run_id]

    def noise_salt(self, release: Release) -> str:
        """What the site mixes into the seed of ``release``'s noise: "" for the first request of its
        round (and for an exact repetition of it), so that a resumed run repeats the same local
        training; the request's digest for any other request of that round, so that noise drawn on
        the same data for two different models is never the same draw (their difference would
        cancel it). Recorded under the ledger's lock."""
        with self._locked():
            self.rounds.setdefault(release.round_key, release.request)
            self.save()
        return self._salt(release)

    def _salt(self, release: Release) -> str:
        return "" if self.rounds.get(release.round_key) == release.request else release.request

    def reserve(
        self, noise_multiplier: float, sample_rate: float, steps: int, budget: float, release: Release | None = None
    ) -> float:
        """Record the planned steps before training and return the new total ε.

        Under an exclusive lock on the ledger, re-read it (another run at the same site may have
        trained meanwhile), refuse with :class:`BudgetExceeded` if the steps would pass ``budget``,
        else append and save. Spending is recorded before the data is touched, so a crash during
        training can only over-count, never under-count. A ``release`` already charged (the same
        round, data, request, noise seed and mechanism) is not charged again.
        """
        _check_mechanism(noise_multiplier, sample_rate, steps)
        if not (math.isfinite(budget) and budget > 0):
            raise ValueError(f"privacy budget {budget!r}: expected a finite number > 0")
        with self._locked():
            key = "" if release is None else self._charge_key(release, noise_multiplier, sample_rate, steps)
            if key and key in self.charged:
                return self.epsilon()
            planned = self.epsilon([[noise_multiplier, sample_rate, steps]])
            if planned > budget + 1e-9:
                raise BudgetExceeded(
                    f"privacy budget exhausted: ε spent {self.epsilon():.2f}, this round would bring it to "
                    f"{planned:.2f} > budget {budget:.2f} (δ={self.delta:.2e})"
                )
            last = self.history[-1] if self.history else None
            if last and math.isclose(last[0], noise_multiplier) and math.isclose(last[1], sample_rate):
                last[2] += steps
            else:
                self.history.append([noise_multiplier, sample_rate, steps])
            if key:
                self.charged.append(key)
            self.save()
        return planned

    def _charge_key(self, release: Release, noise_multiplier: float, sample_rate: float, steps: int) -> str:
        """The key of a charge: the round (run, phase, round, data), the noise seed's salt and the mechanism."""
        fields = [
            release.round_key,
            self._salt(release),
            repr(float(noise_multiplier)),
            repr(float(sample_rate)),
            steps,
        ]
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the ledger's exclusive lock, with the ledger re-read from its file (another process of
        the site may have written it); calibrations made here and not yet saved are kept."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                current = PrivacyLedger.open(self.path.parent, self.delta, self.accountant)
                self.history, self.calibrations = current.history, {**current.calibrations, **self.calibrations}
                self.rounds, self.charged = current.rounds, current.charged
            yield


# Noise in the averaged gradient, per coordinate and in units of the clipping norm: σ / batch. Levels
# from this project's measurements (README, "Privacy planner"): PneumoniaMNIST at 0.007 lost about
# 1 AUROC point to DP; BCCD at 0.08-0.11 lost three quarters of its mAP; CHASE_DB1 at ~1 learned nothing.
NOISE_COSTLY = 0.02
NOISE_HOPELESS = 0.05


@dataclass(frozen=True)
class PrivacyPlan:
    """What DP-SGD will do at a site of ``units`` privacy units, computed as the site computes it.

    ``noise_per_batch`` is σ / batch: the standard deviation of the noise in each coordinate of the
    averaged clipped gradient, in units of the clipping norm; it, not σ alone, decides whether the
    model learns. ``epsilon_after_round[r]`` is ε spent once round r + 1 is trained.
    """

    units: int
    batch_size: int
    sample_rate: float
    steps_per_round: int
    rounds: int
    run_steps: int
    target_epsilon: float
    delta: float
    accountant: str = "rdp"

    @functools.cached_property
    def noise_multiplier(self) -> float:
        """σ: calibrated (seconds, once per process per setting) so the run spends ``target_epsilon``."""
        return _calibrate(self.target_epsilon, self.delta, self.sample_rate, self.run_steps, self.accountant)

    @functools.cached_property
    def epsilon_after_round(self) -> tuple[float, ...]:
        return tuple(self.epsilon_after(r) for r in range(1, self.rounds + 1))

    def epsilon_after(self, server_round: int) -> float:
        """ε spent once round ``server_round`` is trained (an accountant call: a fraction of a second)."""
        ledger = PrivacyLedger(path=Path(os.devnull), delta=self.delta, accountant=self.accountant)
        return ledger.epsilon([[self.noise_multiplier, self.sample_rate, self.steps_per_round * server_round]])

    @property
    def noise_per_batch(self) -> float:
        return self.noise_multiplier / self.batch_size

    def warnings(self) -> list[str]:
        """Plain-language warnings when the noise is likely to cost accuracy or stop learning."""
        level = self.noise_per_batch
        if level < NOISE_COSTLY:
            return []
        verdict = "training is unlikely to help" if level >= NOISE_HOPELESS else "expect a clear loss of accuracy"
        return [
            f"noise σ/batch = {level:.3f} (σ {self.noise_multiplier:.2f} over batches of {self.batch_size}): {verdict}. "
            "Options: a larger batch (train.batch-size; the noise grows more slowly than the batch), fewer "
            "steps (run.rounds, train.local-epochs or train.local-steps), a larger privacy.target-epsilon, "
            "starting from a public model (medfed pretrain, run.initial-model) and training only part of it "
            "(train.trainable = 'bias-norm'), averaging each image's gradient over random views "
            "(train.augmentations), releasing a moving average of the rounds' models (run.ema), or more units "
            "(more images per site; the patient as unit means fewer units)."
        ]

    def lines(self) -> list[str]:
        """The plan as short lines, for the CLI and the site's log (ε of at most 7 rounds computed)."""
        rounds = range(1, self.rounds + 1)
        shown = ", ".join(
            f"{self.epsilon_after(r):.2f}" for r in (rounds if len(rounds) <= 8 else (*rounds[:4], *rounds[-3:]))
        )
        local_only = (
            " x 2 (local-only models for the cross-site matrix too)"
            if self.run_steps > self.steps_per_round * self.rounds
            else ""
        )
        return [
            f"units {self.units}, batch {self.batch_size} (sample rate {self.sample_rate:.4f}), "
            f"{self.steps_per_round} steps per round x {self.rounds} rounds{local_only} = {self.run_steps} steps",
            f"noise multiplier σ = {self.noise_multiplier:.3f} for ε = {self.target_epsilon:g} at δ = {self.delta:.1e}; "
            f"σ/batch = {self.noise_per_batch:.4f}",
            f"ε after each federated round: {shown}" + (" (first 4 ... last 3)" if len(rounds) > 8 else ""),
            *(f"WARNING: {w}" for w in self.warnings()),
        ]


def plan_privacy(
    units: int,
    batch_size: int,
    rounds: int,
    target_epsilon: float,
    *,
    local_epochs: int = 1,
    local_steps: int = 0,
    delta: float = 0.0,
    accountant: str = "rdp",
    runs_per_round: int = 1,
    extra_steps: int = 0,
) -> PrivacyPlan:
    """The DP-SGD plan of a site with ``units`` training units, exactly as the site computes it:
    batches of ``min(batch_size, units)`` drawn with Poisson sampling at rate 1/number of batches,
    ``local_steps`` (or ``local_epochs`` passes) per round, noise calibrated so the whole run
    (``runs_per_round``: one more for the local-only models of the cross-site matrix, one more for
    Ditto's personal model; ``extra_steps``: steps after the last round, e.g. local fine-tuning)
    spends ``target_epsilon`` at ``delta`` (0: 1/(10 units)). ``ValueError`` for a setting out of range."""
    counts = {"units": units, "batch size": batch_size, "rounds": rounds, "local epochs": local_epochs}
    for what, value in counts.items():
        if not 1 <= value <= MAX_COUNT:
            raise ValueError(f"{what} {value!r}: expected a whole number in [1, {MAX_COUNT:g}]")
    if not 0 <= local_steps <= MAX_COUNT:
        raise ValueError(f"local steps {local_steps!r}: expected a whole number in [0, {MAX_COUNT:g}]")
    if runs_per_round not in (1, 2, 3):
        raise ValueError(f"runs per round {runs_per_round!r}: expected 1, 2 or 3 (local-only models, Ditto)")
    if not 0 <= extra_steps <= MAX_COUNT:
        raise ValueError(f"extra steps {extra_steps!r}: expected a whole number in [0, {MAX_COUNT:g}]")
    _check_target(target_epsilon, delta or default_delta(units))
    batch = min(batch_size, units)
    batches = math.ceil(units / batch)
    sample_rate = 1.0 / batches
    per_round = local_steps or local_epochs * batches
    run_steps = per_round * rounds * runs_per_round + extra_steps
    delta = delta or default_delta(units)
    return PrivacyPlan(units, batch, sample_rate, per_round, rounds, run_steps, target_epsilon, delta, accountant)


def _check_state_folder(folder: Path) -> None:
    """The state folder, or its nearest existing parent, must be a folder."""
    for existing in (folder, *folder.parents):
        if os.path.lexists(existing):
            if not existing.is_dir():
                raise LedgerError(
                    f"state folder {folder}: {existing} is not a folder; expected a folder holding the site's "
                    f"privacy ledger ({LEDGER_FILE}). Refusing to train rather than start a new ledger elsewhere."
                )
            return


class _LedgerFields(TypedDict):
    delta: float
    accountant: str
    history: list[list[float]]
    calibrations: dict[str, float]
    rounds: dict[str, str]
    charged: list[str]


def _parsed_ledger(raw: object) -> _LedgerFields:
    """The fields of a ledger file's JSON, checked: ValueError/TypeError/KeyError naming what is wrong."""
    if not isinstance(raw, dict):
        raise TypeError(f"expected a JSON object, got {type(raw).__name__}")
    delta = float(raw["delta"])
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"delta {delta!r} is not in (0, 1)")
    accountant = raw["accountant"]
    if accountant not in ("rdp", "prv"):
        raise ValueError(f"accountant {str(accountant)[:20]!r} is not 'rdp' or 'prv'")
    if not isinstance(raw["history"], list) or not isinstance(raw["calibrations"], dict):
        raise TypeError("history must be a list and calibrations an object")
    history: list[list[float]] = []
    for entry in raw["history"]:
        if not isinstance(entry, list) or len(entry) != 3 or any(isinstance(v, (bool, str)) for v in entry):
            raise ValueError(f"history entry {str(entry)[:60]} is not [noise multiplier, sample rate, steps]")
        sigma, q, steps = (float(v) for v in entry)
        _check_mechanism(sigma, q, steps)
        history.append([sigma, q, int(steps)])
    calibrations: dict[str, float] = {}
    for run, sigma in raw["calibrations"].items():
        if isinstance(sigma, (bool, str)):
            raise ValueError(f"calibration {str(sigma)[:20]!r} is not a number")
        _check_mechanism(float(sigma), 1.0, 0)
        calibrations[str(run)] = float(sigma)
    rounds, charged = raw.get("rounds", {}), raw.get("charged", [])  # absent in ledgers written before them
    if not isinstance(rounds, dict) or not all(isinstance(v, str) and len(v) <= 64 for v in rounds.values()):
        raise ValueError("rounds must be an object of request digests")
    if not isinstance(charged, list) or not all(isinstance(k, str) and len(k) == 64 for k in charged):
        raise ValueError("charged must be a list of 64-character keys")
    return {
        "delta": delta,
        "accountant": str(accountant),
        "history": history,
        "calibrations": calibrations,
        "rounds": {str(k): v for k, v in rounds.items()},
        "charged": charged,
    }


def _bias_only_when_weight_frozen(full_sampler: Callable[..., dict]) -> Callable[..., dict]:
    """A per-sample gradient function for a convolution that, when its weight is frozen
    (``train.trainable = "bias-norm"``), computes only the bias's: the output gradient summed over
    positions. Opacus would otherwise unfold the layer's input (kernel-size times its memory) or
    re-run it per sample, for a weight gradient it then throws away.
    """

    def sampler(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
        if layer.weight.requires_grad:
            # Opacus' unfold gives wrong per-sample gradients for a channels-last input (a feature map
            # permuted before the layer, as in SwinUNETR): hand it the standard layout
            return full_sampler(layer, [_standard_layout(a) for a in activations], backprops)
        if layer.bias is None or not layer.bias.requires_grad:
            return {}
        return {layer.bias: backprops.flatten(2).sum(dim=2)}

    return sampler


def _standard_layout(activation: torch.Tensor) -> torch.Tensor:
    """A 4D activation copied to standard strides when it is (or may be taken for) channels-last;
    ``.contiguous()`` alone keeps the strides of a 1 x 1 map. Others are returned as they are."""
    if activation.dim() == 4 and (
        not activation.is_contiguous() or activation.is_contiguous(memory_format=torch.channels_last)
    ):
        return activation.clone(memory_format=torch.contiguous_format)
    return activation


TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
GradSampleModule.GRAD_SAMPLERS.update(
    {conv: _bias_only_when_weight_frozen(compute_conv_grad_sample) for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d)}
)
GradSampleModule.GRAD_SAMPLERS.update(  # Opacus' default for these: functorch (see make_private)
    {conv: _bias_only_when_weight_frozen(ft_compute_per_sample_gradient) for conv in TRANSPOSED_CONVS}
)


def make_private(
    model: nn.Module,
    optimizer: Optimizer,
    loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str = "hooks",
) -> tuple[nn.Module, Optimizer, DataLoader]:
    """Wrap model/optimizer/loader for DP-SGD with Poisson sampling (per-sample clipping + noise).

    ``grad_sample_mode`` is how Opacus computes per-sample gradients (``hooks``, ``functorch``, ...;
    ``benchmarks/segmentation_dp.py`` compares them).
    """
    for module in model.modules():
        if isinstance(module, TRANSPOSED_CONVS) and module.weight.requires_grad:
            prepare_layer(module)  # functorch's copy of the layer, made before Opacus hooks the layer
    with warnings.catch_warnings():  # Opacus' note that its fast RNG is not cryptographically secure
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=grad_sample_mode,
    )
    return private_model, private_optimizer, private_loader
