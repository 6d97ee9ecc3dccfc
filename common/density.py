"""Source densities: which sources' data does an image resemble?

A prompt only knows the classes of its own source, and its softmax is confident on any image,
so the uniform mean of :func:`common.compose.compose_probs` cannot tell a source's expert
prediction from a confident guess on foreign data (class-incremental learning, label-skewed
sources). A :class:`SourceDensity` is a small generative model of one source's pooled frozen
backbone features — per class, a probabilistic PCA (mean, ``rank`` principal directions and
their variances, one isotropic residual variance; Tipping & Bishop 1999) — fitted on that
source's data only. A density travels inside its prompt's artefact (``Prompt.density``), so
removing a source still removes all its information.

At composition time, :class:`PooledDensities` scores an image under every class of the
selected sources with a covariance that blends the class's own with the one pooled from all
their classes (regularised discriminant analysis over the selection, built from the densities
alone): a class's own PPCA from a few dozen images in D dimensions mostly measures its
sampling noise, the pooled one is estimated from every image of the selection.
:func:`common.compose.density_weights` turns those scores into per-image composition
weights. The log-density sums over D strongly correlated feature dimensions, so the
untempered posterior is nearly one-hot; the posterior temperature
(``common.compose.TEMPERATURE_PER_DIM``), the blend, the variance floor and the rank below
are chosen on validation images (``simulations/tune_density.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

DEFAULT_RANK = 32  # chosen on validation images with the floor below (simulations/tune_density.py)
VARIANCE_FLOOR = 0.1  # residual variances are at least this fraction of the source's mean variance
OWN_COVARIANCE = 0.05  # weight of a class's own covariance against the pooled one, chosen with the above
MAX_RANK = 32  # principal directions per class a density may carry
MAX_DENSITY_BYTES = 4 << 20  # a density's arrays in all (10 classes x rank 32 x 384 dims is 0.51 MB)

__all__ = ["DEFAULT_RANK", "MAX_DENSITY_BYTES", "MAX_RANK", "OWN_COVARIANCE", "VARIANCE_FLOOR", "DensityError",
           "PooledDensities", "SourceDensity", "pooled_log_densities"]


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

    def scatter(self) -> Tensor:
        """``Σ_k n_k C_k`` ``[D, D]`` (float64): the class covariances ``C_k`` its PPCA stands for,
        ``V diag(λ) Vᵀ + σ² (I − V Vᵀ)``, weighted by the class counts ``n_k``."""
        counts, residual = self.counts.to(torch.float64), self.residual.to(torch.float64)
        rows = self.basis.to(torch.float64).flatten(0, 1)  # [K r, D]
        extra = (self.variances.to(torch.float64) - residual[:, None]) * counts[:, None]  # [K, r]
        eye = torch.eye(rows.shape[-1], dtype=torch.float64)
        return (rows.T * extra.flatten()) @ rows + (counts * residual).sum() * eye

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
        and directions, orthonormal (or zero) directions with variances at least the residual.
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
        _check_density_geometry(arrays)
        return cls(**{n: torch.from_numpy(np.array(arrays[n])) for n in names})


class PooledDensities:
    """The densities of a selection of sources, factorised once to score many images.

    Each class of each source is a Gaussian around its mean whose covariance blends the
    class's own (its PPCA) with weight ``own_covariance`` and the covariance pooled over every
    class of the selection (their count-weighted mean) with the rest: regularised
    discriminant analysis over the union of the selected sources, from their densities alone
    (Friedman 1989; ``own_covariance = 0`` is linear discriminant analysis). A class's own
    PPCA, fitted on a few dozen images in D dimensions, mostly measures its sampling noise;
    the pooled covariance is estimated from every image of the selection and tells sources
    apart better (``simulations/tune_density.py``). One eigendecomposition of the pooled
    covariance serves every class: a class adds only its rank-r directions (Woodbury).
    Building it costs that eigendecomposition and one ``r × r`` Cholesky factor per class;
    :meth:`log_densities` is then a few matrix products per batch.
    Raises ``DensityError`` when the densities make no usable covariance.
    """

    def __init__(self, densities: Sequence[SourceDensity], own_covariance: float = OWN_COVARIANCE) -> None:
        if not densities:
            raise ValueError("PooledDensities needs at least one source density")
        if not 0 <= own_covariance <= 1:
            raise ValueError(f"own_covariance must be in [0, 1], got {own_covariance}")
        dims = sorted({d.mean.shape[1] for d in densities})
        if len(dims) > 1:
            raise ValueError(f"the densities have feature dimensions {dims}; compose sources of one backbone")
        pooled = sum(d.scatter() for d in densities) / sum(d.num_images for d in densities)
        eigvals, self.eigvecs = torch.linalg.eigh(pooled)  # pooled = U diag(s) Uᵀ
        if not bool(torch.isfinite(eigvals).all()) or float(eigvals.min()) <= 1e-12 * max(float(eigvals.max()), 1e-300):
            raise DensityError("the source densities' pooled covariance is not positive definite; "
                               "refit the densities (their variances are degenerate)")
        self.sources = [_ClassGaussians.build(d, eigvals, self.eigvecs, own_covariance) for d in densities]

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return self.eigvecs.shape[0]

    def log_densities(self, features: Tensor) -> Tensor:
        """``log(n_i · p(x | source i))`` ``[k, B]`` of pooled features ``[B, D]``."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features {tuple(features.shape)} do not have the densities' dimension {self.dim}; "
                             "fit them on the same backbone's pooled features [B, D]")
        x = features.detach().to(self.eigvecs) @ self.eigvecs  # [B, D] in the pooled eigenbasis
        return torch.stack([source.log_density(x) for source in self.sources])


