"""Source densities: which sources' data does an image resemble?

A prompt only knows the classes of its own source, and its softmax is confident on any image,
so the uniform mean of :func:`common.compose.compose_probs` cannot tell a source's expert
prediction from a confident guess on foreign data (class-incremental learning, label-skewed
sources). A :class:`SourceDensity` is a small generative model of one source's pooled frozen
backbone features — per class, a probabilistic PCA (mean, ``rank`` principal directions and
their variances, one isotropic residual variance; Tipping & Bishop 1999) — fitted on that
source's data only. :func:`common.compose.density_weights` turns the densities of the
selected sources into per-image composition weights. A density travels inside its prompt's
artefact (``Prompt.density``), so removing a source still removes all its information.

The log-density sums over D strongly correlated feature dimensions, so the untempered
posterior is nearly one-hot and over-trusts densities fitted on a few images; the posterior
temperature (``common.compose.TEMPERATURE_PER_DIM``) and the variance floor below are chosen
on validation images (``simulations/tune_density.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

DEFAULT_RANK = 16  # chosen on validation images with the floor below (simulations/tune_density.py)
VARIANCE_FLOOR = 0.1  # residual variances are at least this fraction of the source's mean variance
MAX_RANK = 32  # principal directions per class a density may carry
MAX_DENSITY_BYTES = 4 << 20  # a density's arrays in all (10 classes x rank 16 x 384 dims is 0.27 MB)

__all__ = ["DEFAULT_RANK", "DensityError", "MAX_DENSITY_BYTES", "MAX_RANK", "SourceDensity", "VARIANCE_FLOOR"]


class DensityError(ValueError):
    """Source density arrays are missing, inconsistent, too large or hold invalid values."""


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
    def fit(cls, features: Tensor, labels: Tensor, rank: int | None = None,
            floor: float = VARIANCE_FLOOR) -> SourceDensity:
        """Fit on a source's features ``[n, D]`` and labels ``[n]``; raises ``ValueError`` on bad input.

        ``rank``: principal directions per class (default ``DEFAULT_RANK``, at most ``D - 1``).
        ``floor``: residual variances are at least this fraction of the source's mean variance.
        """
        if features.ndim != 2 or labels.shape != features.shape[:1] or len(labels) == 0:
            raise ValueError(f"need features [n, D] and labels [n] with n > 0; got {tuple(features.shape)} "
                             f"and {tuple(labels.shape)}")
        rank = min(DEFAULT_RANK, features.shape[1] - 1) if rank is None else rank
        if not 0 < rank < features.shape[1]:
            raise ValueError(f"rank must be in 1..{features.shape[1] - 1}, got {rank}")
        x = features.detach().to(torch.float64)
        floor = floor * (float(x.var(0).mean()) if len(x) > 1 else 1.0) + 1e-12
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
        centred = x[:, None, :] - self.mean.to(x)  # [B, K, D]
        proj = torch.einsum("bkd,krd->bkr", centred, self.basis.to(x))  # [B, K, r]
        residual, variances = self.residual.to(x), self.variances.to(x)
        dim, rank = x.shape[1], self.basis.shape[1]
        outside = (centred.pow(2).sum(-1) - proj.pow(2).sum(-1)) / residual  # [B, K]
        inside = (proj.pow(2) / variances).sum(-1)  # [B, K]
        log_det = variances.log().sum(-1) + (dim - rank) * residual.log()  # [K]
        log_gauss = -0.5 * (outside + inside + log_det + dim * math.log(2 * math.pi))
        log_prior = (self.counts / self.counts.sum()).log().to(x)
        return torch.logsumexp(log_gauss + log_prior, dim=-1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The density as numpy arrays (``classes`` int64, the rest float32); ``from_arrays`` inverts it."""
        return {f.name: getattr(self, f.name).detach().cpu().numpy().astype(np.int64 if f.name == "classes"
                                                                           else np.float32)
                for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], max_bytes: int | None = None) -> SourceDensity:
        """Rebuild from :meth:`to_arrays`, validating everything; raises ``DensityError``.

        Checks: exactly the expected arrays, their dtypes, consistent shapes, a rank in
        ``1..MAX_RANK`` below the feature dimension, at most ``max_bytes`` (default
        ``MAX_DENSITY_BYTES``) in all, strictly
        increasing non-negative classes, positive finite counts and variances, finite means
        and directions.
        """
        names = [f.name for f in fields(cls)]
        if set(arrays) != set(names):
            raise DensityError(f"source density arrays must be exactly {names}, got {sorted(arrays)}")
        for name in names:
            want = np.int64 if name == "classes" else np.float32
            if not isinstance(arrays[name], np.ndarray) or arrays[name].dtype != want:
                raise DensityError(f"source density array {name!r} must be {np.dtype(want)}, "
                                   f"got {getattr(arrays[name], 'dtype', type(arrays[name]).__name__)}")
        _check_density_shapes(arrays, MAX_DENSITY_BYTES if max_bytes is None else max_bytes)
        _check_density_values(arrays)
        return cls(**{n: torch.from_numpy(np.array(arrays[n])) for n in names})


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


def _check_density_shapes(arrays: Mapping[str, np.ndarray], max_bytes: int) -> None:
    """Shapes consistent with ``basis [K, r, D]``, a bounded rank and a bounded size."""
    if arrays["basis"].ndim != 3:
        raise DensityError(f"source density basis must be [classes, rank, dim], got shape {arrays['basis'].shape}")
    k, r, d = arrays["basis"].shape
    if k < 1 or not 1 <= r <= min(MAX_RANK, d - 1):
        raise DensityError(f"source density has {k} classes and rank {r}; need >= 1 class and rank in "
                           f"1..{min(MAX_RANK, d - 1)}")
    shapes = {"classes": (k,), "counts": (k,), "mean": (k, d), "variances": (k, r), "residual": (k,)}
    bad = {n: arrays[n].shape for n, shape in shapes.items() if arrays[n].shape != shape}
    if bad:
        raise DensityError(f"source density arrays have inconsistent shapes {bad} for basis {(k, r, d)}")
    size = sum(a.nbytes for a in arrays.values())
    if size > max_bytes:
        raise DensityError(f"source density is {size} bytes, over the {max_bytes}-byte limit")


def _check_density_values(arrays: Mapping[str, np.ndarray]) -> None:
    """Classes strictly increasing and non-negative; counts and variances positive; all finite."""
    classes = arrays["classes"]
    if classes[0] < 0 or (np.diff(classes) <= 0).any():
        raise DensityError(f"source density classes must be distinct, sorted and >= 0, got {classes[:10].tolist()}")
    for name in ("counts", "mean", "basis", "variances", "residual"):
        if not np.isfinite(arrays[name]).all():
            raise DensityError(f"source density array {name!r} contains NaN or Inf")
    for name in ("counts", "variances", "residual"):
        if not (arrays[name] > 0).all():
            raise DensityError(f"source density array {name!r} must be positive")
