"""The prompt artefact: one source's trainable tensors, and their validated file format.

A ``Prompt`` holds exactly what a source trains and uploads:

==============  ====================  ===========================================
name            shape                 role
==============  ====================  ===========================================
``tokens``      ``[P, D]``            input prompt tokens (``P = n_prompt``)
``memory``      ``[L, M, D]``         memory tokens of every layer (``M = n_memory``)
``head.weight`` ``[C, (P + 1) D]``    linear head over the global label space, reading
                                      ``[out_1 ; … ; out_P ; backbone pooled feature]``
``head.bias``   ``[C]``
==============  ====================  ===========================================

The head reads the output of each prompt token (``out_t``, after the backbone's final norm)
next to the frozen backbone's own pooled feature (its class token), so a prompt whose
prompt-side columns are zero *is* a linear probe on the backbone; a fresh prompt starts as a
probe on all of them (``common.train``).

plus, optionally (format version >= 2), the source's :class:`~common.density.SourceDensity`
(arrays ``density.<field>``: per-class counts, means, top principal directions and variances
of the source's pooled backbone features) that density-weighted composition needs; a
version-1 artefact, or a source that keeps its density private, has none and composes
uniformly. Its :class:`PromptConfig` (shape, the label set it covers — a subset of the ``C``
global classes —, the backbone it was trained on by name and weight fingerprint, its source
id, the number of training examples and a creation time) is the artefact's metadata. On
disk it is a safetensors file with that metadata in the header; over Flower it travels as a
dict of numpy arrays plus the same metadata strings.
Every way in (``load``, ``from_bytes``, ``from_arrays``) runs the same validation.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import safetensors.numpy
import torch
from torch import Tensor, nn

from common.density import DensityError, SourceDensity
from common.files import atomic_write

if TYPE_CHECKING:
    from common.model import APTViT

DEFAULT_N_PROMPT = 4  # prompt tokens (chosen on the main job's validation images, simulations/RESULTS.md §0)
DEFAULT_N_MEMORY = 4  # memory tokens per layer

__all__ = [
    "DEFAULT_N_MEMORY",
    "DEFAULT_N_PROMPT",
    "BackboneMismatchError",
    "FORMAT_VERSION",
    "Prompt",
    "PromptDensityError",
    "PromptConfig",
    "PromptError",
    "PromptFormatError",
    "PromptShapeError",
    "PromptValueError",
    "PromptVersionError",
    "head_width",
    "source_seed",
]

FORMAT_NAME = "alacarte-prompt"
FORMAT_VERSION = 4  # 2: optional source density; 3: the head's pooled-feature block; 4: a head block per token
READABLE_VERSIONS = (1, 2, 3, 4)  # older heads are upgraded exactly on load (``_upgrade_head``)
TENSOR_NAMES = ("tokens", "memory", "head.weight", "head.bias")
DENSITY_PREFIX = "density."
MAX_INT_FIELD = 2**53  # dimensions and example counts above this are not real prompts
MAX_CLOCK_SKEW = 86400.0  # created_at may be at most a day in the future
MAX_LABELS_CHARS = 1 << 16
_INT_FIELDS = ("embed_dim", "depth", "n_prompt", "n_memory", "num_classes", "num_examples")


class PromptError(ValueError):
    """Base class: a prompt artefact was rejected."""


class PromptFormatError(PromptError):
    """The bytes are not a readable prompt file (truncated, corrupt, missing metadata)."""


class PromptVersionError(PromptFormatError):
    """The file was written by an unknown version of the prompt format."""


class PromptShapeError(PromptError):
    """Tensor names, shapes or dtypes do not match the metadata or the backbone."""


class PromptValueError(PromptError):
    """A tensor holds NaN or Inf."""


class PromptDensityError(PromptError):
    """The source density shipped with the prompt is malformed, too large or does not fit it."""


class BackboneMismatchError(PromptError):
    """The prompt was trained on a different backbone (weight fingerprint differs)."""


@dataclass(frozen=True)
class PromptConfig:
    """What a prompt is (shape and label set) and where it comes from (backbone, source, provenance).

    Checked on construction (like PEFT's ``PromptTuningConfig``); travels as the artefact's
    string metadata (``to_metadata`` / ``from_metadata``). ``labels`` (default: all
    ``num_classes`` classes) is normalised to a sorted tuple of distinct classes.
    """

    embed_dim: int
    depth: int
    num_classes: int
    n_prompt: int = 1
    n_memory: int = 4
    labels: tuple[int, ...] | None = None
    backbone: str = ""
    fingerprint: str = ""
    source: str = ""
    num_examples: int = 0
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if min(self.embed_dim, self.depth, self.num_classes, self.n_prompt) < 1 or self.n_memory < 0:
            raise PromptShapeError(
                f"invalid prompt dimensions embed_dim={self.embed_dim} depth={self.depth} "
                f"num_classes={self.num_classes} n_prompt={self.n_prompt} n_memory={self.n_memory}: all must be "
                ">= 1 (n_memory >= 0)")
        labels = range(self.num_classes) if self.labels is None else self.labels
        object.__setattr__(self, "labels", _check_labels(labels, self.num_classes))

    def to_metadata(self) -> dict[str, str]:
        """The artefact's metadata as strings (safetensors header / Flower ConfigRecord)."""
        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "backbone": self.backbone,
            "fingerprint": self.fingerprint,
            "embed_dim": str(self.embed_dim),
            "depth": str(self.depth),
            "n_prompt": str(self.n_prompt),
            "n_memory": str(self.n_memory),
            "num_classes": str(self.num_classes),
            "labels": json.dumps(list(self.labels)),
            "source": self.source,
            "num_examples": str(self.num_examples),
            "created_at": repr(float(self.created_at)),
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> PromptConfig:
        """Parse and range-check untrusted metadata; raises a ``PromptError`` subclass naming what is wrong."""
        return cls(**_parse_metadata(metadata))


class Prompt(nn.Module):
    """One source's prompt: input tokens, per-layer memory tokens and a linear head, shaped by ``config``."""

    def __init__(self, config: PromptConfig) -> None:
        super().__init__()
        self.config = config
        D = config.embed_dim
        self.tokens = nn.Parameter(torch.zeros(config.n_prompt, D))  # [P, D]
        self.memory = nn.Parameter(torch.zeros(config.depth, config.n_memory, D))  # [L, M, D]
        self.head = nn.Linear(head_width(config), config.num_classes)  # [C, (P+1)D] over [out_1;…;out_P;pooled]
        self.density: SourceDensity | None = None  # the source's feature density, if it shares one

    @classmethod
    def init(
        cls,
        model: APTViT,
        num_classes: int,
        n_prompt: int = DEFAULT_N_PROMPT,
        n_memory: int = DEFAULT_N_MEMORY,
        seed: int = 0,
        labels: Iterable[int] | None = None,
        source: str = "",
    ) -> Prompt:
        """A fresh prompt for ``model``, deterministic in ``seed`` (``labels``: all classes by default).

        Prompt tokens start as standard normal vectors, memory tokens at small noise, and the
        head at zero (uniform predictions). A random token, far from the class token, attends to
        the backbone's tokens in its own way, so its output holds features the class token's
        lacks, and the head reads each token's output: on the main job's validation images a
        probe on ``[out_1 ; … ; out_P ; pooled]`` beats one on the pooled feature alone, more
        with four tokens than with one, where a token started at the class token gained little
        (``simulations/RESULTS.md`` §0). The default shape is the Flower apps' (run config
        ``n-prompt``, ``n-memory``).
        """
        prompt = cls(PromptConfig(
            embed_dim=model.embed_dim, depth=model.depth, num_classes=num_classes, n_prompt=n_prompt,
            n_memory=n_memory, labels=None if labels is None else tuple(labels), backbone=model.backbone_name,
            fingerprint=model.fingerprint, source=source))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            prompt.tokens.copy_(torch.randn(n_prompt, model.embed_dim, generator=gen))
            prompt.memory.copy_(0.02 * torch.randn(prompt.memory.shape, generator=gen))
            prompt.head.weight.zero_()
            prompt.head.bias.zero_()
        return prompt.to(model.device)

    @property
    def label_mask(self) -> Tensor:
        """``[C]`` bool: True for the classes this prompt was trained on."""
        mask = torch.zeros(self.config.num_classes, dtype=torch.bool, device=self.head.weight.device)
        mask[list(self.config.labels)] = True
        return mask

    def arrays(self) -> dict[str, np.ndarray]:
        """The trainable tensors as float32 numpy arrays, plus the density's arrays when it has one
        (what Flower's ArrayRecord carries)."""
        state = self.state_dict()
        arrays = {name: state[name].detach().to("cpu", torch.float32).numpy().copy() for name in TENSOR_NAMES}
        if self.density is not None:
            arrays |= {DENSITY_PREFIX + k: v for k, v in self.density.to_arrays().items()}
        return arrays

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray], config: PromptConfig | Mapping[str, str], model: APTViT | None = None
    ) -> Prompt:
        """Build a prompt from arrays and its config (or the artefact's metadata), validating everything.

        With ``model``, the prompt must fit its backbone (fingerprint, width, depth) and is
        placed on its device. Raises a ``PromptError`` subclass naming what is wrong.
        """
        if isinstance(config, PromptConfig):
            version = FORMAT_VERSION
        else:
            version, config = _format_version(config), PromptConfig.from_metadata(config)
        tensors = {k: v for k, v in arrays.items() if not k.startswith(DENSITY_PREFIX)}
        density = {k[len(DENSITY_PREFIX):]: v for k, v in arrays.items() if k.startswith(DENSITY_PREFIX)}
        _check_arrays(tensors, config, version)  # before allocating anything the config asks for
        tensors = _upgrade_head(tensors, config, version)
        if density and version < 2:
            raise PromptVersionError(f"a version-{version} prompt cannot carry a density; re-export it")
        prompt = cls(config)
        if model is not None:
            _check_backbone(config, model)
        with torch.no_grad():
            prompt.load_state_dict({name: torch.from_numpy(np.array(tensors[name])) for name in TENSOR_NAMES})
        prompt.density = _parse_density(density, config) if density else None
        return prompt.to(model.device) if model is not None else prompt

    def to_bytes(self, config: PromptConfig | None = None) -> bytes:
        """Serialise to safetensors bytes with the metadata (of ``config``, default the prompt's
        own) in the header.

        The bytes are a function of the tensors and the metadata alone (the header's keys are
        sorted), so equal prompts have equal checksums in the pool.
        """
        metadata = (config or self.config).to_metadata()
        return _canonical_header(safetensors.numpy.save(self.arrays(), metadata=metadata))

    @classmethod
    def from_bytes(cls, data: bytes, model: APTViT | None = None) -> Prompt:
        """Parse safetensors bytes written by ``to_bytes``; validated like ``from_arrays``."""
        metadata = read_metadata_bytes(data)
        try:
            arrays = safetensors.numpy.load(data)
        except Exception as err:  # safetensors raises its own SafetensorError, or OSError
            raise PromptFormatError(f"prompt tensors are unreadable ({err}); the file is corrupt or truncated") from err
        return cls.from_arrays(arrays, metadata, model)

    def save(self, path: str | Path) -> Path:
        """Write the artefact atomically (temporary file, fsync, rename)."""
        return atomic_write(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: str | Path, model: APTViT | None = None) -> Prompt:
        """Read and validate a prompt file; see ``from_arrays`` for the checks."""
        return cls.from_bytes(Path(path).read_bytes(), model)

    def extra_repr(self) -> str:
        c = self.config
        return (f"source={c.source!r}, n_prompt={c.n_prompt}, n_memory={c.n_memory}, "
                f"classes={len(c.labels)}/{c.num_classes}, backbone={c.backbone}:{c.fingerprint[:12]}")


