"""How long must a site's generator train before its images pass for real, and do they then help?

One BreastMNIST hospital (``--site``, default site-3 of the Dirichlet(1.0) split of
``benchmarks/generative.py``: 287 training images, 32 malignant) trains the class-conditional
diffusion model of ``benchmarks/generative.py`` (``model.width`` 8: 42 k parameters) for as many steps as
this CPU allows, without DP and with DP-SGD (ε = 8 over all its steps, δ = 1/(10 n)), and after
several step counts draws as many images as the site has test images (the same classes) and
measures:

- the classifier two-sample AUROC of ``benchmarks/generative.py`` (real test images against
  generated ones; 0.5 = indistinguishable, 1 = told apart every time);
- copying: the median distance from a generated image to its nearest training image, over the
  same for the real test images (below 1: the generator draws closer to its training images than
  new patients are, a sign of memorising them).

Then each trained generator adds ``--ratio`` generated images per training image to the site's
training split (the scarce class first) and the site's own classifier (the config's CNN, 12
epochs, no DP) is trained on it and on the real images alone, at ``--seeds`` classifier seeds: test
AUROC with its 95 % bootstrap interval per seed.

    PYTHONPATH=. .venv/bin/python -m benchmarks.generative_long [--steps 800] [--dp-steps 400]

Writes benchmarks/results/generative_long.json (kept after every measurement, so a run stopped
early keeps what it measured), plots/generative_long.png (two-sample AUROC against steps) and
plots/generative_long-samples.png (the last samples of each generator).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from benchmarks.generative import CLASSIFIER_EPOCHS, classifier_scores, configs, draw, two_sample_auroc
from benchmarks.harness import pyplot, results_path, save_figure, save_json, write_results
from medfed.central import train_loader
from medfed.config import Config
from medfed.data import SiteArrays, load_simulated_site
from medfed.evaluation.bootstrap import without_draws
from medfed.generative import ConditionalDiffusion, sample, save_grid, with_synthetic
from medfed.privacy import PrivacyLedger, calibrate_noise, default_delta, make_private
from medfed.site import seed_everything
from medfed.tasks import get_task
from medfed.training import build_optimizer, train

REPO = Path(__file__).resolve().parent.parent
SAMPLE_STEPS = 25  # DDIM steps per generated image


def checkpoints(steps: int) -> list[int]:
    """Step counts to measure at: doubling from 100, and the last."""
    points, at = [], 100
    while at < steps:
        points.append(at)
        at *= 2
    return [*points, steps]


def copying(generated: np.ndarray, train_images: np.ndarray, test_images: np.ndarray) -> float:
    """Median nearest-training-image distance of ``generated`` over that of the real test images."""

    def nearest(images: np.ndarray) -> float:
        a = torch.as_tensor(images.reshape(len(images), -1), dtype=torch.float32)
        b = torch.as_tensor(train_images.reshape(len(train_images), -1), dtype=torch.float32)
        return float(torch.cdist(a, b).min(dim=1).values.median())

    return nearest(generated) / nearest(test_images)


def fit(config: Config, site: SiteArrays, steps: int, private: bool, save: Any) -> tuple[ConditionalDiffusion, list]:
    """Train one generator ``steps`` steps, measuring it at :func:`checkpoints`."""
    seed_everything(config.run.seed)
    task = get_task("generation")
    model = cast(ConditionalDiffusion, task.build_model(config))
    loader = train_loader(config, site)
    optimizer = build_optimizer(model, config.train)
    trained: torch.nn.Module = model
    sigma = rate = delta = None
    if private:
        units = len(loader.dataset)  # type: ignore[arg-type]  # a sized dataset
        delta, rate = default_delta(units), 1 / len(loader)
        sigma = calibrate_noise(config.privacy.target_epsilon, delta, rate, steps, "rdp")
        trained, optimizer, loader = make_private(model, optimizer, loader, sigma, config.privacy.max_grad_norm)
    train_images = site.images[site.splits == "train"]
    test_images, test_labels = site.images[site.splits == "test"], torch.as_tensor(site.targets[site.splits == "test"])
    done, seconds, curve = 0, 0.0, []
    for point in checkpoints(steps):
        started = time.perf_counter()
        train(task, trained, loader, optimizer, torch.device("cpu"), epochs=0, max_steps=point - done)
        seconds += time.perf_counter() - started
        done = point
        started = time.perf_counter()
        images = sample(model, test_labels, config.data.image_size, SAMPLE_STEPS, config.run.seed).numpy()
        entry = {
            "steps": point,
            "train_seconds": seconds,
            "sample_seconds": time.perf_counter() - started,
            "two_sample_auroc": two_sample_auroc(test_images, images),
            "copying": copying(images, train_images, test_images),
            "epsilon": None,
        }
        if private:
            ledger = PrivacyLedger(path=Path("/dev/null"), delta=cast(float, delta))
            entry["epsilon"] = ledger.epsilon([[cast(float, sigma), cast(float, rate), point]])
        curve.append(entry)
        print(f"{'DP' if private else 'no DP'} {point} steps ({seconds:.0f} s): two-sample AUROC "
              f"{entry['two_sample_auroc']:.3f}, copying {entry['copying']:.2f}", flush=True)  # fmt: skip
        save(curve)
    return model, curve


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    classifier, generator = configs(args.steps, quick=False)
    generator = generator.with_overrides({"run.rounds": 1})
    name, site = load_simulated_site(classifier, args.site)
    labels = site.targets[site.splits == "train"]
    summary: dict[str, Any] = {
        "benchmark": "generative_long",
        "complete": False,  # True once every measurement below is in (the file is kept after each one)
        "dataset": "breastmnist",
        "settings": {
            "site": name,
            "train_images": int(len(labels)),
            "train_per_class": np.bincount(labels, minlength=2).tolist(),
            "test_images": int((site.splits == "test").sum()),
            "generator_width": generator.model.width,
            "generator_batch": generator.train.batch_size,
            "generator_lr": generator.train.lr,
            "steps": {"no DP": args.steps, "DP": args.dp_steps},
            "dp_epsilon": generator.privacy.target_epsilon,
            "sample_steps": SAMPLE_STEPS,
            "ratio": args.ratio,
            "classifier_epochs": CLASSIFIER_EPOCHS,
            "classifier_seeds": args.seeds,
            "torch_threads": 1,
        },
        "generators": {},
    }
    path = results_path("generative_long")
    models = {}
    for arm, steps, private in (("no DP", args.steps, False), ("DP", args.dp_steps, True)):
        if not steps:
            continue

        def keep(curve: list, arm: str = arm) -> None:
            summary["generators"][arm] = {"curve": curve}
            save_json(path, summary)

        models[arm], _ = fit(generator, site, steps, private, keep)
    classifiers: dict[str, list[dict[str, Any]]] = {"none": []}
    mixed = {"none": site}
    for arm, model in models.items():
        started = time.perf_counter()
        images, drawn = draw(model, site, args.ratio, generator, SAMPLE_STEPS)
        summary["generators"][arm]["mix"] = {"images": len(images), "per_class": np.bincount(drawn, minlength=2).tolist(),
                                             "sample_seconds": time.perf_counter() - started}  # fmt: skip
        mixed[arm], classifiers[arm] = with_synthetic(site, images, drawn), []
    for seed in range(args.seeds):
        for arm, data in mixed.items():
            config = classifier.with_overrides({"run.seed": seed})
            scores = without_draws({"s": classifier_scores(config, name, data, args.replicates, CLASSIFIER_EPOCHS)})[
                "s"
            ]
            classifiers[arm].append(scores)
            print(f"classifier seed {seed}, {arm}: test AUROC {scores['value']:.3f} "
                  f"[{scores['low']:.2f}, {scores['high']:.2f}]", flush=True)  # fmt: skip
            summary["classifier"] = classifiers
            save_json(path, summary)
    grids = {arm: sample(m, torch.arange(2).repeat_interleave(8), 28, SAMPLE_STEPS, 0) for arm, m in models.items()}
    for arm, images in grids.items():
        grid = path.parent / "plots" / f"generative_long-samples-{arm.replace(' ', '').lower()}.png"
        save_grid(images, torch.arange(2).repeat_interleave(8), grid, f"{name}, {arm}, "
                  f"{summary['settings']['steps'][arm]} steps", generator.data.class_names)  # fmt: skip
    summary["complete"] = True
    write_results(path, summary, _plot(summary))
    return summary


def _plot(summary: dict[str, Any]) -> Any:
    def plot(path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for arm, entry in summary["generators"].items():
            curve = entry["curve"]
            ax.plot([c["steps"] for c in curve], [c["two_sample_auroc"] for c in curve], marker="o", label=arm)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("generator steps (batch 32)")
        ax.set_ylabel("two-sample AUROC (1: told apart)")
        ax.set_ylim(0.4, 1.02)
        ax.legend()
        ax.set_title(f"BreastMNIST {summary['settings']['site']}: generated vs real test images", fontsize=9)
        save_figure(fig, path)

    return plot


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", type=int, default=2, help="index of the BreastMNIST hospital (0-2)")
    parser.add_argument("--steps", type=int, default=800, help="generator steps without DP")
    parser.add_argument("--dp-steps", type=int, default=400, help="generator steps with DP-SGD (ε = 8 over them)")
    parser.add_argument("--ratio", type=float, default=1.0, help="generated images per real training image")
    parser.add_argument("--seeds", type=int, default=3, help="classifier seeds")
    parser.add_argument("--replicates", type=int, default=200)
    args = parser.parse_args(argv)
    run(args)


if __name__ == "__main__":
    main()
