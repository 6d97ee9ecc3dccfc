"""APTViT: à-la-carte prompt tuning over a frozen timm Vision Transformer.

À-la-carte Prompt Tuning (Bowman et al., CVPR 2023, arXiv 2302.07994) trains one *prompt*
per data source on top of a shared, frozen ViT. A prompt is ``n_prompt`` input tokens,
``n_memory`` memory tokens per layer and its own linear head (see ``common.prompt``).

Structured attention, as implemented here:

* backbone tokens attend only to backbone tokens, so their activations are exactly
  timm's ``forward_features`` and are computed once, under ``torch.no_grad()``, however
  many prompts run;
* the tokens of prompt ``i`` attend to the backbone tokens of the same layer, to their own
  tokens and to their own memory tokens, never to another prompt's.

Each prompt's head reads the outputs of its tokens (each after the final norm, concatenated)
next to the backbone's own pooled feature, ``[out_1 ; … ; out_P ; pooled] -> logits``
(``common.prompt``).

All ``k`` prompts run in one batched pass per layer: their queries are stacked and scored
against the *shared* backbone keys/values (no k-fold copy) and against their own
keys/values; one softmax over the concatenated scores gives exactly the masked attention
of the paper without ever materialising the cross-prompt blocks.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from common.compose import Weighting, compose_probs, composition_weights, default_weighting

if TYPE_CHECKING:
    from common.prompt import Prompt

__all__ = [
    "APTViT",
    "BackboneUnavailableError",
    "UnsupportedBackboneError",
    "backbone_fingerprint",
    "default_device",
    "load_backbone",
]

_BACKBONES: dict[tuple, VisionTransformer] = {}
_BACKBONES_LOCK = threading.Lock()
_RANDOM_INIT_SEED = 0


class BackboneUnavailableError(RuntimeError):
    """The backbone weights could not be found locally nor downloaded."""


class UnsupportedBackboneError(TypeError):
    """The model is not a timm VisionTransformer made of standard ``Block``s."""


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_backbone(
    name: str,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    img_size: int | None = None,
    device: str | torch.device | None = None,
) -> VisionTransformer:
    """Return the frozen, eval-mode timm ViT ``name``, one shared copy per process.

    Args:
        name: a timm ViT name, e.g. ``vit_tiny_patch16_224`` or ``vit_small_patch14_dinov2``.
        checkpoint: a local weights file (``.safetensors``, ``.pth``/``.bin`` state dict, or the
            ``.npz`` of the original ViT release). Position embeddings are resampled to
            ``img_size`` (bicubic, no antialiasing, as DINOv2 and the original ViT do).
        pretrained: with no ``checkpoint``, download timm's pretrained weights from the hub;
            ``False`` gives a seeded random initialisation (for tests).
        img_size: input resolution; the model's default when ``None``.
        device: where the module lives; ``cuda`` when available by default.

    Calls with the same (name, checkpoint, pretrained, img_size, device) return the same
    module, so many simulated clients in one process share one backbone.
    """
    device = torch.device(device) if device is not None else default_device()
    ckpt = str(Path(checkpoint).expanduser().resolve()) if checkpoint else None
    key = (name, ckpt, bool(pretrained) and ckpt is None, img_size, str(device))
    with _BACKBONES_LOCK:
        if key not in _BACKBONES:
            model = _create_backbone(name, ckpt, pretrained, img_size)
            model.requires_grad_(False).eval().to(device)
            _BACKBONES[key] = model
        return _BACKBONES[key]


def _create_backbone(name: str, checkpoint: str | None, pretrained: bool, img_size: int | None) -> VisionTransformer:
    kwargs = {"num_classes": 0} | ({"img_size": img_size} if img_size else {})
    if checkpoint:
        model = timm.create_model(name, pretrained=False, **kwargs)
        _load_checkpoint(model, checkpoint)
    elif pretrained:
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:  # hub errors come as many types (OSError, HTTP, hub-specific)
            raise BackboneUnavailableError(
                f"could not download pretrained weights for {name!r} ({type(err).__name__}: {err}). "
                "Offline, pass a local file with checkpoint=PATH (config key `checkpoint`), or run "
                "`alacarte setup` to prepare the default backbone."
            ) from err
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_INIT_SEED)
            model = timm.create_model(name, pretrained=False, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise UnsupportedBackboneError(f"{name!r} is a {type(model).__name__}, not a timm VisionTransformer")
    return model


def _load_checkpoint(model: VisionTransformer, path: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"backbone checkpoint {path} does not exist; pass an existing weights file")
    if path.endswith(".npz"):
        model.load_pretrained(path)
        return
    state = timm.models.load_state_dict(path, device="cpu")
    state = checkpoint_filter_fn(state, model, antialias=False)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit {type(model).__name__}: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}; check that the backbone name matches the file"
        )


def backbone_fingerprint(backbone: nn.Module) -> str:
    """SHA-256 of the backbone's weights (names, shapes and float32 bytes); cached on the module.

    The cache is keyed by the identity, storage, dtype and in-place version counter of every
    tensor, so it is recomputed whenever a weight is modified, replaced or copied.
    """
    state = sorted(backbone.state_dict(keep_vars=True).items())
    version = tuple((name, id(t), t.data_ptr(), t.dtype, _version_counter(t)) for name, t in state)
    cached = getattr(backbone, "_alacarte_fingerprint", None)
    if cached is None or cached[0] != version:
        digest = hashlib.sha256()
        for name, tensor in state:
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        cached = (version, digest.hexdigest())
        backbone._alacarte_fingerprint = cached
    return cached[1]


def _version_counter(tensor: Tensor) -> int | None:
    """The in-place modification counter of ``tensor`` (inference-mode tensors have none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


class APTViT(nn.Module):
    """A frozen timm ViT that runs any number of prompts with structured attention.

    The backbone's own modules are reused (no weight copies); ``APTViT`` has no
    parameters of its own. Prompts are passed to every call, so one model serves any
    selection of a prompt pool.
    """

    def __init__(self, backbone: VisionTransformer) -> None:
        super().__init__()
        _check_supported(backbone)
        self.backbone = backbone
        self.backbone.requires_grad_(False).eval()
        attn = backbone.blocks[0].attn
        self.embed_dim: int = backbone.embed_dim
        self.depth: int = len(backbone.blocks)
        self.num_heads: int = attn.num_heads
        self.head_dim: int = attn.head_dim

    @property
    def fingerprint(self) -> str:
        """The backbone fingerprint prompts are bound to."""
        return backbone_fingerprint(self.backbone)

    @property
    def backbone_name(self) -> str:
        """timm architecture name of the backbone (e.g. ``vit_small_patch14_dinov2``)."""
        cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        return cfg.get("architecture", type(self.backbone).__name__)

    @property
    def device(self) -> torch.device:
        """Device of the backbone's weights."""
        return next(self.backbone.parameters()).device

    def train(self, mode: bool = True) -> APTViT:
        """The backbone stays in eval mode whatever ``mode`` is (it is frozen)."""
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def backbone_forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Run timm's ``forward_features`` once, capturing every layer's keys and values.

        Args:
            images: ``[B, 3, H, W]`` normalised images.

        Returns:
            ``features [B, N, D]`` exactly as ``forward_features`` returns them, and
            ``kv [L, 2, B, heads, N, head_dim]``: each layer's backbone keys and values.
        """
        captured: list[Tensor] = []  # the one [L, 2, B, H, N, hd] buffer every layer writes into

        def store(layer: int, k: Tensor, v: Tensor) -> None:
            if not captured:
                captured.append(k.new_empty(self.depth, 2, *k.shape))
            captured[0][layer, 0].copy_(k)
            captured[0][layer, 1].copy_(v)

        features = self._run_backbone(images, store)
        return features, captured[0]

    def backbone_kv(self, images: Tensor) -> Tensor:
        """Per-layer backbone keys/values ``[L, 2, B, heads, N, head_dim]`` (no grad)."""
        return self.backbone_forward(images)[1]

    def pooled(self, features: Tensor) -> Tensor:
        """The backbone's pooled (pre-logits) features ``[B, D]`` of ``forward_features`` output ``[B, N, D]``."""
        return self.backbone.forward_head(features, pre_logits=True)

    def forward(self, images: Tensor, prompts: Sequence[Prompt]) -> Tensor:
        """Per-prompt logits ``[k, B, C]`` for ``k`` prompts over one shared backbone pass.

        Logits of classes outside a prompt's label set are ``-inf`` (its softmax is 0 there).
        Same result as ``forward_kv(kv, pooled(features), prompts)`` with ``features, kv =
        backbone_forward(images)``, but each layer's prompt
        tokens run as soon as that layer's backbone keys/values exist, so the keys/values of
        all layers are never gathered into one tensor (saves a large copy and allocation).
        """
        return self.forward_with_pooled(images, prompts)[0]

    def forward_with_pooled(self, images: Tensor, prompts: Sequence[Prompt]) -> tuple[Tensor, Tensor]:
        """``forward``'s logits ``[k, B, C]`` and the backbone's pooled features ``[B, D]`` (no grad)."""
        groups = self._groups(prompts)
        grad = torch.is_grad_enabled()  # the backbone runs without grad, the prompts may need it
        states = [self._group_tokens(members, images.shape[0]) for members in groups]

        def run_layer(layer: int, k: Tensor, v: Tensor) -> None:
            with torch.set_grad_enabled(grad):
                for g, (x, memory) in enumerate(states):
                    states[g] = (_prompt_block(self.backbone.blocks[layer], x, memory[:, layer], (k, v)), memory)

        with torch.no_grad():
            pooled = self.pooled(self._run_backbone(images, run_layer))
        logits = [self.head_logits(self._group_features(x), pooled, [p for _, p in members])
                  for (x, _), members in zip(states, groups)]
        return self._assemble(logits, groups), pooled

    def forward_kv(self, kv: Tensor, pooled: Tensor, prompts: Sequence[Prompt]) -> Tensor:
        """Like ``forward`` but from precomputed backbone keys/values ``[L, 2, B, heads, N, hd]``
        and pooled features ``[B, D]`` (e.g. a cache's ``fetch``)."""
        groups = self._groups(prompts)
        pooled = pooled.to(self.device)
        logits = [self.head_logits(features, pooled, [p for _, p in members])
                  for features, members in zip(self._features_kv(kv, groups), groups)]
        return self._assemble(logits, groups)

    def features_kv(self, kv: Tensor, prompts: Sequence[Prompt]) -> list[Tensor]:
        """Each prompt's output features ``[B, P·D]`` (its tokens' outputs, concatenated: what its
        head reads besides the pooled feature) from backbone keys/values, in prompt order."""
        groups = self._groups(prompts)
        by_prompt: dict[int, Tensor] = {}
        for features, members in zip(self._features_kv(kv, groups), groups):
            by_prompt |= {i: features[g] for g, (i, _) in enumerate(members)}
        return [by_prompt[i] for i in range(len(prompts))]

    def _features_kv(self, kv: Tensor, groups: list[list]) -> list[Tensor]:
        """Each group's output features ``[G, B, P·D]`` from backbone keys/values."""
        kv = kv.to(device=self.device, dtype=self.backbone.patch_embed.proj.weight.dtype)
        return [self._forward_group(kv, members) for members in groups]

    @staticmethod
    def head_logits(features: Tensor, pooled: Tensor, prompts: Sequence[Prompt]) -> Tensor:
        """The heads of ``k`` prompts of one shape on ``[their features [k, B, P·D] ; pooled [B, D]]``,
        label-masked: logits ``[k, B, C]``."""
        F = features.shape[-1]
        weight = torch.stack([p.head.weight for p in prompts])  # [k, C, P·D + D]
        bias = torch.stack([p.head.bias for p in prompts])  # [k, C]
        logits = (torch.einsum("kbf,kcf->kbc", features, weight[..., :F])  # [k, B, C]
                  + torch.einsum("bd,kcd->kbc", pooled.to(features.dtype), weight[..., F:]) + bias[:, None])
        mask = torch.stack([p.label_mask.to(logits.device) for p in prompts])  # [k, C]
        return logits.masked_fill(~mask[:, None], float("-inf"))

    def _run_backbone(self, images: Tensor, on_layer) -> Tensor:
        """``forward_features(images)``, calling ``on_layer(layer, k, v)`` with each layer's keys/values.

        ``k``/``v`` are ``[B, H, N, hd]`` views of the layer's qkv projection (keys after
        ``k_norm``), valid during the call. Hooks ignore passes run by other threads, so
        concurrent calls on the shared backbone do not see each other's layers.
        """
        owner, busy = threading.get_ident(), [False]
        hooks = [blk.attn.qkv.register_forward_hook(_capture_kv(blk, layer, on_layer, owner, busy))
                 for layer, blk in enumerate(self.backbone.blocks)]
        try:
            return self.backbone.forward_features(images)
        finally:
            for hook in hooks:
                hook.remove()

    @staticmethod
    def _groups(prompts: Sequence[Prompt]) -> list[list[tuple[int, Prompt]]]:
        """Prompts grouped by (n_prompt, n_memory): ``[[(index, prompt), ...], ...]``."""
        if not prompts:
            raise ValueError("forward needs at least one prompt")
        num_classes = {p.config.num_classes for p in prompts}
        if len(num_classes) != 1:
            raise ValueError(f"prompts disagree on the label space size: {sorted(num_classes)}")
        groups: dict[tuple[int, int], list] = {}
        for i, p in enumerate(prompts):
            groups.setdefault((p.config.n_prompt, p.config.n_memory), []).append((i, p))
        return list(groups.values())

    @staticmethod
    def _assemble(outputs: list[Tensor], groups: list[list]) -> Tensor:
        """Per-group logits ``[G, B, C]`` back into prompt order ``[k, B, C]``."""
        if len(outputs) == 1:
            return outputs[0]
        k = sum(len(members) for members in groups)
        out = outputs[0].new_empty(k, *outputs[0].shape[1:])
        for logits, members in zip(outputs, groups):
            out[[i for i, _ in members]] = logits
        return out

    def _forward_group(self, kv: Tensor, members: list) -> Tensor:
        """All prompts share (n_prompt, n_memory): stack them and run every layer once; ``[G, B, P·D]``."""
        x, memory = self._group_tokens(members, kv.shape[2])
        for layer, blk in enumerate(self.backbone.blocks):
            x = _prompt_block(blk, x, memory[:, layer], kv[layer])
        return self._group_features(x)

    @staticmethod
    def _group_tokens(members: list, batch: int) -> tuple[Tensor, Tensor]:
        """Input tokens ``[G, B, P, D]`` and memory ``[G, L, M, D]`` of a group."""
        prompts = [p for _, p in members]
        tokens = torch.stack([p.tokens for p in prompts])  # [G, P, D]
        return tokens[:, None].expand(-1, batch, -1, -1), torch.stack([p.memory for p in prompts])

    def _group_features(self, x: Tensor) -> Tensor:
        """Final norm of every prompt token, concatenated: ``[G, B, P, D] -> [G, B, P·D]``."""
        return self.backbone.norm(x).flatten(2)

    def compose(
        self,
        images: Tensor,
        prompts: Sequence[Prompt],
        weighting: Weighting | str | Tensor | None = None,
    ) -> Tensor:
        """The à-la-carte model of ``prompts``: probabilities ``[B, C]``.

        The composition is the weighted mean of the prompts' softmax probabilities (the
        paper's ensemble). Each prompt's softmax is taken over the classes it was trained on
        (its label set) and is zero elsewhere, so a prompt contributes only over its own
        classes; with disjoint label sets (class-incremental) the result is the
        concatenation of the prompts' distributions, each scaled by its weight. Rows sum to 1.

        Args:
            weighting: a :class:`~common.compose.Weighting` (or its name), a tensor ``[k]`` or
                ``[k, B]`` of non-negative per-prompt weights, or ``None``: density weighting
                when every prompt carries its source's density, else uniform.
        """
        logits, pooled = self.forward_with_pooled(images, prompts)
        if weighting is None:
            weighting = default_weighting(prompts)
        if not isinstance(weighting, Tensor):
            weighting = composition_weights(weighting, logits, prompts, pooled)
        return compose_probs(logits, weighting)


def _check_supported(backbone: nn.Module) -> None:
    if not isinstance(backbone, VisionTransformer):
        raise UnsupportedBackboneError(f"APTViT needs a timm VisionTransformer, got {type(backbone).__name__}")
    for i, blk in enumerate(backbone.blocks):
        if type(blk) is not Block or getattr(blk.attn, "gate", None) is not None:
            raise UnsupportedBackboneError(
                f"block {i} is a {type(blk).__name__}; APTViT supports timm's standard pre-norm Block "
                "with ungated attention (vit_*, deit_*, DINOv2 ViTs)")


def _capture_kv(blk: Block, layer: int, on_layer, owner: int, busy: list[bool]):
    """Forward hook on ``blk.attn.qkv``: ``on_layer(layer, k, v)`` with the keys/values ``[B, H, N, hd]``.

    Only the backbone pass of thread ``owner`` is reported: not passes of other threads (the
    backbone is shared), nor the prompt path's own ``qkv`` calls made from inside ``on_layer``.
    """
    attn = blk.attn

    def hook(_module: nn.Module, _inputs: tuple[Tensor], qkv: Tensor) -> None:
        if busy[0] or threading.get_ident() != owner:
            return
        B, N, _ = qkv.shape
        _, k, v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        busy[0] = True
        try:
            on_layer(layer, attn.k_norm(k), v)
        finally:
            busy[0] = False

    return hook


def _prompt_block(blk: Block, x: Tensor, memory: Tensor, kv: Tensor) -> Tensor:
    """One transformer block for the prompt tokens of ``G`` prompts.

    Args:
        x: ``[G, B, P, D]`` prompt tokens entering the block.
        memory: ``[G, M, D]`` this layer's memory tokens (shared over the batch).
        kv: ``[2, B, H, N, hd]`` the layer's backbone keys/values (shared by all prompts), or a
            pair ``(k, v)`` of ``[B, H, N, hd]``.

    Returns:
        ``[G, B, P, D]`` prompt tokens leaving the block.
    """
    attn = blk.attn
    G, B, P, D = x.shape
    M = memory.shape[1]
    H, hd = attn.num_heads, attn.head_dim
    N = kv[0].shape[2]

    qkv = attn.qkv(blk.norm1(x)).reshape(G, B, P, 3, H, hd).permute(3, 0, 1, 4, 2, 5)  # [3, G, B, H, P, hd]
    q, k_own, v_own = qkv.unbind(0)
    q, k_own = attn.q_norm(q) * attn.scale, attn.k_norm(k_own)
    mem = attn.qkv(blk.norm1(memory)).reshape(G, M, 3, H, hd).permute(2, 0, 3, 1, 4)  # [3, G, H, M, hd]
    k_mem, v_mem = attn.k_norm(mem[1]), mem[2]
    k_bb, v_bb = kv[0].contiguous(), kv[1]  # [B, H, N, hd]; matmul with a strided k (fused forward) is ~3x slower

    q_flat = q.permute(1, 2, 0, 3, 4).reshape(B, H, G * P, hd)  # all prompts' queries, one matmul
    s_bb = (q_flat @ k_bb.transpose(-2, -1)).reshape(B, H, G, P, N).permute(2, 0, 1, 3, 4)  # [G, B, H, P, N]
    s_own = q @ k_own.transpose(-2, -1)  # [G, B, H, P, P]
    s_mem = torch.einsum("gbhpd,ghmd->gbhpm", q, k_mem)  # [G, B, H, P, M]
    a_bb, a_own, a_mem = torch.cat([s_bb, s_own, s_mem], dim=-1).softmax(dim=-1).split([N, P, M], dim=-1)

    o = (a_bb.permute(1, 2, 0, 3, 4).reshape(B, H, G * P, N) @ v_bb).reshape(B, H, G, P, hd).permute(2, 0, 1, 3, 4)
    o = o + a_own @ v_own + torch.einsum("gbhpm,ghmd->gbhpd", a_mem, v_mem)  # [G, B, H, P, hd]
    o = attn.proj(attn.norm(o.transpose(2, 3).reshape(G, B, P, H * hd)))  # [G, B, P, D]
    x = x + blk.ls1(o)
    return x + blk.ls2(blk.mlp(blk.norm2(x)))
