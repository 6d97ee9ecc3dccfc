"""Training one prompt (the recipe), and evaluating prompts alone and composed.

The recipe of a source's prompt (LP-FT with selection on validation loss):

1. **Probe initialisation.** When the prompt's head is still zero (a fresh prompt), the whole
   head ``[C, (P + 1) D]`` is set to a linear probe (``common.probe``) fitted on the features it
   reads, ``[out_1 ; … ; out_P ; backbone pooled feature]`` (each prompt token's output, then the
   class token's), of the training images: the prompt starts as exactly that probe. A fresh
   prompt's random tokens (``Prompt.init``) read the backbone differently from its class token,
   and from each other, so this probe sees more than the reference probe on the pooled feature
   alone (measured on the main job's validation images: ``simulations/main_job.py --sweep``).
2. **Prompt tuning.** Tokens, memory and head are tuned with AdamW and a cosine schedule
   for ``epochs`` epochs but at least ``min_steps`` optimiser steps, so small shards are not
   starved of steps. A head that starts fitted (probe-initialised, or trained in an earlier
   round) learns at ``head_lr_scale`` × ``lr`` (a small scale keeps it near its probe while
   the tokens learn); a zero head (``probe_init=False``) learns at ``lr``.
3. **Selection.** With validation data, the per-example validation loss is measured before
   tuning and after every epoch. A tuned epoch is eligible only if a one-sided paired test
   says its loss is lower than the untuned prompt's at family-wise level ``selection_level``
   over the ``E`` epochs tested (Bonferroni): its mean per-example gain must exceed
   ``z = Φ⁻¹(1 − selection_level / E)`` standard errors of the paired difference. Testing
   every epoch at a fixed margin would keep a noise epoch on most small sources (a few dozen
   validation images, up to 17 epochs); the level bounds that risk at 5% by default. The
   eligible epoch with the lowest loss is kept, else the probe-initialised prompt is, so a
   prompt is the probe unless its own validation data shows the tuned prompt is better.
   Without validation data the last epoch is kept.

Only the prompt's tensors are optimised. The backbone runs under ``torch.no_grad()``
(inside ``APTViT.backbone_forward``), so no backward pass ever goes through it; with a
``KVCache`` it runs once per image instead of once per epoch.

Batches are ``(images, labels)`` or ``(images, labels, indices)``; the global indices
are needed only with a cache.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from common.compose import Weighting, compose_probs, composition_weights, default_weighting
from common.density import PooledDensities, SourceDensity
from common.kv_cache import KVCache
from common.model import APTViT
from common.probe import fit_probe
from common.prompt import Prompt

__all__ = ["TrainConfig", "evaluate", "planned_epochs", "probe_init_head", "source_density", "train_prompt"]


@dataclass
class TrainConfig:
    """The recipe of one prompt (see the module doc); the defaults are the product's."""

    epochs: int = 5
    min_steps: int = 50
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    probe_init: bool = True
    selection_level: float = 0.05  # family-wise risk of keeping a tuned epoch that is no better (module doc)
    head_lr_scale: float = 1.0  # a fitted head's learning rate as a fraction of ``lr`` (see the module doc)
    progress: bool = True


def _batch_inputs(model: APTViT, batch: Sequence[Tensor], cache: KVCache | None) -> tuple[Tensor, Tensor, Tensor]:
    """Backbone keys/values, pooled features and labels of a batch, through the cache when given."""
    images, labels = batch[0], batch[1]
    if cache is None:
        features, kv = model.backbone_forward(images.to(model.device))
        return kv, model.pooled(features), labels.to(model.device)
    if len(batch) < 3:
        raise ValueError("a KVCache needs batches of (images, labels, indices); use common.data.Shard")
    kv, pooled = cache.fetch(batch[2], images)
    return kv, pooled, labels.to(model.device)


def _local_targets(prompt: Prompt, labels: Tensor) -> Tensor:
    """Map global labels to positions in the prompt's label set; error on a label it lacks."""
    table = torch.full((prompt.config.num_classes,), -1, dtype=torch.long, device=labels.device)
    table[list(prompt.config.labels)] = torch.arange(len(prompt.config.labels), device=labels.device)
    in_range = (labels >= 0) & (labels < prompt.config.num_classes)
    targets = torch.where(in_range, table[labels.clamp(0, prompt.config.num_classes - 1)], -1)
    if bool((targets < 0).any()):
        outside = sorted(set(labels[targets < 0].tolist()))
        raise ValueError(f"labels {outside} are outside the prompt's label set {list(prompt.config.labels)}")
    return targets


