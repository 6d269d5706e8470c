"""`wanpair timesteps`: show what each expert trains on -- a histogram of the configured timestep sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path, write_text_atomic
from ..project import Project
from .timesteps import sample_timesteps


def draw(project: Project, expert: str, n: int = 100_000, seed: int | None = None) -> np.ndarray:
    t, w = project.train, project.experts[expert]
    g = torch.Generator().manual_seed(project.train.seed if seed is None else seed)
    return 1000 * sample_timesteps(n, t.timestep_sampling, (w.min_timestep, w.max_timestep), shift=t.discrete_flow_shift,
                                   sigmoid_scale=t.sigmoid_scale, logit_mean=t.logit_mean, logit_std=t.logit_std,
                                   preserve_shape=t.preserve_distribution_shape,
                                   generator=g).double().numpy()


def text_histogram(values: np.ndarray, window: tuple[int, int], bins: int = 20, width: int = 50) -> str:
    """A bar per bin across the expert's window."""
    counts, edges = np.histogram(values, bins=bins, range=window)
    top = counts.max() or 1
    lines = [f"{edges[i]:6.0f}-{edges[i + 1]:<5.0f} {'#' * round(width * c / top):<{width}} {c}" for i, c in enumerate(counts)]
    lines.append(f"n = {len(values)}, mean {values.mean():.1f}, median {np.median(values):.1f}, "
                 f"min {values.min():.1f}, max {values.max():.1f}")
    return "\n".join(lines)


def write_png(values: np.ndarray, path: Path, title: str, window: tuple[int, int]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.hist(values, bins=100, range=window, color="tab:purple")
    if window[0] < 875 < window[1]:
        ax.axvline(875, color="k", ls="--", lw=1, label="T2V boundary 875")
    ax.set(xlabel="timestep (0-1000)", ylabel="draws", title=title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def write_csv(values: np.ndarray, path: Path) -> Path:
    write_text_atomic(path, "timestep\n" + "\n".join(f"{v:.4f}" for v in values) + "\n")
    return path
