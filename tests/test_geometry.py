"""Feature geometry on dictionaries with planted, known structure."""

import numpy as np
import pytest
import torch

from switch_sae import SwitchSAE, SwitchSAEConfig
from switch_sae.evals import geometry


def orthonormal(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """``[n, d]`` orthonormal rows (n <= d): every pairwise cosine is 0."""
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T.float()


@pytest.fixture
def planted() -> torch.Tensor:
    """64 features in 4 experts of 16; duplicates {5,40}, {10,11}, {20,50,60}."""
    W = orthonormal(64, 128)
    g = torch.Generator().manual_seed(1)
    for dup, src in ((40, 5), (11, 10), (50, 20), (60, 20)):
        W[dup] = W[src] + 0.05 * torch.randn(128, generator=g) / 128**0.5
    return W * torch.rand(64, 1, generator=g).add(0.5)  # norms must not matter


def dense_nearest(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    W = W / W.norm(dim=-1, keepdim=True)
    cos = W @ W.T
    cos.fill_diagonal_(-2)
    return cos.max(dim=-1)


def test_nearest_neighbours_chunked_matches_dense(planted):
    expected = dense_nearest(planted)
    for chunk_rows in (1, 5, 64, None):
        nn = geometry.nearest_neighbours(planted, chunk_rows=chunk_rows)
        torch.testing.assert_close(nn.cos, expected.values)
        # Unplanted features are orthogonal up to rounding, so only the cosine at the index is pinned.
        Wn = planted / planted.norm(dim=-1, keepdim=True)
        torch.testing.assert_close((Wn * Wn[nn.index]).sum(-1), expected.values)
    nn = geometry.nearest_neighbours(planted, chunk_rows=7)
    assert nn.index[5] == 40 and nn.index[40] == 5 and nn.index[11] == 10


def test_duplicate_fraction_at_any_threshold(planted):
    nn = geometry.nearest_neighbours(planted, chunk_rows=9)
    assert geometry.duplicate_fraction(nn, 0.9) == pytest.approx(7 / 64)
    assert geometry.duplicate_fraction(nn.cos, 0.999999) == 0.0
    assert geometry.duplicate_fraction(nn, -0.5) == 1.0  # every orthogonal neighbour has cosine 0 > -0.5
    with pytest.raises(ValueError, match="threshold"):
        geometry.duplicate_fraction(nn, 1.5)


def test_duplicate_groups_across_experts(planted):
    groups = geometry.duplicate_groups(planted, n_experts=4, threshold=0.9, chunk_rows=6)
    assert [g.features for g in groups] == [[20, 50, 60], [5, 40], [10, 11]]
    assert [g.experts for g in groups] == [[1, 3, 3], [0, 2], [0, 0]]
    assert [g.spans_experts for g in groups] == [True, True, False]
    with pytest.raises(RuntimeError, match="max_pairs"):
        geometry.duplicate_groups(planted, 4, threshold=-0.5, max_pairs=100)
    with pytest.raises(ValueError, match="n_experts"):
        geometry.duplicate_groups(planted, n_experts=5)


def test_expert_similarity_known_matrix():
    # Experts 0 and 1 hold the same 8 directions; experts 2 and 3 hold their own; all else orthogonal.
    basis = orthonormal(24, 64, seed=3)
    W = torch.cat([basis[:8], basis[:8], basis[8:16], basis[16:24]])  # [32, 64]
    expected = torch.zeros(4, 4)
    expected[0, 1] = expected[1, 0] = 1.0
    for chunk_rows in (3, 8, 32):  # chunks that straddle expert boundaries too
        sim = geometry.expert_similarity(W, 4, chunk_rows=chunk_rows)
        torch.testing.assert_close(sim, expected, atol=1e-6, rtol=0)
    assert geometry.off_diagonal_mean(expected) == pytest.approx(2 / 12)
    # A 3-D [n_experts, d_expert, d_in] tensor is read as the same dictionary.
    torch.testing.assert_close(geometry.expert_similarity(W.view(4, 8, 64), 4), expected, atol=1e-6, rtol=0)


def test_random_block_control_with_twin_features():
    # Every feature has exactly one exact twin and is orthogonal to everything else, so in any
    # split into blocks, a feature's max cosine is 1 in its twin's block and 0 elsewhere:
    # each row of the matrix (diagonal included) sums to 1.
    basis = orthonormal(32, 64, seed=4)
    W = torch.cat([basis, basis])  # [64, 64], twins i and i + 32
    sim = geometry.random_block_similarity(W, 8, seed=7, chunk_rows=5)
    torch.testing.assert_close(sim.sum(dim=1), torch.ones(8), atol=1e-5, rtol=0)
    assert not torch.allclose(sim, geometry.expert_similarity(W, 8))  # the blocks really were shuffled


def test_chunks_never_hold_the_full_matrix():
    n = 1000
    assert geometry.chunk_rows_for(2**17) * 2**17 <= geometry.DEFAULT_BUDGET
    W = geometry.directions(torch.randn(n, 8))
    shapes = [chunk.shape for _, chunk in geometry._cosine_chunks(W, geometry.chunk_rows_for(n, budget=2**14))]
    assert all(rows * cols <= 2**14 for rows, cols in shapes) and sum(rows for rows, _ in shapes) == n


def test_sae_input_and_encoder_directions():
    sae = SwitchSAE(SwitchSAEConfig(d_in=8, n_experts=2, d_expert=6, k=2))
    with torch.no_grad():
        sae.W_enc.mul_(3.0)
    dec = geometry.directions(sae)
    enc = geometry.encoder_directions(sae)
    assert dec.shape == enc.shape == (12, 8)
    torch.testing.assert_close(enc.norm(dim=-1), torch.ones(12))
    torch.testing.assert_close(enc, dec)  # encoder rows start parallel to the decoder rows
    with pytest.raises(TypeError, match="directions"):
        geometry.directions([1, 2, 3])


def test_tsne_separates_planted_clusters():
    centres = orthonormal(3, 24, seed=5)
    g = torch.Generator().manual_seed(6)
    W = torch.cat([c + 0.15 * torch.randn(30, 24, generator=g) / 24**0.5 for c in centres])  # [90, 24]
    labels = np.repeat(np.arange(3), 30)
    coords, ids = geometry.tsne_embedding(W, max_points=60, perplexity=10, seed=0)
    assert coords.shape == (60, 2) and len(set(ids.tolist())) == 60
    dist = ((coords[:, None] - coords[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    nearest = dist.argmin(1)
    assert (labels[ids][nearest] == labels[ids]).mean() >= 0.95
