"""Slice figures: the three orthogonal mid-slices of volumes, logged to W&B or written as PNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

AXIS_NAMES = ("sagittal", "coronal", "axial")  # RAS volumes [C, D=x, H=y, W=z]


def mid_slices(volume: torch.Tensor | np.ndarray, channel: int = 0) -> list[np.ndarray]:
    """Sagittal, coronal and axial mid-slices of ``[C, D, H, W]`` (or ``[D, H, W]``), rotated for display."""
    array = volume.detach().float().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if array.ndim == 4:
        array = array[channel]
    d, h, w = array.shape
    return [np.rot90(array[d // 2]), np.rot90(array[:, h // 2]), np.rot90(array[:, :, w // 2])]


def slices_figure(
    rows: Mapping[str, Sequence[torch.Tensor | np.ndarray]] | Mapping[str, torch.Tensor | np.ndarray],
    title: str | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
):
    """A grid: one row per (name, volume), three columns (sagittal, coronal, axial mid-slices)."""
    items: list[tuple[str, torch.Tensor | np.ndarray]] = []
    for name, vols in rows.items():
        if isinstance(vols, (torch.Tensor, np.ndarray)) and np.ndim(vols) <= 4:
            items.append((name, vols))
        else:
            items += [(f"{name} {i}", v) for i, v in enumerate(vols)]
    fig, axes = plt.subplots(len(items), 3, figsize=(6, 2 * len(items)), squeeze=False)
    for r, (name, volume) in enumerate(items):
        for c, image in enumerate(mid_slices(volume)):
            ax = axes[r][c]
            ax.imshow(image, cmap="gray", vmin=value_range[0], vmax=value_range[1])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(AXIS_NAMES[c], fontsize=8)
        axes[r][0].set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def log_figure(
    figure,
    key: str,
    step: int,
    run_dir: str | Path | None = None,
    loggers: Sequence = (),
    axes: Mapping[str, float] | None = None,
) -> Path | None:
    """Write ``<run_dir>/figures/<key>_<step>.png`` and send the image to every W&B logger; close the figure.

    ``axes``: the axis values of the scalars the image belongs with (``mrrl.tracking.wandb_run.step_axes``:
    Lightning's logging step, plus e.g. ``ppo/iteration``), so W&B shows both at the same x.
    """
    from lightning.pytorch.loggers import WandbLogger

    path = None
    try:
        if run_dir is not None:
            path = Path(run_dir) / "figures" / f"{key.replace('/', '_')}_{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(path, dpi=90)
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({key: wandb.Image(figure), **(axes or {"trainer/global_step": step})})
    finally:
        plt.close(figure)
    return path
