"""Source densities: which sources' data does an image resemble?

A prompt only knows the classes of its own source, and its softmax is confident on any image,
so the uniform mean of :func:`common.model.compose_probs` cannot tell a source's expert
prediction from a confident guess on foreign data (class-incremental learning, label-skewed
sources). A :class:`SourceDensity` is a small generative model of one source's pooled frozen
backbone features — per class, a probabilistic PCA (mean, ``rank`` principal directions and
their variances, one isotropic residual variance; Tipping & Bishop 1999) — fitted on that
source's data only. :func:`density_weights` turns the densities of the selected sources into
per-image composition weights, the tempered posterior ``p(source | x) ∝ (n_source ·
p(x | source))^(1/T)``, for ``compose_probs(logits, weights)``. Kept with its prompt,
removing a source still removes all its information.

The log-density sums over D strongly correlated feature dimensions, so the untempered
posterior is nearly one-hot and over-trusts densities fitted on a few images; the default
``T = D / 4`` and the variance floor were chosen on the experiments of ``simulations/`` (no
separate validation split: read their gains as slightly optimistic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

DEFAULT_RANK = 8
VARIANCE_FLOOR = 0.1  # residual variances are at least this fraction of the source's mean variance
TEMPERATURE_PER_DIM = 0.25  # default posterior temperature, per feature dimension


@dataclass(frozen=True)
class SourceDensity:
    """Per-class probabilistic PCA of one source's pooled backbone features ``[*, D]``."""

    classes: Tensor  # [K] int64, the source's classes
    counts: Tensor  # [K] float, images per class
    mean: Tensor  # [K, D]
    basis: Tensor  # [K, r, D] orthonormal principal directions (zero rows past a class's rank)
    variances: Tensor  # [K, r] variance along each direction (>= residual)
    residual: Tensor  # [K] isotropic variance of the other D - r directions

    @classmethod
    def fit(cls, features: Tensor, labels: Tensor, rank: int = DEFAULT_RANK) -> SourceDensity:
        """Fit on a source's features ``[n, D]`` and labels ``[n]``; raises ``ValueError`` on bad input."""
        if features.ndim != 2 or labels.shape != features.shape[:1] or len(labels) == 0:
            raise ValueError(f"need features [n, D] and labels [n] with n > 0; got {tuple(features.shape)} "
                             f"and {tuple(labels.shape)}")
        if not 0 < rank < features.shape[1]:
            raise ValueError(f"rank must be in 1..{features.shape[1] - 1}, got {rank}")
        x = features.detach().to(torch.float64)
        floor = VARIANCE_FLOOR * (float(x.var(0).mean()) if len(x) > 1 else 1.0) + 1e-12
        classes = torch.unique(labels.detach().cpu()).to(torch.int64)
        parts = [_fit_class(x[labels.to(x.device) == c], rank, floor) for c in classes.tolist()]
        return cls(classes, *(torch.stack(p) for p in zip(*parts, strict=True)))

    @property
    def num_images(self) -> int:
        """Images the density was fitted on."""
        return int(self.counts.sum())

    def log_density(self, features: Tensor) -> Tensor:
        """``log p(x | source)`` of features ``[B, D]`` -> ``[B]`` (a mixture over the source's classes)."""
        x = features.detach().to(torch.float64)
        centred = x[:, None, :] - self.mean.to(x.device)  # [B, K, D]
        proj = torch.einsum("bkd,krd->bkr", centred, self.basis.to(x.device))  # [B, K, r]
        residual, variances = self.residual.to(x.device), self.variances.to(x.device)
        dim, rank = x.shape[1], self.basis.shape[1]
        outside = (centred.pow(2).sum(-1) - proj.pow(2).sum(-1)) / residual  # [B, K]
        inside = (proj.pow(2) / variances).sum(-1)  # [B, K]
        log_det = variances.log().sum(-1) + (dim - rank) * residual.log()  # [K]
        log_gauss = -0.5 * (outside + inside + log_det + dim * math.log(2 * math.pi))
        log_prior = (self.counts / self.counts.sum()).log().to(x.device)
        return torch.logsumexp(log_gauss + log_prior, dim=-1)

    def to_arrays(self) -> dict[str, Tensor]:
        """Tensors to store next to a prompt (``from_arrays`` inverts it)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Tensor]) -> SourceDensity:
        """Rebuild from :meth:`to_arrays`; raises ``ValueError`` on missing or inconsistent tensors."""
        names = [f.name for f in fields(cls)]
        missing = set(names) - set(arrays)
        if missing:
            raise ValueError(f"source density arrays lack {sorted(missing)}")
        k, r, d = arrays["basis"].shape
        shapes = {"classes": (k,), "counts": (k,), "mean": (k, d), "variances": (k, r), "residual": (k,)}
        bad = {n: tuple(arrays[n].shape) for n, s in shapes.items() if tuple(arrays[n].shape) != s}
        if bad:
            raise ValueError(f"source density arrays have inconsistent shapes {bad} for basis {(k, r, d)}")
        return cls(**{n: arrays[n] for n in names})


def _fit_class(x: Tensor, rank: int, floor: float) -> tuple[Tensor, ...]:
    """Count, mean, basis ``[rank, D]``, variances ``[rank]`` and residual of one class's ``x [n, D]``."""
    n, dim = x.shape
    mean = x.mean(0)
    basis = x.new_zeros(rank, dim)
    eig = x.new_zeros(dim)
    if n > 1:
        _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)  # s: [min(n, D)]
        eig[:len(s)] = s.pow(2) / (n - 1)
        kept = min(rank, len(s))
        basis[:kept] = vt[:kept]
    residual = torch.clamp(eig[rank:].sum() / (dim - rank), min=floor)
    variances = torch.maximum(eig[:rank], residual)
    return x.new_tensor(float(n)), mean, basis, variances, residual


def density_weights(densities: Sequence[SourceDensity], features: Tensor,
                    temperature: float | None = None) -> Tensor:
    """Composition weights ``[k, B]``: the posterior ``p(source i | x) ∝ (n_i · p(x | source i))^(1/T)``
    of each of the ``k`` sources for each image's pooled backbone features ``[B, D]``
    (``T`` defaults to ``TEMPERATURE_PER_DIM · D``; ``T = 1`` is the untempered posterior)."""
    if not densities:
        raise ValueError("density_weights needs at least one source density")
    dims = {d.mean.shape[1] for d in densities}
    if dims != {features.shape[-1]}:
        raise ValueError(f"features have dimension {features.shape[-1]} but the densities {sorted(dims)}; "
                         "fit them on the same backbone's pooled features")
    temperature = TEMPERATURE_PER_DIM * features.shape[-1] if temperature is None else temperature
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_post = torch.stack([d.log_density(features) + math.log(d.num_images) for d in densities])  # [k, B]
    return (log_post / temperature).softmax(dim=0).to(features.dtype)
