"""Training one prompt, and evaluating prompts alone and composed.

Only the prompt's tensors are optimised. The backbone runs under ``torch.no_grad()``
(inside ``APTViT.backbone_kv``), so no backward pass ever goes through it; with a
``KVCache`` it runs once per image instead of once per epoch.

Batches are ``(images, labels)`` or ``(images, labels, indices)``; the global indices
are needed only with a cache.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from common.kv_cache import KVCache
from common.model import APTViT, compose_probs
from common.prompt import Prompt

__all__ = ["TrainConfig", "evaluate", "train_prompt"]


@dataclass
class TrainConfig:
    """Optimisation settings of one prompt (AdamW with a cosine schedule)."""

    epochs: int = 1
    lr: float = 1e-2
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    progress: bool = True


def _batch_kv(model: APTViT, batch: Sequence[Tensor], cache: KVCache | None) -> tuple[Tensor, Tensor]:
    """Backbone keys/values and labels of a batch, through the cache when given."""
    images, labels = batch[0], batch[1]
    if cache is None:
        return model.backbone_kv(images.to(model.device)), labels.to(model.device)
    if len(batch) < 3:
        raise ValueError("a KVCache needs batches of (images, labels, indices); use common.data.Shard")
    return cache.kv(batch[2], images), labels.to(model.device)


def _local_targets(prompt: Prompt, labels: Tensor) -> Tensor:
    """Map global labels to positions in the prompt's label set; error on a label it lacks."""
    table = torch.full((prompt.num_classes,), -1, dtype=torch.long, device=labels.device)
    table[list(prompt.labels)] = torch.arange(len(prompt.labels), device=labels.device)
    in_range = (labels >= 0) & (labels < prompt.num_classes)
    targets = torch.where(in_range, table[labels.clamp(0, prompt.num_classes - 1)], -1)
    if bool((targets < 0).any()):
        outside = sorted(set(labels[targets < 0].tolist()))
        raise ValueError(f"labels {outside} are outside the prompt's label set {list(prompt.labels)}")
    return targets


def train_prompt(
    model: APTViT,
    prompt: Prompt,
    loader: Iterable[Sequence[Tensor]],
    config: TrainConfig | None = None,
    cache: KVCache | None = None,
) -> dict[str, float]:
    """Train ``prompt`` (tokens, memory, head) on ``loader``; returns last-epoch metrics.

    The loss is cross-entropy over the prompt's own label set (optionally label-smoothed).
    Returns ``loss`` and ``accuracy`` of the last epoch, ``num_examples`` seen per epoch,
    ``steps`` and wall-clock ``seconds``. ``prompt.num_examples`` is updated.
    """
    config = config or TrainConfig()
    if config.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {config.epochs}")
    steps = config.epochs * len(loader)
    if steps == 0:
        raise ValueError("the training loader is empty; this source has no examples")
    optimizer = torch.optim.AdamW(prompt.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    labels_index = list(prompt.labels)
    start = time.perf_counter()
    prompt.train()
    for epoch in range(config.epochs):
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(loader, desc=f"prompt {prompt.source or ''} epoch {epoch + 1}/{config.epochs}",
                   disable=not config.progress, leave=False)
        for batch in bar:
            kv, labels = _batch_kv(model, batch, cache)
            targets = _local_targets(prompt, labels)
            logits = model.forward_kv(kv, [prompt])[0][:, labels_index]  # [B, |labels|]
            loss = F.cross_entropy(logits, targets, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(targets)
            correct += int((logits.argmax(-1) == targets).sum())
            seen += len(targets)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    prompt.eval()
    prompt.num_examples = seen
    return {"loss": total_loss / seen, "accuracy": correct / seen, "num_examples": seen,
            "steps": steps, "seconds": time.perf_counter() - start}


@torch.no_grad()
def evaluate(
    model: APTViT,
    prompts: Sequence[Prompt],
    loader: Iterable[Sequence[Tensor]],
    weights: Tensor | str | None = None,
    progress: bool = False,
) -> dict[str, float | list[float]]:
    """Accuracy of each prompt alone and of their composition, one backbone pass per batch.

    Returns ``accuracy`` (composed), ``nll`` (composed negative log-likelihood),
    ``prompt_accuracy`` (one per prompt, over all examples), ``prompt_accuracy_own`` (one per
    prompt, over the examples whose label is in its label set; NaN if none) and
    ``num_examples``.
    """
    correct = torch.zeros(len(prompts))
    own_correct, own_seen = torch.zeros(len(prompts)), torch.zeros(len(prompts))
    masks = torch.stack([p.label_mask for p in prompts]).to(model.device)  # [k, C]
    composed_correct, nll, seen = 0, 0.0, 0
    for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        images, labels = batch[0].to(model.device), batch[1].to(model.device)
        logits = model(images, prompts)  # [k, B, C]
        hits = logits.argmax(-1) == labels  # [k, B]
        own = masks[:, labels]  # [k, B]: the example's label is in the prompt's label set
        correct += hits.sum(dim=1).cpu()
        own_correct += (hits & own).sum(dim=1).cpu()
        own_seen += own.sum(dim=1).cpu()
        probs = compose_probs(logits, weights)  # [B, C]
        composed_correct += int((probs.argmax(-1) == labels).sum())
        nll -= float(probs.gather(1, labels[:, None]).clamp_min(1e-12).log().sum())
        seen += len(labels)
    if seen == 0:
        raise ValueError("the evaluation loader is empty")
    return {"accuracy": composed_correct / seen, "nll": nll / seen,
            "prompt_accuracy": (correct / seen).tolist(),
            "prompt_accuracy_own": (own_correct / own_seen).tolist(), "num_examples": seen}
