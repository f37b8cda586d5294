"""Personal models (``run.personalization``): what each site keeps of its own besides the global model.

- ``fedbn``: the normalisation layers (GroupNorm, LayerNorm, InstanceNorm, BatchNorm: weights and
  buffers) stay at each site. A site trains the received model with its own normalisation layers
  put back, and sends those layers as it received them (a zero update), so the server's
  aggregation, secure aggregation, compression and site-level DP are unchanged and the global
  model keeps its starting normalisation layers. The personal model is the final global model
  with the site's own normalisation layers.
- ``finetune``: after the last round each site trains ``run.finetune-steps`` steps from the final
  global model (charged to its privacy ledger, refused past its budget).
- ``ditto``: each round a site also trains its personal model with the penalty
  ``run.ditto-lambda``/2 ||w - w_global||² toward the received global model (charged too: under
  DP both models' steps count).

The personal model lives in the site's state folder (:func:`personal_model_path`, a medfed
checkpoint) and never leaves the site: the server only receives its evaluation metrics.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from torch import nn

from medfed.config import Config
from medfed.training import NORM_LAYERS

__all__ = ["PERSONAL_FOLDER", "latest_personal_model", "norm_keys", "personal_model_path", "privacy_shape"]

PERSONAL_FOLDER = "personal"  # under a site's state folder


def personal_model_path(state_dir: Path, run_key: str) -> Path:
    """Where a site keeps its personal model of the run ``run_key`` (a digest names the file: the
    run key comes from the server)."""
    digest = hashlib.sha256(run_key.encode()).hexdigest()[:16]
    return state_dir / PERSONAL_FOLDER / f"personal-{digest}.safetensors"


def latest_personal_model(path: Path) -> Path:
    """The personal model a ``--site-model`` names: the file itself, or the newest one kept in a
    site's state folder (or its ``personal`` folder). FileNotFoundError naming the path otherwise."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"--site-model {path} does not exist: expected a site's state folder or a checkpoint")
    folder = path if path.name == PERSONAL_FOLDER else path / PERSONAL_FOLDER
    found = sorted(folder.glob("personal-*.safetensors"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"--site-model {path}: no personal model in it (a site keeps one in STATE_DIR/{PERSONAL_FOLDER}/ "
            "after a run with run.personalization set)"
        )
    return found[-1]


def norm_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of ``model``'s normalisation layers (what FedBN keeps at the site)."""
    return {
        f"{name}.{key}" if name else key
        for name, module in model.named_modules()
        if isinstance(module, NORM_LAYERS)
        for key in module.state_dict()
    }


def privacy_shape(config: Config) -> dict[str, Any]:
    """The :func:`medfed.privacy.plan_privacy` arguments that count a run's trainings at a site: the
    federated model, the local-only model (cross-site matrix), Ditto's personal model every round,
    and the fine-tuning steps after the last round."""
    runs = 1 + int(config.evaluation.cross_site) + int(config.run.personalization == "ditto")
    extra = config.run.finetune_steps if config.run.personalization == "finetune" else 0
    return {"runs_per_round": runs, "extra_steps": extra}
