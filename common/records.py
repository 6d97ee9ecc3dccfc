"""Prompts in Flower messages, and the checks every train reply must pass.

A prompt travels as two records: an ``ArrayRecord`` of its tensors and a ``ConfigRecord``
of its metadata strings. Several prompts in one message use the keys ``arrays.<i>`` and
``prompt.<i>``. A train reply holds exactly ``arrays`` + ``prompt`` + ``metrics`` (scalar
metrics only) + ``parent`` (a ``ConfigRecord`` echoing the ``parent-sha256`` of the prompt
the server sent, "" for none): no images, features, per-example values or gradients can
ride along.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.model import APTViT
from common.prompt import Prompt

__all__ = [
    "PARENT_RECORD",
    "ReplyError",
    "TRAIN_METRICS",
    "check_train_reply",
    "parent_sha256",
    "prompt_from_records",
    "prompt_records",
    "prompts_from_records",
    "prompts_records",
]

TRAIN_METRICS = frozenset({"num-examples", "train-loss", "train-accuracy", "parent-version", "seconds"})
TRAIN_RECORDS = frozenset({"arrays", "prompt", "metrics"})
PARENT_RECORD = "parent"  # {"sha256": hex digest of the prompt trained from, "" for none}
_SHA256_CHARS = frozenset("0123456789abcdef")


class ReplyError(ValueError):
    """A client reply does not have the shape a prompt upload must have."""


def prompt_records(prompt: Prompt, suffix: str = "") -> dict[str, ArrayRecord | ConfigRecord]:
    """``{"arrays": ArrayRecord, "prompt": ConfigRecord}`` for one prompt."""
    arrays = ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in prompt.arrays().items()})
    return {f"arrays{suffix}": arrays, f"prompt{suffix}": ConfigRecord(prompt.config.to_metadata())}


def prompt_from_records(content: RecordDict, model: APTViT | None, suffix: str = "") -> Prompt:
    """Decode and validate the prompt stored under ``arrays<suffix>``/``prompt<suffix>``."""
    arrays, meta = content.get(f"arrays{suffix}"), content.get(f"prompt{suffix}")
    if not isinstance(arrays, ArrayRecord) or not isinstance(meta, ConfigRecord):
        raise ReplyError(f"message lacks the prompt records 'arrays{suffix}' and 'prompt{suffix}'")
    return Prompt.from_arrays({k: v.numpy() for k, v in arrays.items()}, {k: str(v) for k, v in meta.items()}, model)


def prompts_records(prompts: Sequence[Prompt]) -> dict[str, ArrayRecord | ConfigRecord]:
    """Records for several prompts (keys ``arrays.<i>``, ``prompt.<i>``)."""
    records: dict[str, ArrayRecord | ConfigRecord] = {}
    for i, prompt in enumerate(prompts):
        records.update(prompt_records(prompt, suffix=f".{i}"))
    return records


def prompts_from_records(content: RecordDict, model: APTViT | None) -> list[Prompt]:
    """Decode every ``arrays.<i>``/``prompt.<i>`` pair, in order."""
    count = sum(1 for key in content.array_records if key.startswith("arrays."))
    return [prompt_from_records(content, model, suffix=f".{i}") for i in range(count)]


def check_train_reply(content: RecordDict, max_bytes: int) -> None:
    """Reject a train reply that is not exactly one prompt, scalar metrics and the parent echo.

    Raises ``ReplyError`` on extra or missing records, unknown or non-scalar metrics, a
    malformed ``parent`` record, or a prompt larger than ``max_bytes``.
    """
    expected = TRAIN_RECORDS | {PARENT_RECORD}
    if set(content.keys()) != expected:
        raise ReplyError(f"a train reply holds exactly {sorted(expected)}; got {sorted(map(str, content.keys()))[:10]}")
    parent_sha256(content)
    metrics = content.get("metrics")
    if not isinstance(metrics, MetricRecord):
        raise ReplyError("'metrics' must be a MetricRecord")
    extra = set(metrics.keys()) - TRAIN_METRICS
    if extra or any(isinstance(v, list) for v in metrics.values()):
        raise ReplyError(f"train metrics must be scalars among {sorted(TRAIN_METRICS)}; got {sorted(metrics.keys())}")
    if not isinstance(content["arrays"], ArrayRecord) or not isinstance(content["prompt"], ConfigRecord):
        raise ReplyError("'arrays' must be an ArrayRecord and 'prompt' a ConfigRecord")
    size = content["arrays"].count_bytes()
    if size > max_bytes:
        raise ReplyError(f"prompt upload is {size} bytes, over the {max_bytes}-byte limit (max-prompt-bytes)")



def parent_sha256(content: RecordDict) -> str:
    """The ``parent`` echo of a train reply: the SHA-256 (hex) it was trained from, "" for none."""
    record = content.get(PARENT_RECORD)
    if not isinstance(record, ConfigRecord) or set(record.keys()) != {"sha256"}:
        raise ReplyError(f"a train reply's {PARENT_RECORD!r} must be a ConfigRecord holding only 'sha256'")
    value = record["sha256"]
    if not isinstance(value, str) or (value and (len(value) != 64 or not set(value) <= _SHA256_CHARS)):
        raise ReplyError(f"{PARENT_RECORD!r} sha256 must be a hex SHA-256 or empty, got {str(value)[:70]!r}")
    return value
