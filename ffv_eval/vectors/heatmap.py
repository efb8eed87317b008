"""The figure `ffv extract` writes beside a FV: the indirect-effect heat map of causal mediation."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ffv_eval.files.atomic import atomic_write


def save_indirect_effect_heatmap(aie: torch.Tensor, path: str | os.PathLike, title: str, chosen=()) -> Path:
    """Heat map of the average indirect effect per layer (rows) and head (columns), with the
    chosen heads outlined. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    n_layers, n_heads = aie.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * n_heads + 2), max(4, 0.3 * n_layers + 1.5)))
    limit = float(aie.abs().max()) or 1.0
    image = ax.imshow(aie.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", origin="lower")
    for layer, head, _ in chosen:
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="average indirect effect")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    finally:
        plt.close(fig)
    return path