def head_width(config: PromptConfig) -> int:
    """The head's input width ``(P + 1) · D``: one block per prompt token, one for the pooled feature."""
    return (config.n_prompt + 1) * config.embed_dim


def source_seed(source: str) -> int:
    """The seed of a source's fresh prompt (``Prompt.init``): the CRC-32 of its name, the same in
    every process and on every machine (unlike ``hash``), and different from source to source."""
    return zlib.crc32(source.encode())


def read_metadata_bytes(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes, with truncation/corruption checks."""
    if len(data) < 8:
        raise PromptFormatError(f"prompt file is truncated ({len(data)} bytes); re-send or re-train it")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise PromptFormatError(
            f"prompt file is truncated: header says {header_len} bytes, {len(data) - 8} present")
    try:
        header = json.loads(data[8:8 + header_len])
        metadata = header["__metadata__"]
    except (ValueError, KeyError, TypeError) as err:
        raise PromptFormatError(f"prompt file header is corrupt or has no metadata ({err})") from err
    if not isinstance(metadata, dict):
        raise PromptFormatError("prompt file metadata is not a mapping")
    return metadata


def _canonical_header(data: bytes) -> bytes:
    """Safetensors bytes with the JSON header's keys sorted (the library orders them at random).

    Tensor offsets are relative to the end of the header, so only the header is rewritten;
    it stays space-padded to a multiple of 8 bytes as the format requires.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + size:]


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a prompt file, without loading its tensors fully."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else 0
        return read_metadata_bytes(head + f.read(size))


