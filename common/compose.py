"""Composition: the à-la-carte model of a selection of prompts, and how they are weighted.

The composed prediction is the weighted mean of the selected prompts' softmax probabilities
(the paper's ensemble), each softmax taken over the prompt's own label set:

* ``Weighting.UNIFORM``: every prompt counts the same;
* ``Weighting.CONFIDENCE``: each prompt weighted per image by its maximum probability (APT-W);
* ``Weighting.DENSITY``: each prompt weighted per image by the tempered posterior of its
  source, ``p(source | x) ∝ (n_source · p(x | source))^(1/T)``, from the
  :class:`~common.density.SourceDensity` each selected source shipped with its prompt (each
  class's covariance blended with the one pooled over the selection). A prompt is
  confident on any image, also on classes its source never saw; the density says which
  sources' data an image resembles, which fixes label-skewed and class-incremental pools.

:func:`default_weighting` is what the library, the Flower apps and the service use when the
caller does not choose: density when every selected prompt carries one, else uniform.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from common.density import OWN_COVARIANCE, PooledDensities, SourceDensity

if TYPE_CHECKING:
    from common.prompt import Prompt

__all__ = [
    "TEMPERATURE_PER_DIM",
    "Weighting",
    "compose_probs",
    "composition_weights",
    "default_weighting",
    "density_weights",
    "tempered_posterior",
]

# Posterior temperature per feature dimension (T = TEMPERATURE_PER_DIM · D). Chosen on
# validation images (simulations/tune_density.py), never on test images.
TEMPERATURE_PER_DIM = 1 / 128


class Weighting(str, Enum):
    """How the prompts of a composition are weighted (see the module doc)."""

    UNIFORM = "uniform"
    CONFIDENCE = "confidence"
    DENSITY = "density"


def compose_probs(logits: Tensor, weights: Tensor | Sequence[float] | None = None) -> Tensor:
    """Weighted mean over prompts of ``softmax(logits)``: ``[k, B, C] -> [B, C]``.

    ``weights`` is ``None`` (uniform) or non-negative per-prompt weights ``[k]`` or ``[k, B]``;
    they are normalised per image, so rows of the result sum to 1.
    """
    probs = logits.softmax(dim=-1)  # [k, B, C]; masked classes get exactly 0
    k, B = probs.shape[:2]
    if weights is None:
        w = probs.new_ones(k, B)
    else:
        w = torch.as_tensor(weights, dtype=probs.dtype, device=probs.device)
        if w.shape not in ((k,), (k, B)) or bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise ValueError(f"weights must be finite, non-negative, of shape [{k}] or [{k}, {B}]; "
                             f"got {tuple(w.shape)}")
        w = w.reshape(k, -1).expand(k, B)
        if not bool((w.sum(dim=0) > 0).all()):
            raise ValueError("weights must give every image a positive total weight (all-zero weights)")
    w = w / w.sum(dim=0, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return torch.einsum("kb,kbc->bc", w, probs)


def default_weighting(prompts: Sequence[Prompt]) -> Weighting:
    """``DENSITY`` when every prompt carries its source's density, else ``UNIFORM``."""
    return Weighting.DENSITY if prompts and all(p.density is not None for p in prompts) else Weighting.UNIFORM


def composition_weights(weighting: Weighting | str, logits: Tensor, prompts: Sequence[Prompt],
                        pooled: Tensor | None = None, scorer: PooledDensities | None = None) -> Tensor:
    """Per-image weights ``[k, B]`` of ``weighting`` for prompts with logits ``[k, B, C]``.

    ``pooled`` (the backbone's pooled features ``[B, D]`` of the images) is needed only for
    ``DENSITY``, which also needs every prompt to carry a density. Raises ``ValueError`` otherwise.
    ``scorer``: the prompts' densities already factorised (``PooledDensities``), to reuse over batches.
    """
    weighting = Weighting(weighting)
    k, B = logits.shape[:2]
    if weighting is Weighting.UNIFORM:
        return logits.new_ones(k, B)
    if weighting is Weighting.CONFIDENCE:
        return logits.softmax(dim=-1).amax(dim=-1)
    missing = [p.config.source or f"#{i}" for i, p in enumerate(prompts) if p.density is None]
    if missing:
        raise ValueError(f"density weighting needs every prompt's source density; {missing} shipped none "
                         "(use uniform weighting, or retrain those sources with share-density = true)")
    if pooled is None:
        raise ValueError("density weighting needs the images' pooled backbone features")
    return density_weights(scorer or [p.density for p in prompts], pooled).to(logits.dtype)


def density_weights(densities: Sequence[SourceDensity] | PooledDensities, features: Tensor,
                    temperature: float | None = None, own_covariance: float = OWN_COVARIANCE) -> Tensor:
    """Composition weights ``[k, B]``: the posterior ``p(source i | x) ∝ (n_i · p(x | source i))^(1/T)``
    of each of the ``k`` sources for each image's pooled backbone features ``[B, D]``, with each
    class's covariance blended with the one pooled over all ``k`` sources
    (:class:`~common.density.PooledDensities`; ``own_covariance`` as there, ignored when
    ``densities`` is already one). ``T`` defaults to ``TEMPERATURE_PER_DIM · D``; ``T = 1`` is
    the untempered posterior."""
    scorer = densities if isinstance(densities, PooledDensities) else PooledDensities(densities, own_covariance)
    temperature = TEMPERATURE_PER_DIM * features.shape[-1] if temperature is None else temperature
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return tempered_posterior(scorer.log_densities(features), temperature).to(features.dtype)


def tempered_posterior(log_post: Tensor, temperature: float) -> Tensor:
    """Softmax over sources (dim 0) of ``log(n_i · p(x | source i)) / T`` ``[k, B]``."""
    return (log_post / temperature).softmax(dim=0)
