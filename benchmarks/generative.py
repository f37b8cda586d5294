"""Does generated data help the smallest sites? BreastMNIST split into 3 hospitals (Dirichlet(1.0)
label skew, seed 0, as ``benchmarks/utility.py``), each training its own classifier (no DP, the
config's network) on its training split with:

- **none**: the real images only;
- **classic**: plus random shifts and rotations (``train.augment``);
- **local, no DP**: plus images drawn from a class-conditional diffusion model
  (:mod:`medfed.generative`) the site trained alone on its own images without DP: those images may
  reproduce the site's patients and must stay at the site;
- **local, DP**: the same generator trained with DP-SGD at ε = 8 (charged to a ledger);
- **federated, DP**: one generator trained by the three sites together (FedAvg, DP-SGD at each site,
  ε = 8 each), whose samples, being DP, may be shared.

Generated images are added at ``--ratio`` per real training image, to the scarce class first
(:func:`medfed.generative.synthetic_counts`). Score: test AUROC per site with a 95 % bootstrap
interval (200 resamples) and the mean over sites. Image quality: a classifier two-sample test
(logistic regression on pixels, 5-fold cross-validated AUROC of real test images against as many
generated ones: 0.5 = indistinguishable, 1 = told apart every time). Time: seconds to train each
generator and to draw its images, on this machine (one torch thread per process).

    .venv/bin/medfed bench generative [--quick] [--steps 40] [--ratio 1.0] [--sample-steps 10]

Writes benchmarks/results/generative.json (``--quick``: 10 generator steps, generative-quick.json),
plots/generative.png (AUROC per site and arm) and plots/generative-samples.png (sample grids).
Segmentation: benchmarks/generative_masks.py (mask-conditioned generation, synthetic lesion sites).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.supercore.task_identity import TaskIdentity
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from benchmarks.harness import CONFIGS, pyplot, results_path, save_figure, write_results
from medfed.central import train_central
from medfed.config import Config, load_config
from medfed.data import SiteArrays, load_simulated_site
from medfed.evaluation.bootstrap import bootstrap_scores, mean_of_sites, without_draws
from medfed.federation import run_federation
from medfed.generative import ConditionalDiffusion, fit_generator, sample, synthetic_counts, with_synthetic
from medfed.in_process import InProcessGrid
from medfed.protocol import global_model

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "medmnist" / "breastmnist.npz"
ARMS = ("none", "classic", "local-nodp", "local-dp", "federated-dp")
CLASSIFIER_EPOCHS = 12  # local epochs of each site's classifier


def configs(steps: int, quick: bool) -> tuple[Config, Config]:
    """The classifier's and the generator's configs on the same three BreastMNIST sites."""
    if not DATA.is_file():
        raise SystemExit(f"BreastMNIST not found at {DATA} (the benchmarks read ../shared/data beside the repo)")
    data = {"data.path": str(DATA), "data.alpha": 1.0}
    classifier = load_config(
        CONFIGS / "classification-breastmnist.toml",
        data | {"privacy.enabled": False, "evaluation.cross-site": False, "evaluation.example-images": 0},
    )
    rounds = 2 if quick else 4
    generator = load_config(
        CONFIGS / "generation-breastmnist.toml",
        data | {"model.width": 8, "run.rounds": rounds, "train.local-steps": max(steps // rounds, 1)},
    )
    return classifier, generator


def draw(
    model: ConditionalDiffusion, site: SiteArrays, ratio: float, config: Config, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Generated images for ``site``: ``ratio`` per training image, the scarce class first."""
    labels = site.targets[site.splits == "train"]
    counts = synthetic_counts(labels, config.data.num_classes, ratio)
    wanted = torch.arange(config.data.num_classes).repeat_interleave(torch.as_tensor(counts))
    images = sample(model, wanted, config.data.image_size, steps, config.run.seed)
    return images.numpy(), wanted.numpy()


