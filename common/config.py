"""The Flower app's run configuration, and the shared objects it names.

``AppConfig`` is ``[tool.flwr.app.config]`` of ``pyproject.toml`` (``context.run_config``)
as a typed, validated dataclass; client and server build the same backbone, transform
and data from it. :func:`coerce_value` is its conversion of a TOML or command-line value to a
field's type, shared with the experiment scripts' ``--set KEY=VALUE``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Mapping, TypeVar

from common.data import Partitioner
from common.model import APTViT, load_backbone
from common.prompt import DEFAULT_N_MEMORY, DEFAULT_N_PROMPT
from common.train import TrainConfig

__all__ = ["AppConfig", "ConfigError", "Mode", "build_model", "coerce_value"]

DEFAULT_BACKBONE = "vit_small_patch14_dinov2"
T = TypeVar("T")
_BOOLEANS = {"true": True, "false": False, "1": True, "0": False}


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


class Mode(StrEnum):
    """What the federation trains: a pool of prompts, or the FedAvg baseline's one prompt."""

    ALACARTE = "alacarte"
    FEDAVG = "fedavg"


def _key(default: Any, help_text: str) -> Any:
    """A run-config field: its default and the help text ``AppConfig.help`` shows."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class AppConfig:
    """Run configuration shared by the ServerApp and the ClientApps."""

    num_server_rounds: int = _key(1, "rounds; each round every source continues from its latest prompt")
    local_epochs: int = _key(5, "prompt-tuning epochs per round (see min-steps)")
    min_steps: int = _key(50, "at least this many optimiser steps per round, however small the shard")
    probe_init: bool = _key(True, "start a fresh prompt as a linear probe on what its head reads, "
                                  "[prompt ; pooled] (LP-FT)")
    selection_level: float = _key(0.05, "keep a tuned epoch only if a paired test says its validation loss beats "
                                         "the untuned prompt's at this family-wise level over the epochs tested")
    head_lr_scale: float = _key(1.0, "learning rate of a head that starts fitted (probe-init, later rounds), "
                                      "as a fraction of learning-rate")
    share_density: bool = _key(True, "send the source's feature density with its prompt (density weighting)")
    mode: Mode = _key(Mode.ALACARTE, f"one of {', '.join(Mode)}: a pool of prompts, or one FedAvg-averaged prompt")
    fedavg_patience: int = _key(0, "fedavg: stop once this many rounds in a row bring no lower validation loss "
                                   "than the best round's (0 = run every num-server-rounds round)")
    backbone: str = _key(DEFAULT_BACKBONE, "timm ViT name of the frozen backbone")
    checkpoint: str = _key("", "backbone weights file (.safetensors/.pth/.bin/.npz); empty = the prepared one")
    pretrained: bool = _key(True, "pretrained weights (hub or checkpoint); false = seeded random init (tests)")
    img_size: int = _key(112, "input resolution in pixels")
    dataset: str = _key("fashion_mnist", "dataset name (see common.data)")
    data_dir: str = _key("", "dataset folder; empty = the prepared one (deployment: the node's own data-dir)")
    partitioner: Partitioner = _key(Partitioner.DIRICHLET, f"simulation partitioner, one of {', '.join(Partitioner)}")
    dirichlet_alpha: float = _key(1.0, "Dirichlet concentration of the label skew")
    partition_seed: int = _key(0, "seed of partitions, caps, validation splits and shuffling")
    examples_per_source: int = _key(400, "cap on a source's images (0 = all)")
    val_fraction: float = _key(0.1, "share of a source's images kept as its validation split "
                                    "(selection; FedAvg: of the kept round)")
    test_examples: int = _key(1000, "the server's own test subset (0 = none)")
    batch_size: int = _key(32, "batch size of training and evaluation")
    learning_rate: float = _key(1e-3, "AdamW learning rate (cosine schedule) of tokens, memory and head")
    label_smoothing: float = _key(0.0, "label smoothing of the training loss")
    n_prompt: int = _key(DEFAULT_N_PROMPT, "input prompt tokens (the head reads each one's output)")
    n_memory: int = _key(DEFAULT_N_MEMORY, "memory tokens per layer")
    kv_cache: bool = _key(True, "cache the backbone's keys/values after the first epoch")
    pool_dir: str = _key("", "the durable prompt pool; empty = $ALACARTE_POOL, else $ALACARTE_HOME/pool")
    reply_timeout: float = _key(3600.0, "seconds a node has to answer a round")
    max_prompt_bytes: int = _key(8 << 20, "largest prompt upload accepted, in bytes")
    federated_eval: bool = _key(True, "evaluate the composed pool on every node's validation split at the end")
    progress: bool = _key(False, "progress bars on the clients")
    node_sources: str = _key("", "JSON file {node id: source} binding nodes to sources (deploy/keys.sh --register)")

    def __post_init__(self) -> None:
        """Coerce every field to its default's type (see :func:`coerce_value`), then validate."""
        for f in dataclasses.fields(self):
            value = coerce_value(f"run-config {_kebab(f.name)}", getattr(self, f.name), type(f.default))
            object.__setattr__(self, f.name, value)
        self.validate()

    @classmethod
    def help(cls) -> dict[str, str]:
        """Each run-config key (kebab-case) with its meaning and default."""
        return {_kebab(f.name): f"{f.metadata['help']} (default {_plain(f.default)!r})"
                for f in dataclasses.fields(cls)}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppConfig:
        """Parse ``context.run_config`` (kebab-case keys); unknown keys are an error."""
        names = {_kebab(f.name): f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(run_config) - set(names))
        if unknown:
            raise ConfigError(f"unknown run-config key {unknown[0]!r}; known keys: {', '.join(sorted(names))}")
        return cls(**{names[key]: value for key, value in run_config.items()})

    def validate(self) -> None:
        """Raise ``ConfigError`` on out-of-range values."""
        lowest = dict.fromkeys(("num_server_rounds", "local_epochs", "img_size", "batch_size", "n_prompt"), 1) | \
            dict.fromkeys(("n_memory", "examples_per_source", "test_examples", "min_steps", "fedavg_patience"), 0)
        for name, least in lowest.items():
            if getattr(self, name) < least:
                raise ConfigError(f"run-config {_kebab(name)} must be >= {least}, got {getattr(self, name)}")
        if not 0.0 < self.selection_level < 1.0:
            raise ConfigError(f"selection-level must be in (0, 1), got {self.selection_level}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val-fraction must be in [0, 1), got {self.val_fraction}")
        if not all(value > 0 for value in (self.learning_rate, self.head_lr_scale, self.reply_timeout)):
            raise ConfigError("learning-rate, head-lr-scale and reply-timeout must be > 0")

    def train_config(self) -> TrainConfig:
        """The client's training recipe (``common.train``) from the run config."""
        return TrainConfig(epochs=self.local_epochs, min_steps=self.min_steps, lr=self.learning_rate,
                           label_smoothing=self.label_smoothing, probe_init=self.probe_init,
                           selection_level=self.selection_level, head_lr_scale=self.head_lr_scale,
                           progress=self.progress)

    def checkpoint_path(self) -> str | None:
        """The backbone weights file: ``checkpoint``, else the one ``alacarte setup`` prepared."""
        if self.checkpoint:
            return str(Path(self.checkpoint).expanduser())
        if self.backbone == DEFAULT_BACKBONE and self.pretrained:
            from common.assets import default_checkpoint

            prepared = default_checkpoint()
            return str(prepared) if prepared else None
        return None

    def data_path(self) -> str | None:
        """``data-dir``, or ``None`` to let the data layer find the prepared default."""
        return str(Path(self.data_dir).expanduser()) if self.data_dir else None

    def pool_path(self) -> Path:
        """``pool-dir``, else ``$ALACARTE_POOL``, else ``$ALACARTE_HOME/pool`` (as ``alacarte serve``)."""
        if self.pool_dir:
            return Path(self.pool_dir).expanduser()
        from server.pool import default_pool_dir

        return default_pool_dir()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``alacarte config`` takes no arguments."""


def run(_args: argparse.Namespace) -> int:
    """Print every run-config key with its meaning and default."""
    for key, text in AppConfig.help().items():
        print(f"{key:<22} {text}")
    return 0


def build_model(config: AppConfig, device: str | None = None) -> APTViT:
    """The process-wide frozen backbone named by ``config``, wrapped in ``APTViT``."""
    backbone = load_backbone(config.backbone, checkpoint=config.checkpoint_path(), pretrained=config.pretrained,
                             img_size=config.img_size, device=device)
    return APTViT(backbone)


def add_backbone_arguments(group: argparse._ActionsContainer) -> None:
    """``--backbone``, ``--checkpoint``, ``--img-size``, ``--pretrained``/``--random-init`` and
    ``--device`` of a command that loads the frozen ViT as the Flower app does (its defaults)."""
    defaults = AppConfig()
    group.add_argument("--backbone", default=defaults.backbone, help="timm ViT name (default: %(default)s)")
    group.add_argument("--checkpoint", default="",
                       help="backbone weights file (default: the one `alacarte setup` prepared)")
    group.add_argument("--img-size", type=int, default=defaults.img_size,
                       help="input resolution (default: %(default)s)")
    init = group.add_mutually_exclusive_group()
    init.add_argument("--pretrained", dest="pretrained", action="store_true", default=True,
                      help="pretrained backbone weights (default)")
    init.add_argument("--random-init", dest="pretrained", action="store_false",
                      help="seeded random backbone (tests; prompts must have been made on it)")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def backbone_config(args: argparse.Namespace, **fields: Any) -> AppConfig:
    """The ``AppConfig`` of :func:`add_backbone_arguments`' options, with other ``fields`` set."""
    return AppConfig(backbone=args.backbone, checkpoint=args.checkpoint, pretrained=args.pretrained,
                     img_size=args.img_size, **fields)


