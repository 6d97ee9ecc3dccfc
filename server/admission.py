"""What the server admits from a node: every byte of a reply is untrusted.

A reply is checked in this order, each step before anything the next one would allocate:

1. its records (``common.records.check_train_reply``): exactly a prompt and scalar metrics,
   at most ``max-prompt-bytes`` of arrays;
2. its arrays (``decode_arrays``): numpy serialisation only, float32 or int64, a declared
   shape whose size matches the bytes, and an npy header that agrees with that declaration,
   all checked *before* a single element is decoded (so a 144-byte array claiming 2**40
   elements is refused, not allocated);
3. its metadata (``check_metadata``): strings only, bounded length, no deep nesting, and
   the prompt shape limits below;
4. its metrics (``check_metrics``): finite numbers, integers within 0..2**53;
5. the prompt itself (``common.prompt.Prompt.from_arrays``) and, once built, its label
   space (``check_prompt``).

An evaluate reply (``check_evaluation``) must hold a ``metrics`` record with an integer
``num-examples`` (at most 2**53) and, unless it is 0 (the node has no validation images and
nothing else is read), an ``accuracy`` in [0, 1] and a finite, non-negative ``loss``.

Prompt shape limits (``MAX_N_PROMPT``, ``MAX_N_MEMORY``) keep the cost of composing any
admitted prompt bounded: a prompt's ``P`` tokens attend, per layer and head, to the ``N``
backbone tokens, the ``P`` prompt tokens and the ``M`` memory tokens, so one prompt over a
batch of ``B`` images needs ``B x heads x P x (N + P + M)`` attention scores per layer
(``compose_scores_bytes``). The APT paper uses 1 prompt token and a few memory tokens; 16
and 64 leave room for 16x / 16x larger prompts while a worst-case prompt on ViT-S/14 at
224 px (N = 257, 6 heads) needs 32 x 6 x 16 x 337 x 4 B = 4.1 MB of scores for a 32-image
batch, well under ``COMPOSE_BUDGET_BYTES``.
"""

from __future__ import annotations

import io
import math
import numbers
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.constant import SType

from common.prompt import Prompt, PromptError
from common.records import ReplyError

__all__ = [
    "COMPOSE_BUDGET_BYTES",
    "MAX_N_MEMORY",
    "MAX_N_PROMPT",
    "Evaluation",
    "PromptLimitError",
    "check_evaluation",
    "check_metadata",
    "check_metrics",
    "check_prompt",
    "compose_scores_bytes",
    "decode_array",
    "decode_arrays",
    "known_label_space",
]

