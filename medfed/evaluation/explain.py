"""Example figures of a model on a few test images, made where the images are.

Classification: Grad-CAM saliency (monai.visualize) beside the image; multi-label, one
saliency map per finding called present (else for the most probable one). Segmentation: the
predicted mask against the reference mask. Detection: predicted boxes against reference boxes. These pictures contain patient images, so they are
written only to a folder at the site (or the researcher's machine in a simulation); nothing here
is ever sent to the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from monai.visualize import GradCAM
from torch import nn

from medfed.config import Config
from medfed.data.arrays import ArrayDataset
from medfed.tasks import Task, predict
from medfed.tasks.classification import label_thresholds

__all__ = [
    "EXAMPLE_CAPTIONS",
    "boxes_figure",
    "busiest_slice",
    "display_gray",
    "example_images",
    "label_saliency_figure",
    "mask_overlay_figure",
]

SHOWN_SCORE = 0.3

EXAMPLE_CAPTIONS = {
    "label": (
        "Why the model decided: Grad-CAM",
        "Warm colours mark the image regions that drove the predicted class.",
    ),
    "mask": (
        "Predicted and reference masks",
        "Green: reference only (missed), red: prediction only (false alarm), yellow: both.",
    ),
    "instances": (
        "Predicted and reference objects",
        "Green: reference objects only (missed), red: predicted objects only (false alarm), yellow: both.",
    ),
    "boxes": (
        "Predicted and reference boxes",
        f"Green: reference boxes; red: detections with score >= {SHOWN_SCORE}, labelled class:score.",
    ),
}


def example_images(
    task: Task, model: nn.Module, dataset: ArrayDataset, config: Config, out_dir: Path, prefix: str
) -> list[Path]:
    """Write up to ``evaluation.example-images`` PNGs for the task's kind of target; return their paths."""
    matplotlib.use("Agg")  # figures go to files: no display needed
    count = config.evaluation.example_images
    if count <= 0 or len(dataset) == 0:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    target = task.TARGET
    paths = []
    for index in range(min(count, len(dataset))):
        sample = dataset[index]
        image = sample["image"][None]
        if target in ("mask", "instances"):
            fig = _mask_figure(task, model, sample, config)
        elif target == "boxes":
            detections = predict(task, model, image, config)[0].numpy()
            fig = boxes_figure(display_gray(image[0]), detections, sample["boxes"].numpy(), config.data.class_names)
        elif hasattr(task, "explain_layer") and config.data.multi_label:
            fig = _multilabel_figure(task, model, image, sample["label"], config)
        elif hasattr(task, "explain_layer"):
            fig = _gradcam_figure(model, task.explain_layer(config), image, int(sample["label"]))
        else:
            return []
        path = out_dir / f"{prefix}-{index}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _gradcam_figure(model: nn.Module, layer: str, image: torch.Tensor, label: int) -> Any:
    probs = torch.softmax(model(image), dim=1)[0].detach()
    predicted = int(probs.argmax())
    saliency = GradCAM(nn_module=model, target_layers=layer)(x=image, class_idx=predicted)[0, 0].detach().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(4, 2.2))
    gray = display_gray(image[0])
    axes[0].imshow(gray, cmap="gray")
    axes[0].set_title(f"label {label}", fontsize=8)
    axes[1].imshow(gray, cmap="gray")
    axes[1].imshow(saliency, cmap="jet", alpha=0.45)
    axes[1].set_title(f"pred {predicted} (p={float(probs[predicted]):.2f})", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _multilabel_figure(task: Task, model: nn.Module, image: torch.Tensor, truth: torch.Tensor, config: Config) -> Any:
    """Grad-CAM of every finding the model calls present in ``image`` (else of its most probable one)."""
    probs = predict(task, model, image, config)[0].numpy()
    called = [int(k) for k in np.flatnonzero(probs >= label_thresholds(config))]
    names = config.data.class_names or tuple(f"class {k}" for k in range(config.data.num_classes))
    shown = [(k, names[k], float(probs[k])) for k in called or [int(probs.argmax())]]
    present = ", ".join(names[k] for k in np.flatnonzero(truth.numpy())) or "none"
    layer = task.explain_layer(config)  # type: ignore[attr-defined]  # classification's
    return label_saliency_figure(model, layer, image, shown, f"reference: {present}")


def label_saliency_figure(
    model: nn.Module, layer: str, image: torch.Tensor, labels: list[tuple[int, str, float]], title: str
) -> Any:
    """The image (``(1, C, H, W)``) and, per ``(class index, name, probability)`` of ``labels``, the
    Grad-CAM saliency of that class's output over it."""
    gray = display_gray(image[0])
    fig, axes = plt.subplots(1, 1 + len(labels), figsize=(2 * (1 + len(labels)), 2.2), squeeze=False)
    axes[0, 0].imshow(gray, cmap="gray")
    axes[0, 0].set_title(title.replace("$", r"\$"), fontsize=7)
    for ax, (k, name, probability) in zip(axes[0, 1:], labels, strict=True):
        saliency = GradCAM(nn_module=model, target_layers=layer)(x=image, class_idx=k)[0, 0].detach().numpy()
        ax.imshow(gray, cmap="gray")
        ax.imshow(saliency, cmap="jet", alpha=0.45)
        ax.set_title(f"{name} (p={probability:.2f})".replace("$", r"\$"), fontsize=7)
    for ax in axes[0]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _mask_figure(task: Task, model: nn.Module, sample: dict[str, torch.Tensor], config: Config) -> Any:
    predicted = predict(task, model, sample["image"][None], config)[0, 0].numpy() > 0
    reference = sample[task.TARGET][0].numpy() > 0
    gray = display_gray(sample["image"])
    title = "image"
    if gray.ndim == 3:  # a volume: show the slice with the most reference (else predicted) foreground
        z = busiest_slice(reference if reference.any() else predicted)
        gray, predicted, reference, title = gray[z], predicted[z], reference[z], f"slice {z}"
    return mask_overlay_figure(gray, predicted, reference, title)


def display_gray(image: torch.Tensor) -> np.ndarray:
    """A model input ``(C, *spatial)`` as one grey picture: the luminance of an RGB image
    (0.299 R + 0.587 G + 0.114 B), else its first channel."""
    array = image.detach().cpu().numpy()
    if len(array) == 3:
        return np.tensordot(np.array([0.299, 0.587, 0.114], dtype=array.dtype), array, axes=1)
    return array[0]


def busiest_slice(mask: np.ndarray) -> int:
    """Index along the first axis of the slice of a 3D mask with the most foreground."""
    return int(mask.reshape(len(mask), -1).sum(axis=1).argmax())


def mask_overlay_figure(gray: np.ndarray, predicted: np.ndarray, reference: np.ndarray | None, title: str) -> Any:
    """Image beside the predicted mask (red), the reference-only part (green) and both (yellow)."""
    matplotlib.use("Agg")  # figures go to files: no display needed
    overlay = np.stack([gray, gray, gray], axis=-1).astype(np.float32)
    reference = np.zeros_like(predicted) if reference is None else reference
    overlay[predicted & ~reference] = [1.0, 0.1, 0.1]
    overlay[reference & ~predicted] = [0.1, 0.9, 0.1]
    overlay[predicted & reference] = [1.0, 0.9, 0.1]
    fig, axes = plt.subplots(1, 2, figsize=(4, 2.2))
    axes[0].imshow(gray, cmap="gray")
    axes[0].set_title(title, fontsize=8)
    axes[1].imshow(np.clip(overlay, 0, 1))
    axes[1].set_title("prediction vs reference" if reference.any() else "prediction", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def boxes_figure(
    gray: np.ndarray,
    detections: np.ndarray,
    reference: np.ndarray | None,
    class_names: tuple[str, ...] = (),
    min_score: float = SHOWN_SCORE,
) -> Any:
    """The image with reference boxes (green) and detections ``[x1, y1, x2, y2, score, class]`` scoring
    at least ``min_score`` (red)."""
    matplotlib.use("Agg")  # figures go to files: no display needed
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(3.2, 3.4))
    ax.imshow(gray, cmap="gray")
    shown = detections[(detections[:, 5] >= 0) & (detections[:, 4] >= min_score)]
    rows = np.empty((0, 5)) if reference is None else reference[reference[:, 4] >= 0]
    for x1, y1, x2, y2, _ in rows:
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=1.2))
    for x1, y1, x2, y2, score, cls in shown:
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red", linewidth=0.9))
        name = class_names[int(cls)] if int(cls) < len(class_names) else str(int(cls))
        ax.text(x1, y1, f"{name}:{score:.2f}", color="red", fontsize=5, va="bottom")
    title = f"{len(shown)} detections" + ("" if reference is None else f", {len(rows)} reference boxes")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    return fig