def _check_labels(labels: Iterable[int], num_classes: int) -> tuple[int, ...]:
    out = tuple(sorted({int(c) for c in labels}))
    if not out or out[0] < 0 or out[-1] >= num_classes:
        raise PromptShapeError(f"label set {list(out)[:10]} must be non-empty and within [0, {num_classes})")
    return out


def _format_version(metadata: Mapping[str, str]) -> int:
    """The artefact's format version, checked first: it decides which fields exist."""
    if metadata.get("format") != FORMAT_NAME:
        raise PromptFormatError(f"not an {FORMAT_NAME} artefact (format={str(metadata.get('format'))[:40]!r})")
    if "format_version" not in metadata:
        raise PromptFormatError("prompt metadata lacks 'format_version'")
    version = _int_field(metadata, "format_version")
    if version not in READABLE_VERSIONS:
        raise PromptVersionError(
            f"prompt format version {version} is not supported (this build reads versions "
            f"{list(READABLE_VERSIONS)}); upgrade alacarte or re-export the prompt")
    return version


def _parse_metadata(metadata: Mapping[str, str]) -> dict:
    """Typed, range-checked ``PromptConfig`` fields of artefact metadata; raises ``PromptFormatError``."""
    _format_version(metadata)
    missing = [k for k in (*_INT_FIELDS, "backbone", "fingerprint", "labels", "source", "created_at")
               if k not in metadata]
    if missing:
        raise PromptFormatError(f"prompt metadata lacks {missing}")
    ints = {k: _int_field(metadata, k) for k in _INT_FIELDS}
    return ints | {
        "labels": tuple(_labels_field(metadata["labels"])), "created_at": _created_at_field(metadata["created_at"]),
        "backbone": str(metadata["backbone"]), "fingerprint": str(metadata["fingerprint"]),
        "source": str(metadata["source"]),
    }


