"""DP-SGD at a site (Opacus), with a privacy ledger that outlives rounds, runs and restarts.

The ledger (``STATE_DIR/privacy.json``) holds the accountant history, one ``(noise_multiplier,
sample_rate, steps)`` entry per round trained, and the noise multiplier calibrated for each run.
ε is always recomputed from the whole history, so it composes across rounds and across runs. A
new Opacus ``PrivacyEngine`` is built for each round (live Opacus objects cannot be kept between
Flower calls), but its noise comes from the run's one calibration and its spend goes to the ledger.

Importing this module also teaches Opacus to skip the per-sample weight gradients of convolutions
whose weight is frozen (``train.trainable = "bias-norm"``): only the bias's are computed.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

__all__ = ["BudgetExceeded", "PrivacyLedger", "PrivacyPlan", "default_delta", "make_private", "plan_privacy"]

LEDGER_FILE = "privacy.json"


class BudgetExceeded(RuntimeError):
    """Training would take the site past its privacy budget; the site refuses the round."""


@functools.lru_cache(maxsize=256)
def _calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Opacus' noise calibration (a binary search over σ, seconds on CPU), once per process per setting:
    simulated sites of equal size share it."""
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


def default_delta(num_samples: int) -> float:
    """δ = 1/(10 n): well below 1/n, the usual ceiling for a meaningful guarantee."""
    return 1.0 / (10.0 * max(num_samples, 1))


@dataclass
class PrivacyLedger:
    """The persisted privacy state of one site.

    Args:
        path: the JSON file (inside the site's state folder).
        delta: fixed at first use; a site keeps one δ for its lifetime so ε values compose.
        accountant: ``rdp`` or ``prv``.
        history: accountant entries ``[noise_multiplier, sample_rate, steps]``.
        calibrations: noise multiplier chosen for each run id.
    """

    path: Path
    delta: float
    accountant: str = "rdp"
    history: list[list[float]] = field(default_factory=list)
    calibrations: dict[str, float] = field(default_factory=dict)

    @classmethod
    def open(cls, state_dir: str | Path, delta: float, accountant: str = "rdp") -> PrivacyLedger:
        """Load the site's ledger, or start one with ``delta`` and ``accountant``."""
        path = Path(state_dir) / LEDGER_FILE
        if not path.exists():
            return cls(path=path, delta=delta, accountant=accountant)
        try:
            raw = json.loads(path.read_text())
            return cls(
                path=path,
                delta=float(raw["delta"]),
                accountant=str(raw["accountant"]),
                history=[[float(s), float(q), int(n)] for s, q, n in raw["history"]],
                calibrations={str(k): float(v) for k, v in raw["calibrations"].items()},
            )
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as err:
            raise RuntimeError(
                f"privacy ledger {path} is unreadable ({err}); refusing to train rather than "
                "forget past privacy spending. Restore it from backup."
            ) from err

    def save(self) -> None:
        """Write atomically, so a crash never leaves a half-written ledger."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "delta": self.delta,
            "accountant": self.accountant,
            "history": self.history,
            "calibrations": self.calibrations,
        }
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".privacy-")
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=1)
        os.replace(tmp, self.path)

    def epsilon(self, extra: list[list[float]] | None = None) -> float:
        """ε spent by the whole history (plus ``extra`` planned entries)."""
        entries = [tuple(e) for e in self.history + (extra or []) if e[2] > 0]
        if not entries:
            return 0.0
        merged: dict[tuple[float, float], int] = {}  # the same mechanism n1 then n2 times = n1 + n2 times
        for sigma, q, n in entries:
            merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(n)
        acc = RDPAccountant() if self.accountant == "rdp" else PRVAccountant()
        acc.history = [(sigma, q, n) for (sigma, q), n in merged.items()]
        return float(acc.get_epsilon(delta=self.delta))

    def noise_for_run(self, run_id: str, target_epsilon: float, sample_rate: float, steps: int) -> float:
        """The noise multiplier for this run: calibrated once so ``steps`` steps spend ``target_epsilon``."""
        if run_id not in self.calibrations:
            self.calibrations[run_id] = _calibrate(
                target_epsilon, self.delta, sample_rate, max(steps, 1), self.accountant
            )
            self.save()
        return self.calibrations[run_id]

    def reserve(self, noise_multiplier: float, sample_rate: float, steps: int, budget: float) -> float:
        """Record the planned steps before training and return the new total ε.

        Under an exclusive lock on the ledger, re-read it (another run at the same site may have
        trained meanwhile), refuse with :class:`BudgetExceeded` if the steps would pass ``budget``,
        else append and save. Spending is recorded before the data is touched, so a crash during
        training can only over-count, never under-count.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                current = PrivacyLedger.open(self.path.parent, self.delta, self.accountant)
                self.history, self.calibrations = current.history, {**current.calibrations, **self.calibrations}
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
            self.save()
        return planned


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
        ledger = PrivacyLedger(path=Path(os.devnull), delta=self.delta, accountant=self.accountant)
        sigma, q = self.noise_multiplier, self.sample_rate
        return tuple(ledger.epsilon([[sigma, q, self.steps_per_round * r]]) for r in range(1, self.rounds + 1))

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
        """The plan as short lines, for the CLI and the site's log."""
        eps = self.epsilon_after_round
        shown = ", ".join(f"{e:.2f}" for e in (eps if len(eps) <= 8 else (*eps[:4], *eps[-3:])))
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
            f"ε after each federated round: {shown}" + (" (first 4 ... last 3)" if len(eps) > 8 else ""),
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
) -> PrivacyPlan:
    """The DP-SGD plan of a site with ``units`` training units, exactly as the site computes it:
    batches of ``min(batch_size, units)`` drawn with Poisson sampling at rate 1/number of batches,
    ``local_steps`` (or ``local_epochs`` passes) per round, noise calibrated so the whole run
    (``runs_per_round`` = 2 when local-only models are also trained for the cross-site matrix)
    spends ``target_epsilon`` at ``delta`` (0: 1/(10 units))."""
    if units < 1 or batch_size < 1 or rounds < 1 or target_epsilon <= 0:
        raise ValueError("units, batch size and rounds must be >= 1 and target epsilon > 0")
    batch = min(batch_size, units)
    batches = math.ceil(units / batch)
    sample_rate = 1.0 / batches
    per_round = local_steps or local_epochs * batches
    run_steps = per_round * rounds * runs_per_round
    delta = delta or default_delta(units)
    return PrivacyPlan(units, batch, sample_rate, per_round, rounds, run_steps, target_epsilon, delta, accountant)


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


for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    GradSampleModule.GRAD_SAMPLERS[_conv] = _bias_only_when_weight_frozen(compute_conv_grad_sample)
TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
for _conv in TRANSPOSED_CONVS:  # Opacus' default for these: functorch (see make_private)
    GradSampleModule.GRAD_SAMPLERS[_conv] = _bias_only_when_weight_frozen(ft_compute_per_sample_gradient)


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
