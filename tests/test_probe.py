"""The linear probe (common/probe.py): a real optimum, cross-validated strength, bad input refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common import probe as probe_mod
from common.probe import L2_GRID, fit_probe

pytestmark = pytest.mark.usefixtures("single_thread")


def gaussian_classes(n_per_class: int, dim: int, classes: int, spread: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(classes, dim, generator=gen)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=gen) + 5.0  # offset: the bias must absorb it
    return x, y


def test_fixed_strength_reaches_the_regularised_optimum():
    x, y = gaussian_classes(20, 8, 3, spread=3.0)
    l2 = 1e-2
    probe = fit_probe(x, y, 3, l2=l2)
    z = (x.double() - x.double().mean(0)) / x.double().std(0, unbiased=False)
    std = x.double().std(0, unbiased=False)
    w = (probe.weight.double() * std).requires_grad_(True)  # back to standardised coordinates
    b = (probe.bias.double() + probe.weight.double() @ x.double().mean(0)).requires_grad_(True)
    loss = F.cross_entropy(z @ w.T + b, y) + 0.5 * l2 * w.pow(2).sum()
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-4 and float(b.grad.abs().max()) < 1e-4
    assert probe.l2 == l2 and probe.weight.dtype == torch.float32
    torch.testing.assert_close(probe.logits(x).argmax(-1), (z @ w.T + b).argmax(-1))


def test_batched_fits_equal_separate_fits():
    x, y = gaussian_classes(15, 6, 3, spread=2.0, seed=1)
    z = ((x - x.mean(0)) / x.std(0, unbiased=False)).double()
    masks = torch.ones(2, len(y), dtype=torch.bool)
    masks[1, ::3] = False

    def objective(params, mask, l2):
        logits = z[mask] @ params[:, :-1].T + params[:, -1]
        return float(F.cross_entropy(logits, y[mask]) + 0.5 * l2 * params[:, :-1].pow(2).sum())

    both = probe_mod._fit_many(z, y, 3, masks, [1e-3, 1e-1])
    for p, (mask, l2) in enumerate(zip(masks, [1e-3, 1e-1])):
        alone = probe_mod._fit_many(z[mask], y[mask], 3, torch.ones(1, int(mask.sum()), dtype=torch.bool), [l2])[0]
        assert objective(both[p], mask, l2) == pytest.approx(objective(alone, mask, l2), rel=1e-5, abs=1e-7)


def test_cross_validation_prefers_strong_l2_for_noise_and_weak_l2_for_clean_classes():
    gen = torch.Generator().manual_seed(3)
    noise_x, noise_y = torch.randn(60, 40, generator=gen), torch.randint(0, 3, (60,), generator=gen)
    assert fit_probe(noise_x, noise_y, 3).l2 == max(L2_GRID)
    clean_x, clean_y = gaussian_classes(60, 5, 3, spread=0.3, seed=4)
    clean = fit_probe(clean_x, clean_y, 3)
    assert clean.l2 < max(L2_GRID)
    assert float((clean.logits(clean_x).argmax(-1) == clean_y).float().mean()) == 1.0


@pytest.mark.parametrize(("x", "y", "k", "match"), [
    (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 2, "n > 0"),
    (torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), 2, "targets"),
    (torch.zeros(3, 4), torch.tensor([0, 1, 2]), 2, "0..1"),
    (torch.zeros(3, 4), torch.tensor([0, -1, 1]), 2, "0..1"),
])
def test_bad_input_is_refused(x, y, k, match):
    with pytest.raises(ValueError, match=match):
        fit_probe(x, y, k)


def low_rank_classes(n: int, dim: int, classes: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping classes on correlated (low-rank) features, ill-conditioned like a backbone's."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    latent = torch.randn(n, rank, generator=gen) + 1.5 * torch.nn.functional.one_hot(y, rank)
    x = latent @ torch.randn(rank, dim, generator=gen) + 0.05 * torch.randn(n, dim, generator=gen)
    return x + torch.randn(dim, generator=gen), y


def test_same_images_in_any_order_give_the_same_probe_bit_for_bit():
    x, y = low_rank_classes(113, 96, 9, 24, seed=0)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(5))
    canonical = probe_mod._canonical_order(x, seed=0)
    torch.testing.assert_close(order[probe_mod._canonical_order(x[order], seed=0)], canonical)
    torch.testing.assert_close(probe_mod._canonical_order(x.half().float(), seed=0), canonical)
    assert not torch.equal(probe_mod._canonical_order(x, seed=1), canonical)  # the seed draws the order
    # weakly regularised: LBFGS stops at its gradient tolerance somewhere in a flat valley, and
    # without the canonical order another summation order ends elsewhere (logits 0.013 apart here)
    for l2 in (1e-4, None):
        first, shuffled = fit_probe(x, y, 9, l2=l2), fit_probe(x[order], y[order], 9, l2=l2)
        assert first.l2 == shuffled.l2
        assert torch.equal(first.weight, shuffled.weight) and torch.equal(first.bias, shuffled.bias)


def test_fewer_examples_than_features_fits_in_their_span_to_the_same_probe(monkeypatch):
    """With n < D the fit runs on the n coordinates of the examples' span: the same L2 is chosen and
    the probe agrees with the fit on all D features to the solver's tolerance."""
    x, y = gaussian_classes(10, 120, 4, spread=4.0, seed=6)  # 40 examples, 120 features
    in_span = fit_probe(x, y, 4)
    basis = probe_mod._row_basis(torch.randn(40, 120, dtype=torch.float64))
    torch.testing.assert_close(basis.T @ basis, torch.eye(40, dtype=torch.float64))  # orthonormal [D, n]
    assert probe_mod._row_basis(torch.randn(120, 40, dtype=torch.float64)) is None  # n >= D: no projection
    monkeypatch.setattr(probe_mod, "_row_basis", lambda z: None)
    full = fit_probe(x, y, 4)
    assert in_span.l2 == full.l2
    std = x.double().std(0, unbiased=False)

    def objective(probe) -> float:  # the regularised loss in standardised coordinates
        w = probe.weight.double() * std
        return float(F.cross_entropy(probe.logits(x).double(), y) + 0.5 * probe.l2 * w.pow(2).sum())

    assert objective(in_span) == pytest.approx(objective(full), rel=1e-4)
    assert torch.equal(in_span.logits(x).argmax(-1), full.logits(x).argmax(-1))
    torch.testing.assert_close(in_span.logits(x).softmax(-1), full.logits(x).softmax(-1), rtol=0, atol=1e-3)
