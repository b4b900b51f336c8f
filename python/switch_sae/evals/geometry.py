"""Feature geometry of a dictionary (paper, section 4.3): how close features are to each other.

Every function takes feature directions ``W [d_sae, d_in]`` (or ``[n_experts, d_expert, d_in]``,
or an SAE, whose decoder dictionary is used) and works on unit-normalised rows. Cosine
similarities are computed ``chunk_rows`` features at a time against the whole dictionary, so
at most ``chunk_rows x d_sae`` similarities exist at once: with the default budget of 2^25
floats (128 MiB) a 2^17-feature dictionary is scanned in 256-row chunks, and a
``[d_sae, d_sae]`` matrix is never allocated.

- ``nearest_neighbours``: per feature, the cosine to (and id of) its nearest other feature;
  ``top_neighbours`` the same for its ``n`` nearest.
- ``duplicate_fraction``: fraction of features whose nearest neighbour exceeds a threshold.
- ``duplicate_groups``: connected groups of features joined by cosine > threshold, with the
  expert of each member, so duplicates split across experts can be listed.
- ``expert_similarity``: ``[n_experts, n_experts]``, entry (A, B) = mean over features of A of
  the max cosine to any feature of B; ``random_block_similarity`` is the same on a dictionary
  cut into random blocks (the paper's control for a TopK SAE).
- ``tsne_embedding``: 2-D t-SNE (scikit-learn) of a sample of directions, for plotting.

What it leaves out: plotting (``plots.py``) and anything that needs activations.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

DEFAULT_BUDGET = 2**25  # similarities held at once: 128 MiB of float32


class NearestNeighbours(NamedTuple):
    """For each feature, its most similar other feature (or ``n`` of them, ``[d_sae, n]``)."""

    cos: Tensor  # [d_sae] cosine to the nearest other feature
    index: Tensor  # [d_sae] int64 id of that feature


@dataclass
class DuplicateGroup:
    """Features pairwise linked (directly or through each other) by cosine > threshold."""

    features: list[int]
    """Global feature ids, ascending."""
    experts: list[int]
    """Expert of each feature (``feature // d_expert``)."""

    @property
    def spans_experts(self) -> bool:
        return len(set(self.experts)) > 1


def directions(source: Any) -> Tensor:
    """``[d_sae, d_in]`` float32 unit-norm rows from a tensor or an SAE (its decoder)."""
    if isinstance(source, Tensor):
        W = source
    elif hasattr(source, "W_dec_flat"):
        W = source.W_dec_flat
    else:
        raise TypeError(f"directions must be a tensor or an SAE, got {type(source).__name__}")
    if W.dim() == 3:
        W = W.reshape(-1, W.shape[-1])
    if W.dim() != 2 or W.shape[0] < 2:
        raise ValueError(f"directions must have shape [d_sae >= 2, d_in] or [n_experts, d_expert, d_in], got {tuple(W.shape)}")
    W = W.detach().float()
    return W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def encoder_directions(sae: Any) -> Tensor:
    """``[d_sae, d_in]`` encoder rows of an SAE (feature scaling applied for Switch SAEs)."""
    W = sae.encoder_weight() if hasattr(sae, "encoder_weight") else sae.W_enc  # rows are directions
    return directions(W.detach().reshape(sae.d_sae, sae.d_in))


def chunk_rows_for(n: int, budget: int = DEFAULT_BUDGET) -> int:
    """Rows per chunk so that ``rows x n`` similarities fit in ``budget`` elements."""
    if budget < 1:
        raise ValueError(f"budget must be a positive number of elements, got {budget}")
    return max(1, min(n, budget // n))


def _cosine_chunks(W: Tensor, chunk_rows: int | None) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(start, cos [rows, d_sae])`` with each feature's self-similarity set to -inf."""
    n = W.shape[0]
    rows = chunk_rows or chunk_rows_for(n)
    if rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows}")
    for start in range(0, n, rows):
        cos = W[start : start + rows] @ W.T  # [rows, d_sae]
        local = torch.arange(cos.shape[0], device=W.device)
        cos[local, local + start] = float("-inf")
        yield start, cos


def nearest_neighbours(source: Any, *, chunk_rows: int | None = None) -> NearestNeighbours:
    """Nearest other feature (by cosine) of every feature, in chunks."""
    W = directions(source)
    cos = torch.empty(W.shape[0], device=W.device)
    index = torch.empty(W.shape[0], dtype=torch.int64, device=W.device)
    for start, chunk in _cosine_chunks(W, chunk_rows):
        best = chunk.max(dim=-1)
        cos[start : start + chunk.shape[0]] = best.values
        index[start : start + chunk.shape[0]] = best.indices
    return NearestNeighbours(cos, index)


def top_neighbours(source: Any, n: int, *, chunk_rows: int | None = None) -> NearestNeighbours:
    """The ``n`` nearest other features (by cosine) of every feature: ``[d_sae, n]`` each, nearest first."""
    W = directions(source)
    if not isinstance(n, int) or not 1 <= n < W.shape[0]:
        raise ValueError(f"n must be a positive integer below d_sae={W.shape[0]}, got {n!r}")
    cos = torch.empty(W.shape[0], n, device=W.device)
    index = torch.empty(W.shape[0], n, dtype=torch.int64, device=W.device)
    for start, chunk in _cosine_chunks(W, chunk_rows):
        best = chunk.topk(n, dim=-1)
        cos[start : start + chunk.shape[0]] = best.values
        index[start : start + chunk.shape[0]] = best.indices
    return NearestNeighbours(cos, index)


def duplicate_fraction(nn: NearestNeighbours | Tensor, threshold: float = 0.9) -> float:
    """Fraction of features whose nearest other feature has cosine > ``threshold``.

    ``nn`` is a ``NearestNeighbours`` or its ``cos`` tensor; computing it once and asking
    for several thresholds avoids rescanning the dictionary.
    """
    cos = nn.cos if isinstance(nn, NearestNeighbours) else nn
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a cosine in [-1, 1], got {threshold}")
    return float((cos > threshold).float().mean())


def _check_experts(n: int, n_experts: int) -> int:
    if not isinstance(n_experts, int) or n_experts < 1 or n % n_experts:
        raise ValueError(f"n_experts must be a positive integer dividing d_sae={n}, got {n_experts!r}")
    return n // n_experts


def expert_similarity(source: Any, n_experts: int, *, chunk_rows: int | None = None) -> Tensor:
    """``[n_experts, n_experts]``: (A, B) = mean over features of A of max cosine to B.

    Features are assigned to experts in blocks of ``d_expert = d_sae / n_experts`` consecutive
    ids (the ``W_dec.view(d_sae, d_in)`` layout). The diagonal excludes each feature itself,
    so it is the mean nearest-neighbour cosine inside an expert.
    """
    W = directions(source)
    d_expert = _check_experts(W.shape[0], n_experts)
    if d_expert < 2 and n_experts > 1:
        raise ValueError("each expert needs at least 2 features for a within-expert similarity")
    total = torch.zeros(n_experts, n_experts, dtype=torch.float64, device=W.device)
    for start, chunk in _cosine_chunks(W, chunk_rows):
        per_expert = chunk.view(chunk.shape[0], n_experts, d_expert).amax(dim=-1)  # [rows, n_experts]
        owner = torch.arange(start, start + chunk.shape[0], device=W.device) // d_expert  # [rows]
        total.index_add_(0, owner, per_expert.double())
    return (total / d_expert).float()


def random_block_similarity(source: Any, n_experts: int, *, seed: int = 0, chunk_rows: int | None = None) -> Tensor:
    """``expert_similarity`` of the dictionary after a random permutation of its features.

    The paper's control: a TopK SAE cut into random "experts" shows what similarity to
    expect between unspecialised blocks.
    """
    W = directions(source)
    _check_experts(W.shape[0], n_experts)
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(W.shape[0], generator=generator).to(W.device)
    return expert_similarity(W[perm], n_experts, chunk_rows=chunk_rows)


def off_diagonal_mean(matrix: Tensor) -> float:
    """Mean of the entries with A != B of a square similarity matrix."""
    n = matrix.shape[0]
    if n < 2:
        return float("nan")
    mask = ~torch.eye(n, dtype=torch.bool, device=matrix.device)
    return float(matrix[mask].mean())


def duplicate_groups(
    source: Any,
    n_experts: int = 1,
    threshold: float = 0.9,
    *,
    chunk_rows: int | None = None,
    max_pairs: int = 10_000_000,
) -> list[DuplicateGroup]:
    """Groups of features joined by cosine > ``threshold``, largest group first.

    Raises RuntimeError if more than ``max_pairs`` pairs exceed the threshold (a threshold
    that low makes "duplicates" meaningless and the edge list would not fit in memory).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    W = directions(source)
    n = W.shape[0]
    d_expert = _check_experts(n, n_experts)
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a cosine in [-1, 1], got {threshold}")
    sources, targets, n_pairs = [], [], 0
    for start, chunk in _cosine_chunks(W, chunk_rows):
        rows, cols = torch.nonzero(chunk > threshold, as_tuple=True)
        n_pairs += rows.numel()
        if n_pairs > max_pairs:
            raise RuntimeError(
                f"more than max_pairs={max_pairs} feature pairs have cosine > threshold={threshold}; "
                "raise the threshold (or max_pairs)"
            )
        sources.append((rows + start).cpu().numpy())
        targets.append(cols.cpu().numpy())
    src, dst = np.concatenate(sources), np.concatenate(targets)
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    groups = []
    for label in np.flatnonzero(sizes > 1):
        members = np.flatnonzero(labels == label).tolist()
        groups.append(DuplicateGroup(features=members, experts=[m // d_expert for m in members]))
    groups.sort(key=lambda g: (-len(g.features), g.features[0]))
    return groups


def tsne_embedding(
    source: Any,
    *,
    max_points: int = 3000,
    perplexity: float = 30.0,
    max_iter: int = 1000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE of (a random sample of at most ``max_points``) directions, cosine metric.

    Returns ``(coords [n_points, 2], feature_ids [n_points])``; colour by
    ``feature_ids // d_expert`` to see whether directions cluster by expert.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    W = directions(source)
    n = W.shape[0]
    if max_points < 3:
        raise ValueError(f"max_points must be at least 3, got {max_points}")
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(n, size=max_points, replace=False)) if n > max_points else np.arange(n)
    points = W[torch.from_numpy(ids).to(W.device)].cpu().numpy()
    # t-SNE needs perplexity < n_points; small dictionaries get a proportionally small one.
    perplexity = min(perplexity, max(1.0, (len(ids) - 1) / 3))
    tsne = TSNE(n_components=2, metric="cosine", init="pca", perplexity=perplexity, max_iter=max_iter, random_state=seed)
    # torch and scikit-learn each ship an OpenMP runtime; with both spinning, t-SNE runs ~50x
    # slower (measured: 18 s instead of 0.3 s for 60 points). One OpenMP thread avoids the fight.
    with threadpool_limits(1, user_api="openmp"):
        return tsne.fit_transform(points), ids
