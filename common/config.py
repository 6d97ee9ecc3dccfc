"""The Flower app's run configuration, and the shared objects it names.

``AppConfig`` is ``[tool.flwr.app.config]`` of ``pyproject.toml`` (``context.run_config``)
as a typed, validated dataclass; client and server build the same backbone, transform
and data from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from common.model import APTViT, load_backbone
from common.train import TrainConfig

__all__ = ["AppConfig", "ConfigError", "build_model"]

DEFAULT_BACKBONE = "vit_small_patch14_dinov2"
MODES = ("alacarte", "fedavg")


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class AppConfig:
    """Run configuration shared by the ServerApp and the ClientApps."""

    num_server_rounds: int = 1
    local_epochs: int = 10
    min_steps: int = 100
    probe_init: bool = True
    share_density: bool = True
    mode: str = "alacarte"
    backbone: str = DEFAULT_BACKBONE
    checkpoint: str = ""
    pretrained: bool = True
    img_size: int = 112
    dataset: str = "fashion_mnist"
    data_dir: str = ""
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 1.0
    partition_seed: int = 0
    examples_per_source: int = 400
    val_fraction: float = 0.1
    test_examples: int = 1000
    batch_size: int = 32
    learning_rate: float = 3e-3
    label_smoothing: float = 0.0
    n_prompt: int = 1
    n_memory: int = 4
    kv_cache: bool = True
    pool_dir: str = ""
    reply_timeout: float = 3600.0
    max_prompt_bytes: int = 8 << 20
    federated_eval: bool = True
    progress: bool = False
    node_sources: str = ""  # JSON file {node id: source} binding nodes to sources (deploy/keys.sh --register)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppConfig:
        """Parse ``context.run_config`` (kebab-case keys); unknown keys are an error."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                known = ", ".join(sorted(f.replace("_", "-") for f in fields))
                raise ConfigError(f"unknown run-config key {key!r}; known keys: {known}")
            values[name] = _coerce(key, value, type(getattr(cls, name)))
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ``ConfigError`` on out-of-range values."""
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("num_server_rounds", "local_epochs", "img_size", "batch_size", "n_prompt"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if min(self.n_memory, self.examples_per_source, self.test_examples, self.min_steps) < 0:
            raise ConfigError("n-memory, examples-per-source, test-examples and min-steps must be >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.learning_rate <= 0 or self.reply_timeout <= 0:
            raise ConfigError("learning-rate and reply-timeout must be > 0")

    def train_config(self) -> TrainConfig:
        """The client's training recipe (``common.train``) from the run config."""
        return TrainConfig(epochs=self.local_epochs, min_steps=self.min_steps, lr=self.learning_rate,
                           label_smoothing=self.label_smoothing, probe_init=self.probe_init,
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


def build_model(config: AppConfig, device: str | None = None) -> APTViT:
    """The process-wide frozen backbone named by ``config``, wrapped in ``APTViT``."""
    backbone = load_backbone(config.backbone, checkpoint=config.checkpoint_path(), pretrained=config.pretrained,
                             img_size=config.img_size, device=device)
    return APTViT(backbone)


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Convert a TOML / ``--run-config`` value to the field's type, or raise ConfigError."""
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"run-config {key!r} must be a {kind.__name__}, got {value!r}") from err