def _int_field(metadata: Mapping[str, str], key: str) -> int:
    """An integer metadata field in ``[0, MAX_INT_FIELD]``."""
    text = str(metadata[key])
    if not text.isdigit() or len(text) > 16 or int(text) > MAX_INT_FIELD:
        raise PromptFormatError(f"prompt metadata {key!r} must be an integer in [0, {MAX_INT_FIELD}], "
                                f"got {text[:40]!r}")
    return int(text)


def _labels_field(text: str) -> list[int]:
    """The label set: a JSON list of ints, bounded in length (deep nesting is refused, not recursed)."""
    text = str(text)
    if len(text) > MAX_LABELS_CHARS or not text.startswith("[") or "[" in text[1:]:
        raise PromptFormatError(f"prompt label set must be a flat JSON list of ints, got {text[:40]!r}")
    try:
        labels = json.loads(text)
    except ValueError as err:
        raise PromptFormatError(f"prompt label set is not valid JSON ({err})") from err
    if not isinstance(labels, list) or not all(type(c) is int for c in labels):
        raise PromptFormatError(f"prompt label set must be a JSON list of ints, got {text[:40]!r}")
    return labels


def _created_at_field(text: str) -> float:
    """A creation time: a finite Unix time, not before 1970 nor more than a day ahead."""
    try:
        created_at = float(text)
    except (ValueError, TypeError) as err:
        raise PromptFormatError(f"prompt metadata 'created_at' is not a number ({str(text)[:40]!r})") from err
    if not 0.0 <= created_at <= time.time() + MAX_CLOCK_SKEW:  # also rejects NaN
        raise PromptFormatError(f"prompt metadata 'created_at' = {created_at!r} is not a plausible Unix time; "
                                "check the sender's clock")
    return created_at


