"""Shared, cheap fixtures for the APT core tests (CPU, tiny random ViTs, no network)."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity
from timm.models.vision_transformer import VisionTransformer

from common.config import AppConfig, build_model
from common.model import APTViT, load_backbone
from common.prompt import Prompt

NUM_CLASSES = 10
IMG = 32


def make_vit(seed: int = 0, **overrides) -> VisionTransformer:
    """A small seeded timm ViT (3 blocks, width 64, 17 tokens at 32 px), frozen, eval mode."""
    kwargs = dict(img_size=IMG, patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=0)
    kwargs.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = VisionTransformer(**kwargs)
        # timm zero-inits some tensors (cls token ~1e-6, biases); make everything non-trivial
        with torch.no_grad():
            for p in vit.parameters():
                p.add_(0.02 * torch.randn_like(p))
    return vit.requires_grad_(False).eval()


def random_prompt(model: APTViT, seed: int, **kwargs) -> Prompt:
    """``Prompt.init`` plus a random (non-zero) head so logits differ per class and per prompt."""
    kwargs.setdefault("num_classes", NUM_CLASSES)
    prompt = Prompt.init(model, seed=seed, **kwargs)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        prompt.memory.add_(torch.randn(prompt.memory.shape, generator=gen))
        prompt.head.weight.copy_(torch.randn(prompt.head.weight.shape, generator=gen))
        prompt.head.bias.copy_(torch.randn(prompt.head.bias.shape, generator=gen))
    return prompt


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``addopts``: two workers) each worker and the processes it starts run
    torch on one thread, so two workers share two cores without oversubscribing them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread is faster than two and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def vit() -> VisionTransformer:
    return make_vit(0)


@pytest.fixture(scope="session")
def model(vit) -> APTViT:
    return APTViT(vit)


@pytest.fixture(scope="session")
def model64(vit) -> APTViT:
    """A float64 copy of ``model`` (for exact comparisons to ~1e-10)."""
    return APTViT(copy.deepcopy(vit).double())


@pytest.fixture(scope="session")
def fancy_model() -> APTViT:
    """A ViT using every supported block option: qk-norm, layer scale, scale-norm, no class token."""
    vit = make_vit(3, qk_norm=True, init_values=0.5, scale_attn_norm=True, class_token=False,
                   global_pool="avg", reg_tokens=2)
    return APTViT(vit)


@pytest.fixture(scope="session")
def vit_tiny() -> VisionTransformer:
    """timm's ``vit_tiny_patch16_224`` at 32 px, random init, through ``load_backbone``."""
    return load_backbone("vit_tiny_patch16_224", pretrained=False, img_size=IMG, device="cpu")


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    return torch.randn(5, 3, IMG, IMG, generator=torch.Generator().manual_seed(7))


@pytest.fixture
def prompts(model) -> list[Prompt]:
    """Three prompts of the same shape, fresh for every test."""
    return [random_prompt(model, seed=s) for s in range(3)]


@pytest.fixture(scope="module")
def app_config(run_config: dict) -> AppConfig:
    """The module's ``run_config`` fixture parsed as the Flower apps parse it."""
    return AppConfig.from_run_config(run_config)


@pytest.fixture(scope="module")
def app_model(app_config: AppConfig) -> APTViT:
    """The backbone ``app_config`` names, built on CPU as the apps build it."""
    return build_model(app_config, device="cpu")


@dataclass
class FlwrLog:
    """What the ``flwr`` logger printed during a test."""

    records: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(self.records)


@pytest.fixture
def flwr_log() -> Iterator[FlwrLog]:
    captured = FlwrLog()
    handler = logging.Handler()
    handler.emit = lambda record: captured.records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield captured
    logger.removeHandler(handler)


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower's Message needs the run/node identity a ServerApp or SuperNode process normally has
    (modules that build Messages use it: ``pytestmark = pytest.mark.usefixtures("task_identity")``)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