def pooled_log_densities(densities: Sequence[SourceDensity], features: Tensor,
                         own_covariance: float = OWN_COVARIANCE) -> Tensor:
    """``log(n_i · p(x | source i))`` ``[k, B]`` of features ``[B, D]`` (:class:`PooledDensities`, once)."""
    return PooledDensities(densities, own_covariance).log_densities(features)


@dataclass(frozen=True)
class _ClassGaussians:
    """One source's classes as ``N(μ_c, (1 − own)·P + own·C_c)`` in the pooled eigenbasis ``U``
    (``P = U diag(s) Uᵀ``). ``C_c = σ_c² I + V_c diag(λ_c − σ_c²) V_cᵀ``, so the blend is
    ``A_c + W_c W_cᵀ`` with ``A_c`` diagonal in ``U`` and ``W_c [D, r]``: its inverse and
    log-determinant follow from an ``r × r`` Cholesky factor (Woodbury, matrix determinant lemma)."""

    mean: Tensor  # [K, D] class means in the eigenbasis
    diag: Tensor  # [K, D] A_c
    w: Tensor  # [K, D, r] W_c
    chol: Tensor  # [K, r, r] Cholesky factor of I + W_cᵀ A_c⁻¹ W_c
    log_norm: Tensor  # [K] log n_c − ½ (log det + D log 2π)

    @classmethod
    def build(cls, density: SourceDensity, eigvals: Tensor, eigvecs: Tensor, own: float) -> _ClassGaussians:
        dim, rank = eigvecs.shape[0], density.basis.shape[1]
        residual = density.residual.to(eigvecs)  # [K]
        diag = (1 - own) * eigvals[None, :] + own * residual[:, None]  # [K, D]
        spread = (own * (density.variances.to(eigvecs) - residual[:, None])).clamp_min(0).sqrt()  # [K, r]
        w = torch.einsum("krd,de,kr->ker", density.basis.to(eigvecs), eigvecs, spread)  # [K, D, r]
        chol = torch.linalg.cholesky(torch.eye(rank, dtype=eigvecs.dtype)
                                     + torch.einsum("kdr,kd,kds->krs", w, 1 / diag, w))  # [K, r, r]
        log_det = diag.log().sum(-1) + 2 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)  # [K]
        log_norm = density.counts.to(eigvecs).log() - 0.5 * (log_det + dim * math.log(2 * math.pi))
        return cls(density.mean.to(eigvecs) @ eigvecs, diag, w, chol, log_norm)

    def log_density(self, x: Tensor) -> Tensor:
        """``log Σ_c n_c N(x; ·)`` ``[B]`` of ``x [B, D]`` in the eigenbasis."""
        centred = x[:, None, :] - self.mean[None]  # [B, K, D]
        z = centred / self.diag[None]  # [B, K, D]: A⁻¹(x − μ)
        proj = torch.einsum("kdr,bkd->kbr", self.w, z)  # [K, B, r]
        solved = torch.linalg.solve_triangular(self.chol, proj.transpose(1, 2), upper=False)  # [K, r, B]
        mahalanobis = (z * centred).sum(-1) - solved.pow(2).sum(1).T  # [B, K]
        return torch.logsumexp(self.log_norm - 0.5 * mahalanobis, dim=-1)


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


def _check_density_geometry(arrays: Mapping[str, np.ndarray], tolerance: float = 1e-3) -> None:
    """Each class's directions orthonormal or zero, and its variances at least its residual: else
    the covariance the density stands for need not be positive definite."""
    basis = arrays["basis"].astype(np.float64)  # [K, r, D]
    gram = basis @ basis.transpose(0, 2, 1)  # [K, r, r]
    used = np.diagonal(gram, axis1=1, axis2=2) > 0.5  # [K, r] non-zero rows
    target = np.eye(basis.shape[1])[None] * used[:, :, None]
    if np.abs(gram - target).max() > tolerance or np.abs(basis[~used]).max(initial=0.0) > tolerance:
        raise DensityError("source density directions must be orthonormal (unused ones zero)")
    if (arrays["variances"] < arrays["residual"][:, None] * (1 - 1e-5)).any():
        raise DensityError("source density variances must be at least the class's residual variance")
