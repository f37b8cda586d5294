"""An empirical privacy audit at a site: how well can an attacker tell the site's training images
from its held-out ones, given the released model? And how much does the model give away about a
few deliberately unusual images (canaries) trained on?

Membership inference (members: the site's training split; non-members: its held-out images, never
trained on), for any task, through the task interface (per-image ``task.loss`` on ``task.infer``):

- **loss threshold** (Yeom et al. 2018): score = -loss; an image the model fits unusually well is
  called a member. Needs nothing but the model.
- **offline LiRA** (Carlini et al. 2022, "offline" variant with a fixed variance): ``shadows`` (K,
  even, at least 4) reference models are trained with the released model's own recipe (its config: model,
  epochs, optimizer, DP settings) on halves of the site's *non-members* only, each non-member in
  exactly K/2 of them. An image's score is how far its logit-scaled confidence
  ``phi = log(p / (1 - p))`` with ``p = exp(-loss)`` (exact for cross-entropy, a monotone
  transform of the loss for other tasks) under the released model lies above its mean under the
  K/2 reference models that never saw it, in units of the references' pooled spread: this
  calibrates for images that are easy or hard whether trained on or not. Members are scored
  against K/2 reference models too (drawn at random), so both groups are calibrated alike.
  Assumes the attacker can train with the same recipe on data from the site's distribution; a
  reference model trains on one site's half held-out set, whereas a federated model trained on
  all sites by FedAvg: the references are an approximation, and cost K trainings of the site's size.

What the figures mean, and what they do not: AUC 0.5 is chance; TPR at a low FPR is what a
confident attacker achieves (Carlini et al.). (ε, δ)-DP bounds *every* such test: TPR ≤
min(e^ε FPR + δ, 1 - e^-ε (1 - δ - FPR)) (Kairouz et al. 2015), so the audit prints the ceiling
the model's ε permits beside what the attacks reach. The audit is a lower bound on leakage (a
better attack may do better), not a proof of privacy; the site's split was not drawn at random
for the audit, so held-out images that differ in kind from the training ones (another period,
another scanner) raise the AUC without any memorisation.

Canary exposure (Carlini et al. 2019, "The secret sharer"): ``inserted`` canaries (random blocky
out-of-distribution patterns, each with the target of a random training image: its secret) join
the training split; ``references`` canaries drawn the same way stay out. A canary's exposure is
``log2(n) - log2(rank)`` bits, ``rank`` its loss's place among its own and the references' losses
(1: lowest; n = references + 1; ties count half): log2(n) bits when the model fits it better than
every reference, about 1 bit or less for a canary it did not learn.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medfed.config import Config
from medfed.data import SiteArrays
from medfed.tasks import Task, get_task

__all__ = [
    "FPRS",
    "MIN_GROUP",
    "MAX_SHADOWS",
    "HELD_OUT",
    "AuditError",
    "Groups",
    "attack_metrics",
    "audit_checkpoint",
    "auc",
    "auc_ceiling",
    "bootstrap_auc",
    "canary_test",
    "check_shadows",
    "exposure",
    "lira_offline_scores",
    "logit_confidence",
    "make_canaries",
    "membership_groups",
    "per_sample_losses",
    "run_attacks",
    "theoretical_epsilon",
    "tpr_at_fpr",
    "tpr_ceiling",
    "train_references",
    "verdict",
    "with_ceilings",
]

MIN_GROUP = 20  # members and non-members each: below this an AUC says nothing (its interval spans most of [0, 1])
MAX_SHADOWS = 32
FPRS = (0.01, 0.001)  # the false-positive rates TPR is reported at


class AuditError(ValueError):
    """The audit cannot run on these inputs; the message says why and what it needs."""


# ---------------------------------------------------------------- attack figures (pure functions)


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(a member scores above a non-member), ties counted half (Mann-Whitney U / (n_m n_n))."""
    members, nonmembers = np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)
    ranks = stats.rankdata(np.concatenate([members, nonmembers]))  # average ranks: ties count half
    m, n = len(members), len(nonmembers)
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> dict[str, Any] | None:
    """The most members an attacker flags while flagging at most ``fpr`` of the non-members (score
    strictly above the threshold), with its exact counts and a 95% Clopper-Pearson interval.

    None when there are fewer than 1/``fpr`` non-members: the rate cannot be told from zero false
    positives there (with n non-members the smallest non-zero FPR is 1/n)."""
    members, nonmembers = np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)
    n = len(nonmembers)
    if n < math.ceil(1 / fpr - 1e-9):
        return None
    allowed = math.floor(fpr * n + 1e-9)
    threshold = np.sort(nonmembers)[::-1][allowed]  # the (allowed+1)-th highest non-member score
    flagged = int((members > threshold).sum())
    low, high = clopper_pearson(flagged, len(members))
    return {"tpr": flagged / len(members), "ci95": [low, high], "flagged": flagged, "members": len(members),
            "false_positives": int((nonmembers > threshold).sum()), "nonmembers": n}  # fmt: skip


