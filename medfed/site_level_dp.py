"""Site-level (user-level) differential privacy at the server: DP-FedAvg with adaptive clipping.

``privacy.level = "site"`` (or ``"sample+site"``) protects a whole site's data, not one patient: the
models the server releases (every round's global model, sent to the sites, and the checkpoints)
are (ε, δ)-DP with respect to adding or removing one site. The mechanism is Andrew et al. 2021,
"Differentially private learning with adaptive clipping" (Flower's
``DifferentialPrivacyServerSideAdaptiveClipping``), run by :mod:`medfed.federation` each round:

1. **sampling**: each connected site is asked to train with probability q = ``run.fraction-train``,
   independently of the others (Poisson sampling), from randomness the config does not give away;
2. **clipping**: each site's update Δᵢ (its weights minus the global model's, trainable parameters
   only) is scaled to norm at most C, the round's clipping norm; bᵢ = 1 when it needed no scaling;
3. **noise**: the global model moves by (Σᵢ clipped Δᵢ + N(0, (z_Δ·C)²)) / m, an equal-weight mean
   over m = q·N, the expected number of sites taking part (N: the sites connected at the start),
   a fixed denominator that does not depend on who took part;
4. **adaptive clipping**: C ← C·exp(−η·(b̄ − γ)), with b̄ = (Σᵢ (bᵢ − ½) + N(0, σ_b²)) / m + ½ the
   noised fraction of unclipped updates, γ = ``privacy.site-clip-quantile``, η = ``site-clip-lr``.

The two noised sums together are one Gaussian mechanism of noise multiplier z with
z⁻² = z_Δ⁻² + (2σ_b)⁻² (Andrew et al., section 3: the centred bits have sensitivity ½), sampled at
rate q once a round: Opacus' RDP (or PRV) accountant with (z, q, rounds) gives ε. z is calibrated
so that ``run.rounds`` rounds spend ``privacy.site-epsilon``; σ_b = max(m/20, z) (Andrew et al.
recommend m/20; at least z keeps the update's share of the noise within 1.16 z), and z_Δ follows.
A round is charged, in ``checkpoints/site_privacy.json``, before its model leaves the server: a
round repeated after a crash is charged again, never forgotten.

What it does not cover: the server itself sees each update (central DP: the coordinator is
trusted), and what sites send besides weights (their validation metrics) goes to the coordinator's
report only. The noise comes from NumPy's PCG64 seeded with 128 bits from the operating system:
not a cryptographically secure generator (as Opacus without ``secure_mode``), but not
reproducible from anything in the config or the report.
"""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.supercore.differential_privacy import compute_adaptive_noise_params, get_norm

from medfed.config import Config
from medfed.privacy import PrivacyLedger, calibrate_noise, check_delta, default_delta

__all__ = [
    "MIN_SITES",
    "SiteLevelDP",
    "SiteLevelPlan",
    "clip_update",
    "next_clip_norm",
    "noised_mean",
    "noised_unclipped_fraction",
    "plan_for_config",
    "plan_site_level",
    "poisson_sample",
    "site_level_epsilon",
    "trainable_keys",
]

MIN_SITES = 10  # fewer sites: the noise that hides one of them swamps what the others contribute
SITES_TO_LEARN = 100  # expected sites per round below which the noise is likely to cost accuracy
MAX_STATE_BYTES = 10_000_000

T = TypeVar("T")


@functools.lru_cache(maxsize=1024)
def site_level_epsilon(
    noise_multiplier: float, sample_rate: float, rounds: int, delta: float, accountant: str
) -> float:
    """ε after ``rounds`` rounds of the sampled Gaussian mechanism (z, q): Opacus' accountant (a second
    or so at q < 1, so each answer is kept)."""
    ledger = PrivacyLedger(path=Path(os.devnull), delta=delta, accountant=accountant)
    return ledger.epsilon([[noise_multiplier, sample_rate, rounds]])