MAX_N_PROMPT = 16
MAX_N_MEMORY = 64
COMPOSE_BUDGET_BYTES = 64 << 20  # attention scores of one worst-case prompt over a 32-image batch
MAX_METADATA_CHARS = 1 << 16  # per metadata value
MAX_NESTING = 8  # brackets/braces inside any metadata value
MAX_METRIC_INT = 2**53
ALLOWED_DTYPES = {"float32": np.dtype("<f4"), "int64": np.dtype("<i8")}
_KNOWN_CLASSES = {"fashion_mnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100}


class PromptLimitError(PromptError):
    """A prompt is valid but outside what this server admits (too large, other label space)."""


def decode_array(name: str, array: Array, max_bytes: int) -> np.ndarray:
    """The array's values, after checking its declaration against its bytes; raises ``ReplyError``."""
    if not isinstance(array, Array) or array.stype != SType.NUMPY:
        raise ReplyError(f"array {name!r} is not numpy-serialised (stype {getattr(array, 'stype', '?')!r}); "
                         "send it with flwr.app.Array(ndarray)")
    dtype = ALLOWED_DTYPES.get(str(array.dtype))
    if dtype is None:
        raise ReplyError(f"array {name!r} has dtype {str(array.dtype)[:32]!r}; prompts hold {sorted(ALLOWED_DTYPES)}")
    shape = tuple(array.shape)
    if len(shape) > 4 or not all(isinstance(d, int) and 0 <= d < 2**31 for d in shape):
        raise ReplyError(f"array {name!r} declares an invalid shape {str(shape)[:64]}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes or nbytes > len(array.data):
        raise ReplyError(f"array {name!r} declares {nbytes} bytes of values but carries {len(array.data)} "
                         f"(limit {max_bytes}); it is truncated or oversized")
    return _read_npy(name, bytes(array.data), dtype, shape)


def _read_npy(name: str, data: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Parse an npy blob whose header must say exactly ``dtype``/``shape`` (C order); no allocation before."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"npy format version {version} is not supported")
        header = read_header[version](stream, max_header_size=1 << 12)
    except (ValueError, SyntaxError, TypeError, OverflowError, RecursionError, MemoryError) as err:
        raise ReplyError(f"array {name!r} is not a valid npy blob ({str(err)[:80]})") from err
    if header != (shape, False, dtype):
        raise ReplyError(f"array {name!r}: its npy header {str(header)[:80]} disagrees with its declared "
                         f"shape {shape} / dtype {dtype}")
    payload = data[stream.tell():]
    if len(payload) != math.prod(shape) * dtype.itemsize:
        raise ReplyError(f"array {name!r} has {len(payload)} bytes of values, its shape needs "
                         f"{math.prod(shape) * dtype.itemsize}")
    return np.frombuffer(payload, dtype=dtype).reshape(shape).copy()


def decode_arrays(record: ArrayRecord, max_bytes: int) -> dict[str, np.ndarray]:
    """Every array of ``record``, decoded with ``decode_array`` (at most ``max_bytes`` in all)."""
    arrays: dict[str, np.ndarray] = {}
    budget = max_bytes
    for name, array in record.items():
        arrays[name] = decode_array(str(name), array, budget)
        budget -= arrays[name].nbytes
    return arrays


def check_metadata(meta: ConfigRecord) -> dict[str, str]:
    """Prompt metadata as strings, bounded, shallow, with ``n_prompt``/``n_memory`` within the limits.

    Raises ``ReplyError`` for a malformed record, ``PromptLimitError`` for a too large prompt.
    """
    out: dict[str, str] = {}
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ReplyError(f"prompt metadata {str(key)[:40]!r} must be a string, got {type(value).__name__}")
        if len(value) > MAX_METADATA_CHARS or _nesting(value) > MAX_NESTING:
            raise ReplyError(f"prompt metadata {key!r} is longer than {MAX_METADATA_CHARS} characters or nested "
                             f"deeper than {MAX_NESTING}")
        out[key] = value
    for key, limit in (("n_prompt", MAX_N_PROMPT), ("n_memory", MAX_N_MEMORY)):
        text = out.get(key, "0")
        if not text.isdigit() or len(text) > 6 or int(text) > limit:
            raise PromptLimitError(f"prompt {key} = {text[:20]!r} exceeds this server's limit of {limit}; "
                                   f"train with {key.replace('_', '-')} <= {limit}")
    return out


def _nesting(text: str) -> int:
    """Deepest bracket/brace nesting in ``text`` (an upper bound: quotes are not parsed)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(depth - 1, 0)
    return deepest


def check_metrics(metrics: MetricRecord) -> dict[str, int | float]:
    """Scalar metrics as Python numbers: finite, integers within ``0..2**53``; raises ``ReplyError``."""
    out: dict[str, int | float] = {}
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ReplyError(f"metric {name!r} must be a number, got {type(value).__name__}")
        if isinstance(value, numbers.Integral):
            if not 0 <= int(value) <= MAX_METRIC_INT:
                raise ReplyError(f"metric {name!r} = {int(value)} is outside 0..{MAX_METRIC_INT}")
            out[name] = int(value)
        elif not math.isfinite(float(value)):
            raise ReplyError(f"metric {name!r} is {float(value)}; send finite metrics")
        else:
            out[name] = float(value)
    return out


@dataclass(frozen=True)
class Evaluation:
    """What one node's evaluate reply says about the prompt(s) it was sent, on its validation split."""

    num_examples: int
    accuracy: float  # of the composition (one prompt: that prompt)
    loss: float  # mean cross-entropy of the composition


def check_evaluation(content: RecordDict) -> Evaluation | None:
    """The :class:`Evaluation` of an evaluate reply's ``metrics``, or ``None`` when the node had no
    validation images (``num-examples`` 0: nothing to weigh in); raises ``ReplyError`` if malformed."""
    metrics = content.get("metrics")
    if not isinstance(metrics, MetricRecord):
        raise ReplyError("the evaluate reply has no 'metrics' MetricRecord")
    n = metrics.get("num-examples")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 <= int(n) <= MAX_METRIC_INT:
        raise ReplyError(f"num-examples must be an integer in 0..{MAX_METRIC_INT}, got {str(n)[:20]}")
    if n == 0:
        return None
    try:
        acc, loss = (metrics[k] for k in ("accuracy", "loss"))
    except KeyError as err:
        raise ReplyError(f"the evaluate reply's metrics lack {err}") from None
    for name, value, top in (("accuracy", acc, 1.0), ("loss", loss, math.inf)):
        number = not isinstance(value, bool) and isinstance(value, numbers.Real)
        if not number or not math.isfinite(float(value)) or not 0.0 <= float(value) <= top:
            raise ReplyError(f"{name} must be a finite number in [0, {top:g}], got {str(value)[:20]}")
    return Evaluation(int(n), float(acc), float(loss))


def check_prompt(prompt: Prompt, num_classes: int | None) -> Prompt:
    """``prompt`` if it is within the shape limits and, when known, the run's label space."""
    shape = prompt.config
    if shape.n_prompt > MAX_N_PROMPT or shape.n_memory > MAX_N_MEMORY:
        raise PromptLimitError(f"prompt has n_prompt={shape.n_prompt}, n_memory={shape.n_memory}; this server "
                               f"admits at most {MAX_N_PROMPT} and {MAX_N_MEMORY}")
    if num_classes is not None and prompt.config.num_classes != num_classes:
        raise PromptLimitError(f"prompt has a head over {prompt.config.num_classes} classes, the run's label space has "
                               f"{num_classes}; train on the run's dataset classes")
    return prompt


def compose_scores_bytes(batch: int, heads: int, tokens: int, n_prompt: int, n_memory: int) -> int:
    """Bytes of float32 attention scores one prompt needs per layer over ``batch`` images."""
    return batch * heads * n_prompt * (tokens + n_prompt + n_memory) * 4


def known_label_space(dataset: str) -> int | None:
    """The number of classes of a built-in dataset name (``None`` when it is not built in)."""
    return _KNOWN_CLASSES.get(dataset.lower().replace("-", "_"))