@torch.no_grad()
def probe_init_head(model: APTViT, prompt: Prompt, loader: Iterable[Sequence[Tensor]],
                    cache: KVCache | None = None) -> float:
    """Make the head a linear probe on what it reads, ``[out_1 ; … ; out_P ; pooled feature]`` of
    ``loader``'s images; returns the probe's L2.

    The rows of classes outside the prompt's label set stay zero, so the prompt's logits are
    exactly the probe's.
    """
    features, targets = [], []
    for batch in loader:
        kv, pooled, labels = _batch_inputs(model, batch, cache)
        reads = model.features_kv(kv, [prompt])[0]  # [B, P·D]
        features.append(torch.cat([reads, pooled.to(reads)], dim=-1))  # [B, (P + 1)·D]
        targets.append(_local_targets(prompt, labels))
    if not features:
        raise ValueError("the training loader is empty; this source has no examples")
    probe = fit_probe(torch.cat(features), torch.cat(targets), len(prompt.config.labels))
    labels_index = list(prompt.config.labels)
    prompt.head.weight.zero_()
    prompt.head.bias.zero_()
    prompt.head.weight[labels_index] = probe.weight.to(prompt.head.weight)
    prompt.head.bias[labels_index] = probe.bias.to(prompt.head.bias)
    return probe.l2


@torch.no_grad()
def source_density(model: APTViT, loader: Iterable[Sequence[Tensor]], cache: KVCache | None = None) -> SourceDensity:
    """The :class:`SourceDensity` of ``loader``'s images (the backbone's pooled features); with a
    filled cache no backbone pass is needed."""
    pooled, labels = [], []
    for batch in loader:
        _, feats, batch_labels = _batch_inputs(model, batch, cache)
        pooled.append(feats.cpu())
        labels.append(batch_labels.cpu())
    if not pooled:
        raise ValueError("the loader is empty; a density needs the source's images")
    return SourceDensity.fit(torch.cat(pooled), torch.cat(labels))


@torch.no_grad()
def _validation_losses(model: APTViT, prompt: Prompt, loader: Iterable[Sequence[Tensor]],
                       cache: KVCache | None) -> Tensor:
    """Per-example cross-entropy ``[n]`` over the prompt's label set, on the examples whose label it covers."""
    losses = []
    mask = prompt.label_mask
    for batch in loader:
        kv, pooled, labels = _batch_inputs(model, batch, cache)
        C = prompt.config.num_classes
        keep = mask[labels.clamp(0, C - 1)] & (labels >= 0) & (labels < C)
        if bool(keep.any()):
            logits = model.forward_kv(kv, pooled, [prompt])[0][keep][:, list(prompt.config.labels)]
            losses.append(F.cross_entropy(logits, _local_targets(prompt, labels[keep]), reduction="none").cpu())
    return torch.cat(losses) if losses else torch.zeros(0)


def _batch_logits(model: APTViT, prompts: Sequence[Prompt], batch: Sequence[Tensor],
                  cache: KVCache | None) -> tuple[Tensor, Tensor, Tensor]:
    """Logits ``[k, B, C]`` of ``prompts``, pooled features ``[B, D]`` and labels ``[B]`` of a batch."""
    if cache is None:
        logits, pooled = model.forward_with_pooled(batch[0].to(model.device), prompts)
        return logits, pooled, batch[1].to(model.device)
    kv, pooled, labels = _batch_inputs(model, batch, cache)
    return model.forward_kv(kv, pooled, prompts), pooled.to(model.device), labels


def _head_is_zero(prompt: Prompt) -> bool:
    return not bool(prompt.head.weight.any()) and not bool(prompt.head.bias.any())