@dataclass(frozen=True)
class SiteLevelPlan:
    """The site-level DP of a run: N ``sites``, each taking part in a round with probability
    ``sample_rate``, over ``rounds`` rounds, calibrated to spend ``target_epsilon`` at ``delta``.

    ``noise_multiplier`` (z) is what the accountant charges; ``update_noise_multiplier`` (z_Δ) is the
    noise on the sum of clipped updates, in units of the clipping norm, and ``count_stddev`` (σ_b)
    the noise on the count of unclipped updates (0 with a fixed clipping norm, then z_Δ = z).
    """

    sites: int
    sample_rate: float
    rounds: int
    target_epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    update_noise_multiplier: float
    count_stddev: float

    @property
    def expected_sites(self) -> float:
        """m = q·N: the denominator of the noised mean."""
        return self.sample_rate * self.sites

    @property
    def noise_per_site(self) -> float:
        """z_Δ / m: the noise's standard deviation in each coordinate of the mean update, in units
        of the clipping norm (what decides whether the model learns)."""
        return self.update_noise_multiplier / self.expected_sites

    def epsilon_after(self, rounds: int) -> float:
        """ε spent once ``rounds`` rounds have been released."""
        return site_level_epsilon(self.noise_multiplier, self.sample_rate, rounds, self.delta, self.accountant)

    def warnings(self) -> list[str]:
        """Plain-language warnings when the noise is likely to swamp the sites' updates."""
        if self.expected_sites >= SITES_TO_LEARN:
            return []
        return [
            f"about {self.expected_sites:.3g} sites per round: the noise on the mean update is {self.noise_per_site:.2f} "
            "of the clipping norm in every coordinate, so expect a clear loss of accuracy (site-level DP works with "
            "hundreds of sites per round). Options: more sites, a larger run.fraction-train, fewer run.rounds, a "
            "larger privacy.site-epsilon, or privacy.level = 'sample' (each site's own DP-SGD)."
        ]

    def lines(self) -> list[str]:
        """The plan as short lines, for the CLI and the server's log."""
        rounds = range(1, self.rounds + 1)
        shown = rounds if len(rounds) <= 8 else (*rounds[:4], *rounds[-3:])
        count = f", count noise σ_b = {self.count_stddev:.2f}" if self.count_stddev else " (fixed clipping norm)"
        return [
            f"{self.sites} sites, each in a round with probability {self.sample_rate:g} (about "
            f"{self.expected_sites:.3g} per round), {self.rounds} rounds",
            f"noise multiplier z = {self.noise_multiplier:.3f} for site-level ε = {self.target_epsilon:g} at "
            f"δ = {self.delta:.1e}: update noise z_Δ = {self.update_noise_multiplier:.3f}{count}; noise on the mean "
            f"update {self.noise_per_site:.3f} x the clipping norm",
            "site-level ε after each round: " + ", ".join(f"{self.epsilon_after(r):.2f}" for r in shown)
            + (" (first 4 ... last 3)" if len(rounds) > 8 else ""),
            *(f"WARNING: {w}" for w in self.warnings()),
        ]  # fmt: skip


def plan_site_level(
    sites: int,
    sample_rate: float,
    rounds: int,
    target_epsilon: float,
    *,
    delta: float = 0.0,
    accountant: str = "rdp",
    adaptive: bool = True,
) -> SiteLevelPlan:
    """Calibrate site-level DP for ``sites`` sites sampled at ``sample_rate`` over ``rounds`` rounds
    to spend ``target_epsilon`` at ``delta`` (0: 1/(10 N)); ``adaptive``: the clipping norm adapts
    (its count query takes a share of the budget). ``ValueError`` naming the setting at fault."""
    if not MIN_SITES <= sites <= 10**9:
        raise ValueError(
            f"privacy.level with 'site' needs at least {MIN_SITES} sites (got {sites}): with fewer, the noise "
            "that hides a whole site swamps what the others contribute. Use privacy.level = 'sample' (each "
            "site's own DP-SGD) for a federation of a few hospitals"
        )
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"run.fraction-train = {sample_rate!r}: expected a fraction in (0, 1]")
    if sample_rate * sites < 1:
        raise ValueError(
            f"run.fraction-train = {sample_rate:g} with {sites} sites samples {sample_rate * sites:.2g} sites per "
            "round on average: expected at least 1 (raise run.fraction-train)"
        )
    if not 1 <= rounds <= 10**6:
        raise ValueError(f"run.rounds = {rounds!r}: expected a whole number in [1, 1000000]")
    if not (math.isfinite(target_epsilon) and 0 < target_epsilon <= 100):
        raise ValueError(f"privacy.site-epsilon = {target_epsilon!r}: expected a number in (0, 100]")
    try:
        check_delta(delta, sites)
    except ValueError as err:
        raise ValueError(str(err).replace("privacy.delta", "privacy.site-delta").replace("units", "sites")) from None
    delta = delta or default_delta(sites)
    try:
        sigma = calibrate_noise(target_epsilon, delta, sample_rate, rounds, accountant)
    except ValueError as err:
        raise ValueError(f"privacy.site-epsilon = {target_epsilon:g}: {err}") from None
    expected = sample_rate * sites
    if not adaptive:
        return SiteLevelPlan(sites, sample_rate, rounds, target_epsilon, delta, accountant, sigma, sigma, 0.0)
    count_stddev, update_sigma = compute_adaptive_noise_params(sigma, expected, max(expected / 20, sigma))
    return SiteLevelPlan(
        sites, sample_rate, rounds, target_epsilon, delta, accountant, sigma, update_sigma, count_stddev
    )


