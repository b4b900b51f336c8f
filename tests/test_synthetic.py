"""Synthetic activations: seeded, truly sparse, clustered, and the recovery metric."""

import pytest
import torch

from switch_sae.activations import SyntheticActivations, SyntheticConfig, mean_max_cosine

SMALL = dict(d_in=16, n_features=60, n_clusters=4, features_per_token=3)


def test_same_seed_same_data_and_other_seed_differs():
    a, b = SyntheticActivations(SyntheticConfig(**SMALL)), SyntheticActivations(SyntheticConfig(**SMALL))
    assert torch.equal(a.features, b.features)
    for xa, xb in zip(a.batches(8, 3, seed=5), b.batches(8, 3, seed=5), strict=True):
        assert torch.equal(xa, xb)
    other = SyntheticActivations(SyntheticConfig(**SMALL, seed=1))
    assert not torch.allclose(a.features, other.features)
    assert not torch.equal(next(a.batches(8, 1, seed=5)), next(a.batches(8, 1, seed=6)))


def test_tokens_are_the_sum_of_their_features_from_one_cluster():
    data = SyntheticActivations(SyntheticConfig(**SMALL, noise_std=0.0))
    batch = data.sample(64, torch.Generator().manual_seed(0))
    assert batch.x.shape == (64, 16) and batch.feature_ids.shape == (64, 3)
    expected = (batch.magnitudes.unsqueeze(-1) * data.features[batch.feature_ids]).sum(1)
    torch.testing.assert_close(batch.x, expected)
    assert torch.equal(data.feature_cluster[batch.feature_ids], batch.clusters.unsqueeze(-1).expand(-1, 3))
    for row in batch.feature_ids:  # distinct features per token
        assert row.unique().numel() == 3
    assert (batch.magnitudes >= 0.5).all() and (batch.magnitudes <= 1.5).all()
    torch.testing.assert_close(data.features.norm(dim=-1), torch.ones(60))


def test_features_lean_towards_their_cluster():
    data = SyntheticActivations(SyntheticConfig(d_in=32, n_features=200, n_clusters=5, cluster_weight=0.5))
    cos = data.features @ data.features.T
    same = data.feature_cluster.unsqueeze(0) == data.feature_cluster.unsqueeze(1)
    off_diagonal = ~torch.eye(200, dtype=torch.bool)
    assert cos[same & off_diagonal].mean() > 0.4
    assert cos[~same].abs().mean() < 0.25


def test_zipf_makes_some_features_rarer():
    data = SyntheticActivations(SyntheticConfig(**{**SMALL, "zipf_exponent": 1.5}))
    ids = data.sample(4000, torch.Generator().manual_seed(0)).feature_ids
    counts = torch.bincount(ids.flatten(), minlength=60).float()
    first, last = data.cluster_members[0][0], data.cluster_members[0][-1]
    assert counts[first] > 3 * counts[last]


def test_mean_max_cosine():
    data = SyntheticActivations(SyntheticConfig(**SMALL))
    assert mean_max_cosine(data.features, data.features) == pytest.approx(1.0)
    # scaled and shuffled rows plus junk still find every feature
    dictionary = torch.cat([3 * data.features[torch.randperm(60)], torch.randn(10, 16)])
    assert mean_max_cosine(dictionary, data.features) == pytest.approx(1.0)
    half = mean_max_cosine(data.features[:30], data.features)
    assert half < 0.999
    with pytest.raises(ValueError, match="share d_in"):
        mean_max_cosine(torch.randn(5, 8), data.features)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_in=0), "d_in"),
        (dict(n_clusters=100), "n_clusters"),
        (dict(features_per_token=20), "features_per_token"),
        (dict(cluster_weight=1.0), "cluster_weight"),
        (dict(magnitude_min=2.0), "magnitude_min"),
        (dict(noise_std=-1.0), "noise_std"),
    ],
)
def test_bad_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**{**SMALL, **kwargs})


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch"):
        SyntheticActivations(SyntheticConfig(**SMALL)).sample(0)