def two_sample_auroc(real: np.ndarray, fake: np.ndarray, seed: int = 0) -> float:
    """Cross-validated AUROC of a logistic regression telling real from generated images (pixels)."""
    n = min(len(real), len(fake))
    rng = np.random.default_rng(seed)
    x = np.concatenate([real[rng.permutation(len(real))[:n]], fake[rng.permutation(len(fake))[:n]]]).reshape(2 * n, -1)
    y = np.repeat([0, 1], n)
    scores = cross_val_score(LogisticRegression(max_iter=500, C=0.1), x, y, cv=5, scoring="roc_auc")
    return float(scores.mean())


def classifier_scores(config: Config, site_name: str, site: SiteArrays, replicates: int, epochs: int) -> dict[str, Any]:
    """The site's own classifier on ``site``'s training split: test AUROC with its interval, seconds."""
    started = time.perf_counter()
    model, _ = train_central(config, [site], private=False, epochs=epochs)
    scores = bootstrap_scores(config, model, {site_name: site}, replicates)["per_site"][site_name]
    return scores | {"seconds": time.perf_counter() - started}


def run(steps: int, ratio: float, quick: bool, out: Path, replicates: int, sample_steps: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    classifier, generator = configs(steps, quick)
    sites = dict(load_simulated_site(classifier, i) for i in range(classifier.data.sites))
    for i, (name, site) in enumerate(sites.items()):  # the federated generator's sites are these sites
        if not np.array_equal(load_simulated_site(generator, i)[1].images, site.images):
            raise SystemExit(f"{name}: the generator's config partitions BreastMNIST differently from the classifier's")
    epochs = 2 if quick else CLASSIFIER_EPOCHS
    generated: dict[str, dict[str, Any]] = {arm: {} for arm in ARMS[2:]}
    grids: dict[str, torch.Tensor] = {}

    started = time.perf_counter()  # the federated generator: FedAvg of DP-SGD sites, in this process
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # what building a Message needs
    folder = out / "federated-dp"
    report = run_federation(InProcessGrid({i: {"partition-id": i} for i in range(len(sites))}, run_id=1), generator,
                            folder)  # fmt: skip
    federated = global_model(generator, folder)
    fed_seconds = time.perf_counter() - started
    print(f"federated generator: {fed_seconds:.0f} s, ε {[round(p['epsilon'], 2) for p in report['privacy'].values()]}")
    fed_rounds = [{"round": r["round"], "metrics": r["metrics"]} for r in report["rounds"]]

    for index, (name, site) in enumerate(sites.items()):
        for arm in ARMS[2:]:
            started = time.perf_counter()
            if arm == "federated-dp":
                fit = {"steps": generator.train.local_steps * generator.run.rounds, "seconds": fed_seconds,
                       "epsilon": report["privacy"][name]["epsilon"]}  # fmt: skip
                model = federated
            else:
                private = arm == "local-dp"
                config = generator.with_overrides({"privacy.enabled": private})
                with tempfile.TemporaryDirectory() as state:
                    trained, info = fit_generator(config, site, state_dir=Path(state), budget=100.0,
                                                  run_key=f"bench-{name}", seed=index)  # fmt: skip
                model, fit = trained, info.as_dict()
            trained_at = time.perf_counter()
            images, labels = draw(model, site, ratio, generator, sample_steps)
            real_test = site.images[site.splits == "test"]
            generated[arm][name] = {
                "generator": fit,
                "sample_seconds": time.perf_counter() - trained_at,
                "images": len(images),
                "per_class": np.bincount(labels, minlength=generator.data.num_classes).tolist(),
                "two_sample_auroc": two_sample_auroc(real_test, images),
                "mixed": with_synthetic(site, images, labels),
            }
            if index == 0:
                grids[arm] = sample(model, torch.arange(2).repeat_interleave(6), 28, sample_steps, 0)
            print(f"{name} {arm}: generator {fit['seconds']:.0f} s, sampling "
                  f"{generated[arm][name]['sample_seconds']:.0f} s, two-sample AUROC "
                  f"{generated[arm][name]['two_sample_auroc']:.3f}")  # fmt: skip

    arms: dict[str, Any] = {}
    for arm in ARMS:
        per_site = {}
        for name, site in sites.items():
            config = classifier.with_overrides({"train.augment": True}) if arm == "classic" else classifier
            data = site if arm in ("none", "classic") else generated[arm][name].pop("mixed")
            per_site[name] = classifier_scores(config, name, data, replicates, epochs)
            print(f"{name} {arm}: test AUROC {per_site[name]['value']:.3f} "
                  f"[{per_site[name]['low']:.3f}, {per_site[name]['high']:.3f}]")  # fmt: skip
        arms[arm] = {"per_site": per_site, "mean": mean_of_sites(list(per_site.values()))}
        if arm in generated:
            arms[arm]["generation"] = generated[arm]
    _grid_figure(grids, out / "samples.png")
    return {
        "benchmark": "generative",
        "quick": quick,
        "dataset": "breastmnist",
        "settings": {
            "sites": classifier.data.sites,
            "train_images": {n: int((s.splits == "train").sum()) for n, s in sites.items()},
            "train_per_class": {
                n: np.bincount(s.targets[s.splits == "train"], minlength=2).tolist() for n, s in sites.items()
            },  # fmt: skip
            "generator_steps": steps,
            "generator_width": generator.model.width,
            "generator_epsilon": generator.privacy.target_epsilon,
            "federated_rounds": generator.run.rounds,
            "ratio": ratio,
            "sample_steps": sample_steps,
            "classifier_epochs": epochs,
            "replicates": replicates,
            "torch_threads": 1,
        },
        "federated_rounds_metrics": fed_rounds,
        "arms": without_draws(arms),
    }


def _grid_figure(grids: dict[str, torch.Tensor], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(len(grids), 12, figsize=(12, 1.3 * len(grids) + 0.3), squeeze=False)
    for row, (arm, images) in enumerate(grids.items()):
        for col, image in enumerate(images):
            axes[row][col].imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[row][col].axis("off")
        axes[row][0].set_title(f"{arm} (site-1): malignant x 6, normal/benign x 6", fontsize=8, loc="left")
    save_figure(fig, path)


def _plot(summary: dict[str, Any]) -> Any:
    def plot(path: Path) -> None:
        plt = pyplot()
        arms = summary["arms"]
        sites = list(next(iter(arms.values()))["per_site"])
        fig, ax = plt.subplots(figsize=(7, 3.8))
        width = 0.8 / len(arms)
        for k, (arm, entry) in enumerate(arms.items()):
            values = [entry["per_site"][s]["value"] for s in sites]
            low = [entry["per_site"][s]["value"] - entry["per_site"][s]["low"] for s in sites]
            high = [entry["per_site"][s]["high"] - entry["per_site"][s]["value"] for s in sites]
            ax.bar(np.arange(len(sites)) + k * width, values, width, yerr=[low, high], label=arm, capsize=2)
        ax.set_xticks(np.arange(len(sites)) + 0.4 - width / 2, sites)
        ax.set_ylabel("test AUROC (95 % interval)")
        ax.set_ylim(0.4, 1.0)
        ax.legend(fontsize=7, ncol=3)
        ax.set_title("BreastMNIST, 3 sites: each site's own classifier with generated data")
        save_figure(fig, path)

    return plot


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 generator steps, 2 federated rounds")
    parser.add_argument("--steps", type=int, default=40, help="generator training steps (local; federated per site)")
    parser.add_argument("--ratio", type=float, default=1.0, help="generated images per real training image")
    parser.add_argument("--sample-steps", type=int, default=10, help="DDIM denoising steps per generated image")
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-generative")
    args = parser.parse_args(argv)
    steps = 10 if args.quick else args.steps
    summary = run(steps, args.ratio, args.quick, args.out, args.replicates, args.sample_steps)
    path = results_path("generative", args.quick)
    grid = path.parent / "plots" / f"{path.stem}-samples.png"
    grid.parent.mkdir(parents=True, exist_ok=True)
    (args.out / "samples.png").replace(grid)
    write_results(path, summary, _plot(summary))


if __name__ == "__main__":
    main()
