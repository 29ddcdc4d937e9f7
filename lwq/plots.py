"""Figures of a sweep: the bits/perplexity Pareto front and the per-layer allocation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt


def module_type(name: str) -> str:
    """The layer's module type: the last component of its name (q_proj, c_fc, ...)."""
    return name.rsplit(".", 1)[-1]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which (bits, loss) points no other point beats at no more bits."""
    return [
        not any(b2 <= b and l2 <= loss and (b2, l2) != (b, loss) for b2, l2 in points)
        for b, loss in points
    ]


def pareto_plot(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: Path,
    ylabel: str = "perplexity",
    reference: float | None = None,
) -> Path:
    """One line per series of (bits, value) points; the full-precision value dashed."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if reference is not None:
        ax.axhline(reference, linestyle="--", color="grey", label="full precision")
    ax.set_xlabel("average bits per quantized weight (from bytes)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def allocation_plot(
    names: Sequence[str], ratios: Mapping[str, Sequence[float]], path: Path
) -> Path:
    """Ratio per layer (x: layers in order), one panel per budget, colour by module type."""
    types = sorted({module_type(n) for n in names}, key=[module_type(n) for n in names].index)
    colours = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(types)}
    fig, axes = plt.subplots(
        len(ratios), 1, figsize=(max(6, len(names) * 0.12), 2.2 * len(ratios)), squeeze=False
    )
    for ax, (label, r) in zip(axes[:, 0], ratios.items(), strict=True):
        ax.bar(
            range(len(names)), [100 * x for x in r], color=[colours[module_type(n)] for n in names]
        )
        ax.set_ylabel("ratio (%)")
        ax.set_title(label, fontsize=9)
        ax.set_xlim(-0.5, len(names) - 0.5)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[t]) for t in types]
    axes[0, 0].legend(handles, types, fontsize=7, ncol=min(len(types), 7), loc="upper right")
    axes[-1, 0].set_xlabel("layer (in model order)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