def plan_for_config(config: Config, sites: int) -> SiteLevelPlan:
    """:func:`plan_site_level` with the run's settings (``run.fraction-train``, ``run.rounds`` and
    ``privacy.site-*``) for a federation of ``sites`` sites: what the server, ``simulate``'s
    pre-flight and ``medfed privacy site-plan`` all compute."""
    privacy = config.privacy
    return plan_site_level(
        sites,
        config.run.fraction_train,
        config.run.rounds,
        privacy.site_epsilon,
        delta=privacy.site_delta,
        accountant=privacy.accountant,
        adaptive=privacy.site_clip_lr > 0,
    )


def clip_update(update: Sequence[np.ndarray], clip_norm: float) -> tuple[list[np.ndarray], bool]:
    """``update`` scaled to L2 norm (over all its arrays) at most ``clip_norm`` (a copy), and whether it
    was within the norm already (the bit bᵢ of adaptive clipping)."""
    norm = get_norm(list(update))
    if norm <= clip_norm:
        return [np.array(a, copy=True) for a in update], True
    scale = clip_norm / norm
    return [(np.asarray(a, dtype=np.float64) * scale).astype(a.dtype) for a in update], False


def noised_mean(
    clipped: Sequence[Sequence[np.ndarray]],
    shapes: Sequence[tuple[int, ...]],
    clip_norm: float,
    noise_multiplier: float,
    expected_sites: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """(Σ clipped updates + N(0, (``noise_multiplier``·``clip_norm``)²)) / ``expected_sites``, array by
    array (float64); ``clipped`` may be empty (no site took part: the noise alone is released)."""
    result = []
    for index, shape in enumerate(shapes):
        total = np.zeros(shape, dtype=np.float64)
        for update in clipped:
            total += update[index]
        total += rng.normal(0.0, noise_multiplier * clip_norm, size=shape)
        result.append(total / expected_sites)
    return result


def noised_unclipped_fraction(
    unclipped: Sequence[bool], count_stddev: float, expected_sites: float, rng: np.random.Generator
) -> float:
    """b̄ = (Σ (bᵢ − ½) + N(0, σ_b²)) / m + ½: the fraction of unclipped updates, noised (Andrew et al.'s
    centred bits: sensitivity ½)."""
    centred = sum(1.0 if bit else 0.0 for bit in unclipped) - len(unclipped) / 2
    return (centred + float(rng.normal(0.0, count_stddev))) / expected_sites + 0.5


def next_clip_norm(clip_norm: float, unclipped_fraction: float, target_quantile: float, lr: float) -> float:
    """C·exp(−η(b̄ − γ)): smaller when more than the target share of updates fit, larger when fewer."""
    return clip_norm * math.exp(-lr * (unclipped_fraction - target_quantile))


def poisson_sample(items: Sequence[T], rate: float, rng: np.random.Generator) -> list[T]:
    """Each item kept with probability ``rate``, independently (all of them at rate 1)."""
    if rate >= 1:
        return list(items)
    return [item for item in items if rng.random() < rate]


def trainable_keys(config: Config) -> set[str]:
    """The model's state-dict keys that ``train.trainable`` lets the sites change: the only ones
    aggregated and noised (the rest stay at the global model's value)."""
    from medfed.tasks import get_task
    from medfed.training import set_trainable

    model = get_task(config.run.task).build_model(config)
    set_trainable(model, config.train.trainable)
    return {name for name, param in model.named_parameters() if param.requires_grad}


def _secure_generator() -> np.random.Generator:
    """A generator seeded with 128 bits from the operating system: not reproducible from the config."""
    return np.random.default_rng(secrets.randbits(128))


@dataclass
class SiteLevelDP:
    """The server's site-level DP across a run's rounds: the plan, the current clipping norm and
    the rounds charged, persisted at ``path`` before each round's model is released."""

    plan: SiteLevelPlan
    clip_norm: float
    target_quantile: float
    clip_lr: float
    keys: set[str]
    path: Path
    clip_norms: list[float] = field(default_factory=list)  # the norm each charged round clipped at
    rng: np.random.Generator = field(default_factory=_secure_generator, repr=False)

    @classmethod
    def start(cls, config: Config, sites: int, path: str | Path, resume: bool = False) -> SiteLevelDP:
        """The run's site-level DP for a federation of ``sites`` connected sites; with ``resume``,
        the state a checkpointed run left at ``path`` (when it charged a round). ``ValueError`` for
        settings that cannot give site-level DP, naming the key."""
        privacy, path = config.privacy, Path(path)
        saved = _load_state(path) if resume and path.exists() else None
        plan = plan_for_config(config, int(saved["sites"]) if saved else sites)
        state = cls(
            plan, privacy.site_clip_norm, privacy.site_clip_quantile, privacy.site_clip_lr, trainable_keys(config), path
        )
        if saved:
            state.clip_norm, state.clip_norms = saved["clip_norm"], saved["clip_norms"]
        return state

    @property
    def rounds_charged(self) -> int:
        return len(self.clip_norms)

    @property
    def epsilon(self) -> float:
        """Site-level ε spent by the rounds charged so far."""
        return self.plan.epsilon_after(self.rounds_charged) if self.clip_norms else 0.0

    def aggregate(self, current: ArrayRecord, updates: Sequence[ArrayRecord]) -> ArrayRecord:
        """The next global model from ``current`` and the sampled sites' accepted ``updates`` (full
        weights, same keys and shapes): clipped deltas, noised equal-weight mean, clipping norm
        adapted. The round is charged and saved before the model is returned."""
        reference = {k: v.numpy() for k, v in current.items()}
        keys = [k for k, v in reference.items() if k in self.keys and np.issubdtype(v.dtype, np.floating)]
        clipped, bits = [], []
        for update in updates:
            arrays = {k: v.numpy() for k, v in update.items()}
            delta = [arrays[k].astype(np.float64) - reference[k] for k in keys]
            scaled, bit = clip_update(delta, self.clip_norm)
            clipped.append(scaled)
            bits.append(bit)
        shapes = [reference[k].shape for k in keys]
        noise = self.plan.update_noise_multiplier
        mean = noised_mean(clipped, shapes, self.clip_norm, noise, self.plan.expected_sites, self.rng)
        used = self.clip_norm
        if self.clip_lr > 0:
            fraction = noised_unclipped_fraction(bits, self.plan.count_stddev, self.plan.expected_sites, self.rng)
            self.clip_norm = next_clip_norm(self.clip_norm, fraction, self.target_quantile, self.clip_lr)
        self.clip_norms.append(used)
        self.save()  # charged before the model leaves the server
        moved = dict(zip(keys, mean, strict=True))
        return ArrayRecord(
            {
                k: torch.from_numpy(np.ascontiguousarray((v + moved[k]).astype(v.dtype) if k in moved else v))
                for k, v in reference.items()
            }
        )

    def round_entry(self) -> dict[str, float]:
        """What a round's report entry says of site-level DP after the round."""
        return {"site_epsilon": self.epsilon, "site_clip_norm": self.clip_norms[-1] if self.clip_norms else math.nan}

    def report(self) -> dict[str, Any]:
        """The report's ``site_privacy`` section."""
        plan = self.plan
        return {
            "level": "site",
            "epsilon": self.epsilon,
            "target_epsilon": plan.target_epsilon,
            "delta": plan.delta,
            "noise_multiplier": plan.noise_multiplier,
            "update_noise_multiplier": plan.update_noise_multiplier,
            "count_noise_stddev": plan.count_stddev,
            "rounds": self.rounds_charged,
            "sample_rate": plan.sample_rate,
            "sites": plan.sites,
            "expected_sites_per_round": plan.expected_sites,
            "accountant": plan.accountant,
            "clip_norms": list(self.clip_norms),
            "target_unclipped_quantile": self.target_quantile,
            "clip_lr": self.clip_lr,
        }

    def save(self) -> None:
        """Write the state atomically (a crash leaves the last one whole)."""
        payload = {"sites": self.plan.sites, "clip_norm": self.clip_norm, "clip_norms": self.clip_norms}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        hidden = self.path.with_name(f".{self.path.name}")
        hidden.write_text(json.dumps(payload))
        os.replace(hidden, self.path)


def _load_state(path: Path) -> dict[str, Any]:
    """The saved state at ``path``, checked: ``ValueError`` naming the file when it is not medfed's."""
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
        raw = json.loads(path.read_text())
        sites, clip_norm, norms = raw["sites"], float(raw["clip_norm"]), [float(c) for c in raw["clip_norms"]]
        if not (isinstance(sites, int) and not isinstance(sites, bool) and 1 <= sites <= 10**9):
            raise ValueError(f"sites {str(sites)[:20]} is not a whole number in [1, 1e9]")
        if not all(math.isfinite(c) and c > 0 for c in (clip_norm, *norms)):
            raise ValueError("a clipping norm is not a finite number > 0")
    except (OSError, KeyError, TypeError, ValueError, RecursionError) as err:
        raise ValueError(
            f"cannot resume: {path} is not the site-level privacy state medfed writes ({type(err).__name__}: "
            f"{str(err)[:80]}); refusing to forget the rounds it charged"
        ) from None
    return {"sites": sites, "clip_norm": clip_norm, "clip_norms": norms}