def _parse_density(arrays: Mapping[str, np.ndarray], config: PromptConfig) -> SourceDensity:
    """The prompt's source density from its ``density.*`` arrays, fitting the prompt's width and labels."""
    try:
        density = SourceDensity.from_arrays(arrays)
    except DensityError as err:
        raise PromptDensityError(f"{err}; re-train the source or send its prompt without a density") from err
    if density.mean.shape[1] != config.embed_dim:
        raise PromptDensityError(f"source density has dimension {density.mean.shape[1]}, the prompt's backbone "
                                 f"{config.embed_dim}")
    outside = set(density.classes.tolist()) - set(config.labels)
    if outside:
        raise PromptDensityError(f"source density covers classes {sorted(outside)[:10]} outside the prompt's "
                                 f"label set")
    return density


def _check_arrays(arrays: Mapping[str, np.ndarray], config: PromptConfig, version: int) -> None:
    if set(arrays) != set(TENSOR_NAMES):
        raise PromptShapeError(f"prompt tensors must be exactly {list(TENSOR_NAMES)}, got {sorted(arrays)}")
    D, C = config.embed_dim, config.num_classes
    width = head_width(config) if version >= 4 else 2 * D if version == 3 else D
    expected = {"tokens": (config.n_prompt, D), "memory": (config.depth, config.n_memory, D),
                "head.weight": (C, width), "head.bias": (C,)}
    for name in TENSOR_NAMES:
        arr = arrays[name]
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
            got = getattr(arr, "dtype", type(arr))
            raise PromptShapeError(f"prompt tensor {name!r} must be a float32 array, got {got}")
        if arr.shape != expected[name]:
            raise PromptShapeError(f"prompt tensor {name!r} has shape {arr.shape}, metadata implies {expected[name]}")
        if not np.isfinite(arr).all():
            raise PromptValueError(f"prompt tensor {name!r} contains NaN or Inf; the training diverged")


def _upgrade_head(arrays: Mapping[str, np.ndarray], config: PromptConfig, version: int) -> dict[str, np.ndarray]:
    """An older head as the version-4 head ``[C, (P + 1) D]`` that gives the same logits.

    Versions 1–3 read the *mean* of the ``P`` token outputs through one block ``W`` ``[C, D]``,
    which equals reading each token's output through ``W / P``; versions 1–2 had no
    pooled-feature block (it is zero).
    """
    arrays = dict(arrays)
    if version < 4:
        D, P = config.embed_dim, config.n_prompt
        weight = arrays["head.weight"]
        pooled = weight[:, D:] if version == 3 else np.zeros_like(weight)
        arrays["head.weight"] = np.concatenate([*[weight[:, :D] / np.float32(P)] * P, pooled], axis=1)
    return arrays


def _check_backbone(config: PromptConfig, model: APTViT) -> None:
    if config.fingerprint != model.fingerprint:
        raise BackboneMismatchError(
            f"prompt of source {config.source!r} was trained on backbone {config.backbone}:{config.fingerprint[:12]}, "
            f"not on this {model.backbone_name}:{model.fingerprint[:12]}; load it with the backbone it was trained on")
    if (config.embed_dim, config.depth) != (model.embed_dim, model.depth):
        raise PromptShapeError(
            f"prompt is for width {config.embed_dim} x depth {config.depth}, backbone is "
            f"{model.embed_dim} x {model.depth}")