def train_prompt(
    model: APTViT,
    prompt: Prompt,
    loader: Iterable[Sequence[Tensor]],
    config: TrainConfig | None = None,
    cache: KVCache | None = None,
    val_loader: Iterable[Sequence[Tensor]] | None = None,
) -> dict[str, float]:
    """Run the recipe (module doc) on ``prompt`` with ``loader``; returns its metrics.

    The loss is cross-entropy over the prompt's own label set (optionally label-smoothed).
    Returns ``loss`` and ``accuracy`` of the last epoch, ``num_examples`` seen per epoch,
    ``steps``, ``epochs`` run, ``selected_epoch`` (0 = before tuning), ``val_loss`` of the kept
    prompt (NaN without validation data), ``probe_l2`` (NaN without probe initialisation)
    and wall-clock ``seconds``. ``prompt.config.num_examples`` is updated.
    """
    config = config or TrainConfig()
    valid_level = 0 < config.selection_level < 1
    if config.epochs < 1 or config.min_steps < 0 or not config.head_lr_scale > 0 or not valid_level:
        raise ValueError(f"epochs must be >= 1, min-steps >= 0, head-lr-scale > 0 and selection-level in (0, 1), got "
                         f"{config.epochs}, {config.min_steps}, {config.head_lr_scale} and {config.selection_level}")
    batches = len(loader)
    if batches == 0:
        raise ValueError("the training loader is empty; this source has no examples")
    start = time.perf_counter()
    probe_init = config.probe_init and _head_is_zero(prompt)
    probe_l2 = probe_init_head(model, prompt, loader, cache) if probe_init else math.nan
    epochs = planned_epochs(batches, config)
    validate = (lambda: _validation_losses(model, prompt, val_loader, cache)) if val_loader is not None else None
    best = _Selection(validate(), prompt, config.selection_level, epochs) if validate else None
    head_lr = config.lr * (1.0 if _head_is_zero(prompt) else config.head_lr_scale)
    optimizer = torch.optim.AdamW([{"params": [prompt.tokens, prompt.memory]},
                                   {"params": list(prompt.head.parameters()), "lr": head_lr}],
                                  lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * batches)
    prompt.train()
    for epoch in range(epochs):
        last = _train_epoch(model, prompt, loader, optimizer, schedule, config, cache,
                            f"prompt {prompt.config.source or ''} epoch {epoch + 1}/{epochs}")
        if best is not None:
            best.offer(validate(), epoch + 1, prompt)
    prompt.eval()
    if best is not None and best.active:
        prompt.load_state_dict(best.state)
    prompt.config = replace(prompt.config, num_examples=last["num_examples"])
    return last | {"steps": epochs * batches, "epochs": epochs,
                   "selected_epoch": best.epoch if best and best.active else epochs,
                   "val_loss": best.loss if best and best.active else math.nan, "probe_l2": probe_l2,
                   "seconds": time.perf_counter() - start}


def planned_epochs(batches: int, config: TrainConfig) -> int:
    """Epochs the recipe runs over ``batches`` batches per epoch: ``epochs``, or more to reach ``min_steps``."""
    return max(config.epochs, math.ceil(config.min_steps / batches))


class _Selection:
    """The prompt state to keep: the untuned one (epoch 0), unless a tuned epoch beats it on
    validation in a one-sided paired test at family-wise ``level`` over ``tests`` epochs; then
    the lowest-loss such epoch. Inactive (nothing to select on) without validation examples."""

    def __init__(self, losses: Tensor, prompt: Prompt, level: float, tests: int) -> None:
        self.reference = losses
        self.margin = NormalDist().inv_cdf(1.0 - level / tests)  # standard errors a gain must exceed
        self.active = len(losses) > 0
        self.loss, self.epoch = float(losses.mean()) if self.active else math.nan, 0
        self.state = copy.deepcopy(prompt.state_dict())

    def offer(self, losses: Tensor, epoch: int, prompt: Prompt) -> None:
        if len(self.reference) < 2:  # one example has no standard error: no evidence, keep the probe
            return
        gain = self.reference - losses  # [n] paired: positive where the tuned prompt is better
        mean, error = float(gain.mean()), float(gain.std() / math.sqrt(len(gain)))
        if mean > 0 and mean > self.margin * error and float(losses.mean()) < self.loss:
            self.loss, self.epoch, self.state = float(losses.mean()), epoch, copy.deepcopy(prompt.state_dict())


