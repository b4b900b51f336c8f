"""PNG plots of evaluation and geometry results (matplotlib, Agg backend: no display needed).

Each function takes plain numbers (lists, arrays or tensors), writes one PNG and returns its
path. Series plots take ``points``: dicts with at least a ``label`` (one line per label, e.g.
"topk" or "switch-16") and the two keys being plotted.

What it leaves out: computing the numbers (``geometry``, ``experts``, ``flops``, metrics) and
choosing which runs to compare (``report``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: CI and servers have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def pareto_frontier(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats in both x and y (both minimised), by x."""
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys must have the same length, got {len(xs)} and {len(ys)}")
    order = sorted(range(len(xs)), key=lambda i: (xs[i], ys[i]))
    frontier, best = [], float("inf")
    for i in order:
        if ys[i] < best:
            frontier.append(i)
            best = ys[i]
    return frontier


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _series(points: Sequence[dict[str, Any]], x: str, y: str) -> dict[str, tuple[list[float], list[float]]]:
    if not points:
        raise ValueError("points is empty: nothing to plot")
    grouped: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for p in points:
        missing = [key for key in ("label", x, y) if key not in p]
        if missing:
            raise ValueError(f"point {p} lacks {missing}")
        grouped[str(p["label"])][0].append(float(p[x]))
        grouped[str(p["label"])][1].append(float(p[y]))
    return grouped


def plot_series(
    points: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    x: str,
    y: str,
    xlabel: str,
    ylabel: str,
    title: str,
    frontier: bool = False,
    logx: bool = False,
    logy: bool = False,
) -> Path:
    """One line per label through its points sorted by x (or through its Pareto frontier)."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, (xs, ys) in sorted(_series(points, x, y).items()):
        keep = pareto_frontier(xs, ys) if frontier else sorted(range(len(xs)), key=xs.__getitem__)
        (line,) = ax.plot([xs[i] for i in keep], [ys[i] for i in keep], marker="o", label=label)
        if frontier:  # dominated points stay visible, unconnected
            ax.scatter(xs, ys, color=line.get_color(), alpha=0.35, s=14)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_mse_vs_l0(points: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """MSE vs L0 Pareto frontier per label (points need ``label``, ``l0``, ``mse``)."""
    return plot_series(points, path, x="l0", y="mse", xlabel="L0", ylabel="MSE", title="MSE vs L0", frontier=True)


def plot_loss_recovered_vs_l0(points: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Fraction of CE loss recovered vs L0 (points need ``label``, ``l0``, ``loss_recovered``)."""
    return plot_series(points, path, x="l0", y="loss_recovered", xlabel="L0", ylabel="fraction of loss recovered", title="Loss recovered vs L0")


def plot_mse_vs_flops(points: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """MSE vs training FLOPs (points need ``label``, ``train_flops``, ``mse``), log x."""
    return plot_series(points, path, x="train_flops", y="mse", xlabel="training FLOPs", ylabel="MSE", title="MSE vs training compute", logx=True)


def plot_duplicate_fraction(points: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Duplicate fraction vs number of experts (points need ``label``, ``n_experts``, ``duplicate_fraction``)."""
    return plot_series(points, path, x="n_experts", y="duplicate_fraction", xlabel="number of experts", ylabel="fraction of features with a duplicate", title="Duplicates vs experts")


def plot_expert_load(load: Sequence[float], path: str | Path, *, title: str = "Expert load") -> Path:
    """Bar chart of the fraction of tokens routed to each expert, with the uniform level."""
    load = np.asarray(load, dtype=float)
    if load.ndim != 1 or load.size == 0:
        raise ValueError(f"load must be a non-empty 1-D sequence, got shape {load.shape}")
    fig, ax = plt.subplots(figsize=(max(4, 0.25 * load.size + 2), 3.5))
    ax.bar(np.arange(load.size), load)
    ax.axhline(load.sum() / load.size, color="k", ls="--", lw=1, label="uniform")
    ax.set(xlabel="expert", ylabel="fraction of tokens", title=title)
    ax.legend()
    return _save(fig, path)


def plot_expert_similarity(matrix: Any, path: str | Path, *, title: str = "Expert similarity") -> Path:
    """Heatmap of an ``[n_experts, n_experts]`` similarity matrix."""
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"matrix must be square, got shape {m.shape}")
    fig, ax = plt.subplots(figsize=(5, 4.3))
    image = ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="mean max cosine")
    ax.set(xlabel="expert B", ylabel="expert A", title=title)
    return _save(fig, path)


def plot_tsne(coords: Any, experts: Any, path: str | Path, *, title: str = "t-SNE of feature directions") -> Path:
    """Scatter of 2-D ``coords [n, 2]`` coloured by each point's expert ``[n]``."""
    coords, experts = np.asarray(coords, dtype=float), np.asarray(experts)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(experts):
        raise ValueError(f"coords must be [n, 2] and experts [n], got {coords.shape} and {experts.shape}")
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(coords[:, 0], coords[:, 1], c=experts, cmap="tab20", s=6, alpha=0.8)
    ax.set(title=title, xticks=[], yticks=[])
    return _save(fig, path)