def coerce_value(name: str, value: Any, kind: type[T]) -> T:
    """``value`` (a TOML value or a command-line string) converted to ``kind``.

    ``kind`` is ``bool`` (``true``/``false``/``1``/``0``, any case), ``int`` (a float only if
    it is whole), ``float``, ``str`` or an ``Enum`` (one of its values). A boolean is never
    taken for a number, a string or an enum value.

    Raises:
        ConfigError: ``"<name> must be <what>, got <value>"``, with an enum's allowed values.
    """
    try:
        return _convert(value, kind)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name} must be {_expected(kind)}, got {value!r}") from err


def _convert(value: Any, kind: type[T]) -> T:
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in _BOOLEANS:
            return _BOOLEANS[value.strip().lower()]
        if isinstance(value, (bool, int)) and value in (0, 1):
            return bool(value)
        raise ValueError(value)
    if isinstance(value, bool):
        raise TypeError(f"a boolean is not a {kind.__name__}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return kind(value)


def _expected(kind: type) -> str:
    if issubclass(kind, Enum):
        return "one of " + ", ".join(repr(_plain(member)) for member in kind)
    if kind is bool:
        return "a bool (true, false, 1 or 0)"
    return {int: "an integer", float: "a number", str: "a string"}.get(kind, f"a {kind.__name__}")


def _plain(value: Any) -> Any:
    """An enum member as its value (for help texts and messages), anything else unchanged."""
    return value.value if isinstance(value, Enum) else value


def _kebab(name: str) -> str:
    return name.replace("_", "-")