def _train_epoch(model: APTViT, prompt: Prompt, loader: Iterable[Sequence[Tensor]], optimizer, schedule,
                 config: TrainConfig, cache: KVCache | None, desc: str) -> dict[str, float]:
    """One pass over ``loader``; returns its mean ``loss``, ``accuracy`` and ``num_examples``."""
    labels_index = list(prompt.config.labels)
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, disable=not config.progress, leave=False)
    for batch in bar:
        kv, pooled, labels = _batch_inputs(model, batch, cache)
        targets = _local_targets(prompt, labels)
        logits = model.forward_kv(kv, pooled, [prompt])[0][:, labels_index]  # [B, |labels|]
        loss = F.cross_entropy(logits, targets, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total_loss += loss.item() * len(targets)
        correct += int((logits.argmax(-1) == targets).sum())
        seen += len(targets)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    return {"loss": total_loss / seen, "accuracy": correct / seen, "num_examples": seen}


@torch.no_grad()
def evaluate(
    model: APTViT,
    prompts: Sequence[Prompt],
    loader: Iterable[Sequence[Tensor]],
    weights: Weighting | str | Tensor | None = None,
    progress: bool = False,
    cache: KVCache | None = None,
) -> dict[str, float | list[float] | dict[str, float]]:
    """Accuracy of each prompt alone and of their composition, one backbone pass per batch
    (none for the images ``cache`` holds).

    ``weights`` is how the composition is weighted (``APTViT.compose``; ``None``: density when
    every prompt carries one, else uniform). Returns ``accuracy`` and ``nll`` of that
    composition, ``weighting`` (its name, or ``"custom"``), ``composed`` (accuracy per
    weighting: uniform always, density when every prompt carries one), ``prompt_accuracy``
    (one per prompt, over all examples), ``prompt_accuracy_own`` (one per prompt, over the
    examples whose label is in its label set; NaN if none) and ``num_examples``.
    """
    chosen = default_weighting(prompts) if weights is None else weights
    chosen = chosen if isinstance(chosen, Tensor) else Weighting(chosen)
    compared = [Weighting.UNIFORM] + ([Weighting.DENSITY] if default_weighting(prompts) is Weighting.DENSITY else [])
    correct = torch.zeros(len(prompts))
    own_correct, own_seen = torch.zeros(len(prompts)), torch.zeros(len(prompts))
    masks = torch.stack([p.label_mask for p in prompts]).to(model.device)  # [k, C]
    composed_correct = dict.fromkeys(compared, 0)
    scorer = PooledDensities([p.density for p in prompts]) if Weighting.DENSITY in compared else None
    chosen_correct, nll, seen = 0, 0.0, 0
    for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        logits, pooled, labels = _batch_logits(model, prompts, batch, cache)  # [k, B, C], [B, D], [B]
        hits = logits.argmax(-1) == labels  # [k, B]
        own = masks[:, labels]  # [k, B]: the example's label is in the prompt's label set
        correct += hits.sum(dim=1).cpu()
        own_correct += (hits & own).sum(dim=1).cpu()
        own_seen += own.sum(dim=1).cpu()
        composed = {w: compose_probs(logits, composition_weights(w, logits, prompts, pooled, scorer)) for w in compared}
        for weighting, probs in composed.items():
            composed_correct[weighting] += int((probs.argmax(-1) == labels).sum())
        probs = composed.get(chosen) if not isinstance(chosen, Tensor) else None
        if probs is None:  # a custom tensor, or confidence weighting: not among the compared ones
            w = chosen if isinstance(chosen, Tensor) else composition_weights(chosen, logits, prompts, pooled, scorer)
            probs = compose_probs(logits, w)  # [B, C]
        chosen_correct += int((probs.argmax(-1) == labels).sum())
        nll -= float(probs.gather(1, labels[:, None]).clamp_min(1e-12).log().sum())
        seen += len(labels)
    if seen == 0:
        raise ValueError("the evaluation loader is empty")
    return {"accuracy": chosen_correct / seen, "nll": nll / seen,
            "weighting": "custom" if isinstance(chosen, Tensor) else chosen.value,
            "composed": {w.value: c / seen for w, c in composed_correct.items()},
            "prompt_accuracy": (correct / seen).tolist(),
            "prompt_accuracy_own": (own_correct / own_seen).tolist(), "num_examples": seen}
