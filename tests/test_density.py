"""Source densities (common/density.py): the PPCA stands for a real covariance, the pooled
log-densities are real Gaussian log-densities with the blended covariance, the posterior weights
pick the source an image came from, and bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal

from common.compose import compose_probs, density_weights
from common.density import DensityError, PooledDensities, SourceDensity, pooled_log_densities

DIM = 12


def clusters(centres: list[float], n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points around each centre (all coordinates equal to it), labelled by centre index."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([c + torch.randn(n, DIM, generator=gen) for c in centres])
    return x.double(), torch.arange(len(centres)).repeat_interleave(n)


def ppca_covariance(d: SourceDensity, k: int) -> torch.Tensor:
    """The covariance the fitted PPCA of class ``k`` stands for: V diag(λ) Vᵀ + σ² (I − V Vᵀ)."""
    v, lam, res = d.basis[k], d.variances[k], d.residual[k]
    return v.T @ torch.diag(lam) @ v + res * (torch.eye(DIM, dtype=v.dtype) - v.T @ v)


def test_scatter_is_the_count_weighted_sum_of_class_covariances():
    x, y = clusters([0.0, 3.0])
    d = SourceDensity.fit(x, y, rank=4)
    expected = sum(d.counts[k] * ppca_covariance(d, k) for k in range(2))
    torch.testing.assert_close(d.scatter(), expected)


def pooled_reference(densities: list[SourceDensity], query: torch.Tensor, own: float) -> torch.Tensor:
    """``log(n_i p(x | i))`` ``[k, B]`` by torch.distributions: class Gaussians whose covariance blends
    their own (weight ``own``) with the pooled one."""
    pooled = sum(ppca_covariance(d, k) * d.counts[k] for d in densities for k in range(len(d.classes)))
    pooled = pooled / sum(float(d.counts.sum()) for d in densities)
    return torch.stack([torch.logsumexp(torch.stack([
        MultivariateNormal(d.mean[k], (1 - own) * pooled + own * ppca_covariance(d, k)).log_prob(query)
        + d.counts[k].log() for k in range(len(d.classes))], -1), -1) for d in densities])


@pytest.mark.parametrize("own", [0.0, 0.1, 0.7, 1.0])
def test_pooled_log_densities_are_gaussians_with_the_blended_covariance(own):
    a = SourceDensity.fit(*clusters([0.0, 3.0]), rank=4)
    b = SourceDensity.fit(*clusters([1.0], n=25, seed=1), rank=2)
    query = torch.randn(7, DIM, dtype=torch.float64)
    got = pooled_log_densities([a, b], query, own)
    assert got.shape == (2, 7)
    torch.testing.assert_close(got, pooled_reference([a, b], query, own))


def test_one_factorisation_scores_every_batch_as_a_fresh_one():
    a = SourceDensity.fit(*clusters([0.0, 3.0]), rank=4)
    b = SourceDensity.fit(*clusters([1.0], n=25, seed=1), rank=2)
    scorer = PooledDensities([a, b], own_covariance=0.3)
    for seed in range(3):
        query = torch.randn(5, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(scorer.log_densities(query), pooled_log_densities([a, b], query, 0.3),
                                   rtol=0, atol=0)
        torch.testing.assert_close(density_weights(scorer, query), density_weights([a, b], query))
    with pytest.raises(ValueError, match="dimension"):
        scorer.log_densities(torch.zeros(2, DIM + 1))
    other = SourceDensity.fit(torch.randn(30, DIM + 2, dtype=torch.float64), torch.zeros(30, dtype=torch.long), rank=2)
    with pytest.raises(ValueError, match="feature dimensions"):
        PooledDensities([a, other])


def test_pooled_log_densities_refuse_a_covariance_that_is_not_positive_definite():
    d = SourceDensity.fit(*clusters([0.0]), rank=2)
    direction = torch.zeros(DIM, dtype=torch.float64)
    direction[0] = 1.0
    broken = SourceDensity(d.classes, d.counts, d.mean, direction.expand(1, 2, DIM).clone(),
                           d.residual[:, None].expand(1, 2) * 0.01, d.residual)  # one direction, counted twice
    with pytest.raises(DensityError, match="positive definite"):
        pooled_log_densities([broken], torch.zeros(2, DIM), own_covariance=0.0)
    with pytest.raises(ValueError, match="own_covariance"):
        pooled_log_densities([d], torch.zeros(2, DIM), own_covariance=1.5)


def test_full_rank_fit_recovers_the_sample_covariance():
    x, y = clusters([1.0], n=200)
    d = SourceDensity.fit(x, y, rank=DIM - 1)
    sample = torch.cov(x.T)
    torch.testing.assert_close(ppca_covariance(d, 0), sample, atol=0.05, rtol=0.05)
    torch.testing.assert_close(d.mean[0], x.mean(0))


def test_weights_pick_the_source_an_image_came_from():
    a, b = SourceDensity.fit(*clusters([0.0, 1.0])), SourceDensity.fit(*clusters([6.0, 7.0], seed=1))
    test_a, _ = clusters([0.5], n=10, seed=2)
    test_b, _ = clusters([6.5], n=10, seed=3)
    w = density_weights([a, b], torch.cat([test_a, test_b]), temperature=1.0)
    assert w.shape == (2, 20)
    torch.testing.assert_close(w.sum(0), torch.ones(20, dtype=w.dtype))
    assert bool((w[0, :10] > 0.99).all()) and bool((w[1, 10:] > 0.99).all())
    # tempering keeps the order but softens the weights towards uniform
    soft = density_weights([a, b], torch.cat([test_a, test_b]), temperature=1e6)
    assert bool((soft[0, :10] > soft[1, :10]).all()) and float((soft - 0.5).abs().max()) < 0.01


def test_density_weighted_composition_fixes_confident_foreign_prompts():
    """Two prompts, each sure of its own classes on every image: uniform composition is a coin
    flip on which prompt wins, density weights trust the prompt whose data the image resembles."""
    a, b = SourceDensity.fit(*clusters([0.0, 1.0])), SourceDensity.fit(*clusters([6.0, 7.0], seed=1))
    images, _ = clusters([6.0], n=5, seed=4)  # drawn like source b's class 0 (global class 2)
    logits = torch.full((2, 5, 4), float("-inf"))
    logits[0, :, 0], logits[0, :, 1] = 9.0, 0.0  # prompt a: classes 0/1, confident in 0
    logits[1, :, 2], logits[1, :, 3] = 2.0, 0.0  # prompt b: classes 2/3, less confident in 2
    assert bool((compose_probs(logits).argmax(-1) == 0).all())
    weighted = compose_probs(logits, density_weights([a, b], images.float()))
    assert bool((weighted.argmax(-1) == 2).all())


def test_small_classes_get_a_floored_variance():
    x, y = clusters([0.0, 5.0], n=1)  # one image per class: no spread to estimate
    d = SourceDensity.fit(x, y)
    assert bool((d.residual > 0).all()) and bool(torch.isfinite(pooled_log_densities([d], x)).all())
    assert d.num_images == 2 and d.classes.tolist() == [0, 1]


def test_arrays_round_trip_and_validation():
    d = SourceDensity.fit(*clusters([0.0, 2.0]), rank=3)
    arrays = d.to_arrays()
    assert arrays["classes"].dtype == np.int64 and arrays["mean"].dtype == np.float32
    again = SourceDensity.from_arrays(arrays)
    query = torch.randn(4, DIM, dtype=torch.float64)
    torch.testing.assert_close(pooled_log_densities([again], query), pooled_log_densities([d], query),
                               rtol=1e-5, atol=1e-4)
    assert SourceDensity.from_arrays(again.to_arrays()).to_arrays().keys() == arrays.keys()
    with pytest.raises(DensityError, match="exactly"):
        SourceDensity.from_arrays({k: v for k, v in arrays.items() if k != "mean"})
    with pytest.raises(DensityError, match="inconsistent shapes"):
        SourceDensity.from_arrays({**arrays, "mean": arrays["mean"][:1]})


def _corrupt(name: str, value) -> dict:
    arrays = SourceDensity.fit(*clusters([0.0, 2.0]), rank=3).to_arrays()
    arrays[name] = value(arrays[name])
    return arrays


@pytest.mark.parametrize(("arrays", "match"), [
    (_corrupt("mean", lambda a: np.where(a == a.flat[0], np.nan, a).astype(np.float32)), "NaN or Inf"),
    (_corrupt("basis", lambda a: np.full_like(a, np.inf)), "NaN or Inf"),
    (_corrupt("variances", lambda a: -a), "positive"),
    (_corrupt("residual", lambda a: np.zeros_like(a)), "positive"),
    (_corrupt("counts", lambda a: np.zeros_like(a)), "positive"),
    (_corrupt("classes", lambda a: a[::-1].copy()), "sorted"),
    (_corrupt("classes", lambda a: a - 5), ">= 0"),
    (_corrupt("mean", lambda a: a.astype(np.float64)), "float32"),
    (_corrupt("classes", lambda a: a.astype(np.float32)), "int64"),
    (_corrupt("basis", lambda a: a[:, :, :1]), "rank"),
    (_corrupt("basis", lambda a: np.repeat(a[:, :1], a.shape[1], axis=1)), "orthonormal"),
    (_corrupt("basis", lambda a: 2 * a), "orthonormal"),
    (_corrupt("variances", lambda a: a * 1e-3), "residual"),
])
def test_from_arrays_rejects_corrupt_densities(arrays, match):
    with pytest.raises(DensityError, match=match):
        SourceDensity.from_arrays(arrays)


def test_from_arrays_rejects_oversized_densities():
    arrays = SourceDensity.fit(*clusters([0.0, 2.0]), rank=3).to_arrays()
    size = sum(a.nbytes for a in arrays.values())
    assert SourceDensity.from_arrays(arrays, max_bytes=size) is not None
    with pytest.raises(DensityError, match="byte limit"):
        SourceDensity.from_arrays(arrays, max_bytes=size - 1)


@pytest.mark.parametrize(("features", "labels", "rank", "match"), [
    (torch.zeros(0, DIM), torch.zeros(0, dtype=torch.long), 2, "n > 0"),
    (torch.zeros(4, DIM), torch.zeros(3, dtype=torch.long), 2, "labels"),
    (torch.zeros(4, DIM), torch.zeros(4, dtype=torch.long), DIM, "rank"),
])
def test_fit_rejects_bad_input(features, labels, rank, match):
    with pytest.raises(ValueError, match=match):
        SourceDensity.fit(features, labels, rank=rank)


def test_weights_reject_bad_input():
    d = SourceDensity.fit(*clusters([0.0]))
    with pytest.raises(ValueError, match="at least one"):
        density_weights([], torch.zeros(2, DIM))
    with pytest.raises(ValueError, match="dimension"):
        density_weights([d], torch.zeros(2, DIM + 1))
    with pytest.raises(ValueError, match="temperature"):
        density_weights([d], torch.zeros(2, DIM), temperature=0.0)
