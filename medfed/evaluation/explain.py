"""Grad-CAM saliency maps (monai.visualize) for a few test images, made where the images are.

These pictures contain patient images, so they are written only to a folder at the site (or the
researcher's machine in a simulation); nothing here is ever sent to the server.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from monai.visualize import GradCAM  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

__all__ = ["gradcam_images"]


def gradcam_images(
    task: ModuleType | Any, model: nn.Module, dataset: Dataset, count: int, out_dir: Path, prefix: str
) -> list[Path]:
    """Write ``count`` PNGs (image | Grad-CAM overlay, with label and prediction); return their paths."""
    layer = getattr(task, "EXPLAIN_LAYER", None)
    if layer is None or count <= 0 or len(dataset) == 0:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    cam = GradCAM(nn_module=model, target_layers=layer)
    paths = []
    for index in range(min(count, len(dataset))):
        sample = dataset[index]
        image = sample["image"][None]
        probs = torch.softmax(model(image), dim=1)[0].detach()
        predicted = int(probs.argmax())
        saliency = cam(x=image, class_idx=predicted)[0, 0].detach().numpy()
        fig, axes = plt.subplots(1, 2, figsize=(4, 2.2))
        axes[0].imshow(image[0, 0].numpy(), cmap="gray")
        axes[0].set_title(f"label {int(sample['label'])}", fontsize=8)
        axes[1].imshow(image[0, 0].numpy(), cmap="gray")
        axes[1].imshow(saliency, cmap="jet", alpha=0.45)
        axes[1].set_title(f"pred {predicted} (p={float(probs[predicted]):.2f})", fontsize=8)
        for ax in axes:
            ax.axis("off")
        fig.tight_layout()
        path = out_dir / f"{prefix}-{index}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