def clopper_pearson(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided interval of a binomial rate."""
    alpha = 1 - level
    low = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return low, high


def bootstrap_auc(
    members: np.ndarray, nonmembers: np.ndarray, replicates: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of :func:`auc`, members and non-members resampled separately."""
    rng = np.random.default_rng(seed)
    members, nonmembers = np.asarray(members), np.asarray(nonmembers)
    draws = [auc(rng.choice(members, len(members)), rng.choice(nonmembers, len(nonmembers))) for _ in range(replicates)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(low), float(high)


def attack_metrics(
    members: np.ndarray, nonmembers: np.ndarray, replicates: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """AUC (with its bootstrap interval) and TPR at each of :data:`FPRS` (None: too few non-members)
    of an attack scoring ``members`` and ``nonmembers`` (higher: more likely a member)."""
    return {
        "auc": auc(members, nonmembers),
        "auc_ci95": list(bootstrap_auc(members, nonmembers, replicates, seed)),
        "tpr_at_fpr": {f"{fpr:g}": tpr_at_fpr(members, nonmembers, fpr) for fpr in FPRS},
    }


def tpr_ceiling(epsilon: float, delta: float, fpr: float) -> float:
    """The highest TPR at ``fpr`` that any membership test can reach against an (ε, δ)-DP mechanism."""
    return float(min(1.0, math.exp(epsilon) * fpr + delta, 1 - math.exp(-epsilon) * (1 - delta - fpr)))


def auc_ceiling(epsilon: float, delta: float) -> float:
    """The highest AUC any membership test can reach against an (ε, δ)-DP mechanism (the area under
    :func:`tpr_ceiling`, integrated numerically)."""
    grid = np.linspace(0.0, 1.0, 20001)
    curve = np.minimum.reduce(
        [np.ones_like(grid), math.exp(epsilon) * grid + delta, 1 - math.exp(-epsilon) * (1 - delta - grid)]
    )
    return float(np.trapezoid(curve, grid))


def exposure(inserted: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Each inserted canary's exposure in bits, ``log2(n) - log2(rank)``: ``rank`` is its loss's place
    (1: lowest) among its own loss and the ``references``' (canaries never trained on), ties
    counted half, ``n`` = references + 1."""
    inserted, references = np.asarray(inserted, np.float64), np.asarray(references, np.float64)
    below = (references[None, :] < inserted[:, None]).sum(axis=1)
    tied = (references[None, :] == inserted[:, None]).sum(axis=1)
    rank = 1 + below + tied / 2
    return np.log2(len(references) + 1) - np.log2(rank)


def logit_confidence(losses: np.ndarray) -> np.ndarray:
    """LiRA's statistic ``log(p / (1 - p))`` with ``p = exp(-loss)``: ``-log(expm1(loss))``, finite for
    every loss (clipped to [1e-30, 700])."""
    return -np.log(np.expm1(np.clip(np.asarray(losses, np.float64), 1e-30, 700.0)))


def lira_offline_scores(target: np.ndarray, references: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Offline LiRA scores with a fixed variance: ``(phi - mean_out) / sd`` per image.

    ``target`` (n,): the released model's losses; ``references`` (K, n): each reference model's
    losses on the same images; ``out`` (K, n) bool: which reference models to compare each image
    with (never one that trained on it). ``sd`` is the references' spread about each image's mean,
    pooled over images."""
    phi, ref = logit_confidence(target), logit_confidence(references)
    count = out.sum(axis=0)
    if (count < 2).any():
        raise ValueError("every image needs at least 2 reference models that did not train on it")
    mean = np.where(out, ref, 0.0).sum(axis=0) / count
    squares = np.where(out, (ref - mean) ** 2, 0.0).sum(axis=0)
    sd = math.sqrt(squares.sum() / (count - 1).sum()) or 1.0
    return (phi - mean) / sd


# ---------------------------------------------------------------- the model's side


@torch.no_grad()
def per_sample_losses(
    task: Task, model: nn.Module, dataset: Dataset, config: Config, device: torch.device
) -> np.ndarray:
    """The task's loss of ``model`` on each sample of ``dataset`` alone (outputs by ``task.infer`` on
    whole images, as evaluation computes them; the loss on one-sample batches)."""
    model.eval()
    losses: list[float] = []
    for batch in DataLoader(dataset, batch_size=config.evaluation.batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        outputs = task.infer(model, batch["image"], config)
        for i in range(len(outputs)):
            losses.append(float(task.loss(outputs[i : i + 1], {k: v[i : i + 1] for k, v in batch.items()})))
    return np.asarray(losses, dtype=np.float64)


@dataclass(frozen=True)
class Groups:
    """The audit's two groups at a site: ``members`` (its training split) and ``nonmembers`` (its
    held-out images, less any whose pixels equal a training image's: ``duplicates``)."""

    members: SiteArrays
    nonmembers: SiteArrays
    held_out: tuple[str, ...]
    duplicates: int


def membership_groups(site: SiteArrays, held_out: tuple[str, ...], where: str) -> Groups:
    """Members and non-members of ``site`` (named ``where`` in errors); :class:`AuditError` when
    either group has fewer than :data:`MIN_GROUP` images."""
    train = site.splits == "train"
    member_pixels = {_digest(image) for image in site.images[train]}
    copies = np.array([not t and _digest(image) in member_pixels for image, t in zip(site.images, train, strict=True)])
    in_held_out = np.isin(site.splits, held_out)
    held, copied = in_held_out & ~copies, int((in_held_out & copies).sum())
    members, nonmembers = int(train.sum()), int(held.sum())
    if members < MIN_GROUP or nonmembers < MIN_GROUP:
        split_names = " + ".join(held_out)
        raise AuditError(
            f"{where}: {members} training image(s) and {nonmembers} held-out ({split_names}) image(s)"
            + (f" ({copied} more held out are copies of training images)" if copied else "")
            + f": the audit needs at least {MIN_GROUP} of each (fewer give an AUC whose interval spans most of [0, 1])"
        )
    return Groups(site.subset(train), site.subset(held), held_out, copied)


def _digest(image: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest()


def check_shadows(count: int) -> None:
    """Refuse a number of reference models offline LiRA cannot use: an even number, at least 4 (each
    image is compared with half of them, and a spread needs two)."""
    if count < 4 or count % 2 or count > MAX_SHADOWS:
        raise AuditError(f"--shadows {count}: expected 0 or an even number of reference models in [4, {MAX_SHADOWS}]")


def train_references(
    config: Config, nonmembers: SiteArrays, count: int, seed: int
) -> tuple[list[nn.Module], np.ndarray]:
    """``count`` (even, at least 4) reference models trained as ``config`` trains (DP when ``privacy.enabled``),
    on halves of ``nonmembers``: each image in exactly ``count / 2`` of them. Returns the models and
    ``inside`` (count, n) bool: which model trained on which image."""
    from medfed.central import train_central  # training imports Flower's server side: only when asked

    check_shadows(count)
    rng = np.random.default_rng(seed)
    n = len(nonmembers.images)
    inside = np.zeros((count, n), dtype=bool)
    for image in range(n):
        inside[rng.permutation(count)[: count // 2], image] = True
    models = []
    for k in range(count):
        half = nonmembers.subset(inside[k])
        half = SiteArrays(half.images, half.targets, np.full(len(half.images), "train"), half.patient_ids,
                          half.target_key, half.spacing)  # fmt: skip
        model, _ = train_central(config, [half], private=config.privacy.enabled)
        models.append(model)
    return models, inside


def run_attacks(
    config: Config,
    model: nn.Module,
    groups: Groups,
    device: torch.device,
    shadows: int = 0,
    replicates: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The loss-threshold attack (and offline LiRA with ``shadows`` reference models, when > 0) on
    ``model``: ``{"loss": attack_metrics, "lira-offline": attack_metrics + {"shadows"}}`` plus the
    group sizes and each group's mean loss."""
    task = get_task(config.run.task)
    members = groups.members.split("train")
    nonmembers = _as_one_split(groups.nonmembers)
    member_loss = per_sample_losses(task, model, members, config, device)
    nonmember_loss = per_sample_losses(task, model, nonmembers, config, device)
    if not (np.isfinite(member_loss).all() and np.isfinite(nonmember_loss).all()):
        raise AuditError("the model's loss is not finite on some images: no attack can be scored against it")
    result: dict[str, Any] = {
        "members": len(member_loss),
        "nonmembers": len(nonmember_loss),
        "mean_loss": {"members": float(member_loss.mean()), "nonmembers": float(nonmember_loss.mean())},
        "attacks": {"loss": attack_metrics(-member_loss, -nonmember_loss, replicates, seed)},
    }
    if shadows:
        references, inside = train_references(config, groups.nonmembers, shadows, seed)
        rng = np.random.default_rng([seed, 1])
        member_out = np.zeros((shadows, len(member_loss)), dtype=bool)
        for image in range(len(member_loss)):  # members: K/2 references too, so both groups are calibrated alike
            member_out[rng.permutation(shadows)[: shadows // 2], image] = True
        ref_loss = np.stack(
            [
                np.concatenate(
                    [per_sample_losses(task, ref.to(device), ds, config, device) for ds in (members, nonmembers)]
                )
                for ref in references
            ]
        )
        scores = lira_offline_scores(
            np.concatenate([member_loss, nonmember_loss]), ref_loss, np.concatenate([member_out, ~inside], axis=1)
        )
        m = len(member_loss)
        result["attacks"]["lira-offline"] = {
            **attack_metrics(scores[:m], scores[m:], replicates, seed),
            "shadows": shadows,
        }
    return result


def _as_one_split(site: SiteArrays) -> Dataset:
    """All of ``site``'s samples as one dataset, whatever their splits."""
    from medfed.data import ArrayDataset

    return ArrayDataset(site.images, site.targets, site.target_key, site.spacing)


# ---------------------------------------------------------------- canaries


def make_canaries(site: SiteArrays, count: int, seed: int) -> SiteArrays:
    """``count`` canaries for ``site``: random blocky patterns (4 x 4 pixel blocks, or 4^3 voxels, of
    uniform noise over the site's intensity range), each with the target (a label, mask or boxes:
    any task's) of a random training image of a class drawn uniformly from the site's classes.
    Image and target are independent draws, so no canary teaches anything about another: a model
    fits one only by memorising it. All in the ``train`` split."""
    rng = np.random.default_rng([seed, 7])
    train = np.flatnonzero(site.splits == "train")
    labels = site.class_labels()[train]
    classes = np.unique(labels)
    donors = [rng.choice(train[labels == rng.choice(classes)]) for _ in range(count)]
    shape = site.images.shape[1:]
    coarse = (shape[0], *(max(1, math.ceil(s / 4)) for s in shape[1:]))
    low, high = float(site.images.min()), float(site.images.max())
    images = []
    for _ in range(count):
        pattern = rng.uniform(low, high, size=coarse)
        for axis in range(1, len(shape)):
            pattern = np.repeat(pattern, 4, axis=axis)
        images.append(pattern[(slice(None), *(slice(0, s) for s in shape[1:]))])
    assert site.spacing is not None  # filled in by SiteArrays.__post_init__
    return SiteArrays(
        np.stack(images).astype(site.images.dtype),
        site.targets[donors],
        np.full(count, "train"),
        None,
        site.target_key,
        site.spacing[donors],
    )


def canary_test(
    config: Config, site: SiteArrays, private: bool, inserted: int = 5, references: int = 100, seed: int = 0
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Train as ``config`` trains (:func:`medfed.central.train_central`, DP when ``private``) on
    ``site``'s training split plus ``inserted`` canaries; measure each one's :func:`exposure`
    against ``references`` canaries of the same kind never trained on.

    Returns the model, the training info of ``train_central`` (ε, δ, σ, steps) and
    ``{"inserted", "references", "exposure_bits", "max_bits", "mean_bits"}``."""
    from medfed.central import train_central, union

    if inserted < 1 or references < 1:
        raise AuditError(f"canaries: expected at least 1 inserted and 1 reference, got {inserted} and {references}")
    canaries = make_canaries(site, inserted + references, seed)
    trained = union([site, canaries.subset(np.arange(inserted + references) < inserted)])
    if site.patient_ids is not None:  # each canary its own patient: privacy units stay what they were
        canary_ids = np.array([f"canary-{i}" for i in range(inserted)])
        trained = SiteArrays(trained.images, trained.targets, trained.splits,
                             np.concatenate([site.patient_ids.astype(str), canary_ids]), trained.target_key,
                             trained.spacing)  # fmt: skip
    model, info = train_central(config, [trained], private)
    task = get_task(config.run.task)
    losses = per_sample_losses(task, model, canaries.split("train"), config, torch.device("cpu"))
    bits = exposure(losses[:inserted], losses[inserted:])
    result = {
        "inserted": inserted,
        "references": references,
        "exposure_bits": bits.tolist(),
        "max_bits": float(np.log2(references + 1)),
        "mean_bits": float(bits.mean()),
        "mean_loss": {"inserted": float(losses[:inserted].mean()), "references": float(losses[inserted:].mean())},
    }
    return model, info, result


# ---------------------------------------------------------------- the audit of a released checkpoint

HELD_OUT = {"test": ("test",), "val": ("val",), "val+test": ("val", "test")}


def theoretical_epsilon(report_path: Path, meta: dict[str, Any], site: str) -> dict[str, Any]:
    """The ε and δ the run's report (``report_path``, design.md's ``report.json``) states for ``site``
    after the checkpoint's round: ``{"epsilon", "delta", "unit", "source"}``, or ``{"epsilon": None,
    "reason"}`` when the run trained without DP or the report does not name the site.
    :class:`AuditError` naming the file when it is unreadable or belongs to another run."""
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise AuditError(
            f"{report_path}: not a readable run report ({err}): expected the report.json of the run"
        ) from None
    if not isinstance(report, dict) or not isinstance(report.get("config"), dict):
        raise AuditError(f"{report_path}: no 'config' table: expected the report.json of a medfed run")
    ours = {k: v for k, v in (meta.get("config") or {}).items() if k != "evaluation"}
    theirs = {k: v for k, v in report["config"].items() if k != "evaluation"}
    if ours != theirs:
        differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise AuditError(
            f"{report_path}: the report is of another run than the checkpoint (its [{', '.join(differ)}] "
            "settings differ): pass the report of the run that released this model with --report"
        )
    privacy = report.get("privacy")
    if not privacy:
        return {"epsilon": None, "reason": "the run trained without differential privacy", "source": report_path.name}
    entry = privacy.get(site) if isinstance(privacy, dict) else None
    if not isinstance(entry, dict):
        known = ", ".join(sorted(map(str, privacy))) if isinstance(privacy, dict) else "none"
        return {"epsilon": None, "reason": f"the report has no ε for site {site!r} (it has: {known})",
                "source": report_path.name}  # fmt: skip
    epsilon, delta = entry.get("epsilon"), entry.get("delta")
    listed = report.get("rounds")
    rounds = [r for r in listed if isinstance(r, dict)] if isinstance(listed, list) else []
    if rounds and meta.get("round") != rounds[-1].get("round"):  # an earlier round's model: the ε spent by then
        spent = next((r.get("epsilon") for r in rounds if r.get("round") == meta.get("round")), None)
        epsilon = spent.get(site, epsilon) if isinstance(spent, dict) else epsilon
    if not (_number(epsilon) and _number(delta)):
        raise AuditError(f"{report_path}: site {site!r}'s ε / δ are not finite numbers: {epsilon!r} / {delta!r}")
    return {"epsilon": float(epsilon), "delta": float(delta), "unit": entry.get("unit", "image"),
            "source": report_path.name}  # fmt: skip


def _number(value: object) -> TypeGuard[float]:
    """A finite non-negative number (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def with_ceilings(theory: dict[str, Any]) -> dict[str, Any]:
    """``theory`` plus what its ε permits any attack: ``auc_ceiling`` and ``tpr_ceiling`` per FPR."""
    if theory.get("epsilon") is None:
        return theory
    epsilon, delta = theory["epsilon"], theory["delta"]
    ceilings = {f"{fpr:g}": tpr_ceiling(epsilon, delta, fpr) for fpr in FPRS}
    return {**theory, "auc_ceiling": auc_ceiling(epsilon, delta), "tpr_ceiling": ceilings}


def verdict(attacks: dict[str, dict[str, Any]], theory: dict[str, Any]) -> list[str]:
    """One line per attack: better than chance or not (its AUC's 95% interval against 0.5), and
    within or beyond what the model's ε permits."""
    lines = []
    for name, result in attacks.items():
        low, high = result["auc_ci95"]
        line = f"{name}: AUC {result['auc']:.3f} [{low:.3f}, {high:.3f}], " + (
            "better than chance" if low > 0.5 else "not distinguishable from chance (0.5) at 95%"
        )
        if theory.get("epsilon") is not None:
            ceiling = theory["auc_ceiling"]
            beyond = [f"AUC {low:.3f} > {ceiling:.3f}"] if low > ceiling else []
            for fpr, rate in result["tpr_at_fpr"].items():
                if rate is not None and rate["ci95"][0] > theory["tpr_ceiling"][fpr]:
                    beyond.append(f"TPR at FPR {fpr}: {rate['ci95'][0]:.3f} > {theory['tpr_ceiling'][fpr]:.3f}")
            line += (
                f"; BEYOND what ε = {theory['epsilon']:.3g} permits ({'; '.join(beyond)}, lower 95% bounds): the "
                "guarantee does not hold, or the held-out images differ in kind from the training ones"
                if beyond
                else f"; within what ε = {theory['epsilon']:.3g} permits (AUC ≤ {ceiling:.3f})"
            )
        else:
            line += "; no DP bound to compare with"
        lines.append(line)
    return lines


def audit_checkpoint(
    checkpoint: Path,
    *,
    data: Path | None = None,
    site: str = "",
    config_file: Path | None = None,
    report: Path | None = None,
    held_out: str = "val+test",
    shadows: int = 0,
    replicates: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The membership-inference audit of the model in ``checkpoint`` at one site (the contents of
    ``audit.json``; see the module docstring).

    The site is the folder ``data`` (read as the model's run reads it), or else simulated site
    ``site`` (default: the first) of ``config_file`` (default: the checkpoint's own config; its task
    must be the checkpoint's). ε comes from ``report`` (default: the ``report.json`` of the run
    folder the checkpoint lies in), for ``site`` (default: the data folder's name). Every input
    that cannot be used is an :class:`AuditError`, :class:`FileNotFoundError`, :class:`ConfigError`
    or :class:`DataError` naming the file or option."""
    from medfed.config import load_config
    from medfed.data import load_simulated_site, read_site, simulated_site_names
    from medfed.data.manifest import SiteReading
    from medfed.predict import read_checkpoint_model
    from medfed.run_folder import RunFolder
    from medfed.training import resolve_device

    if held_out not in HELD_OUT:
        raise AuditError(f"--held-out {held_out!r}: expected one of {', '.join(HELD_OUT)}")
    if shadows:
        check_shadows(shadows)
    if not 100 <= replicates <= 100_000:
        raise AuditError(f"--bootstrap {replicates}: expected a number of resamples in [100, 100000]")
    config, model, meta = read_checkpoint_model(checkpoint)
    task = get_task(config.run.task)
    if config_file is not None:
        run_config = load_config(config_file)
        if run_config.run.task != config.run.task:
            raise AuditError(
                f"{config_file}: a {run_config.run.task} config, but {checkpoint.name} is a "
                f"{config.run.task} model: pass the config of the run that trained it"
            )
    else:
        run_config = config
    if data is not None:
        arrays = read_site(data, SiteReading.from_config(config.data, task.TARGET))
        site, where = site or data.name, str(data)
    else:
        names = simulated_site_names(run_config)
        if site and site not in names:
            raise AuditError(f"--site {site!r}: the config's simulated sites are {', '.join(names)}")
        site = site or names[0]
        site, arrays = load_simulated_site(run_config, names.index(site))
        where = f"simulated site {site!r}"
    groups = membership_groups(arrays, HELD_OUT[held_out], where)
    if report is None:
        folder = RunFolder(checkpoint.parent.parent)
        report = folder.report_json if checkpoint.parent == folder.checkpoints else None
    if report is not None and report.is_file():
        theory = with_ceilings(theoretical_epsilon(report, meta, site))
    else:
        missing = f"{report} not found" if report is not None else "the checkpoint is not in a run folder"
        theory = {"epsilon": None, "reason": f"{missing}: pass the run's report.json with --report"}
    try:
        result = run_attacks(config, model, groups, resolve_device("auto"), shadows, replicates, seed)
    except (FileNotFoundError, ValueError, RuntimeError) as err:  # a reference model's start (run.initial-model)
        raise AuditError(f"the attacks could not run: {err}") from None
    return {
        "checkpoint": checkpoint.name,
        "round": meta.get("round"),
        "task": config.run.task,
        "site": site,
        "held_out": list(groups.held_out),
        "copies_of_training_images_left_out": groups.duplicates,
        **result,
        "theory": theory,
        "verdict": verdict(result["attacks"], theory),
        "bootstrap_replicates": replicates,
        "seed": seed,
        "note": "An attack's success is a lower bound on what the model leaks (a stronger attack may do "
        "better); held-out images that differ in kind from the training ones raise the AUC without any "
        "memorisation. TPR at an FPR is n/a with fewer than 1/FPR non-members; its interval is exact "
        "(Clopper-Pearson), the AUC's a bootstrap over members and non-members.",
    }
