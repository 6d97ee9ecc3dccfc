"""APTViT: backbone capture, structured attention, composition, and backbone loading."""

from __future__ import annotations

import copy
import itertools

import pytest
import safetensors.torch
import timm
import torch
from conftest import IMG, NUM_CLASSES, make_vit, random_prompt
from timm.layers import resample_abs_pos_embed
from torch import nn

import common.model as model_mod
from common.compose import Weighting, compose_probs, composition_weights
from common.model import (
    APTViT,
    BackboneUnavailableError,
    UnsupportedBackboneError,
    backbone_fingerprint,
    load_backbone,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# --------------------------------------------------------------------------------------
# an independent reference: one long sequence with an explicit structured-attention mask
# --------------------------------------------------------------------------------------


def reference_logits(model: APTViT, images: torch.Tensor, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's masked attention, written naively over the concatenated sequence.

    Sequence per layer: ``[backbone N | prompt_0 P_0 | ... | prompt_k P_k | mem_0 M_0 | ... ]``;
    the memory tokens are keys/values only. Backbone queries see backbone keys only; a
    query of prompt ``i`` sees backbone keys and prompt ``i``'s tokens and memory.
    Returns (logits ``[k, B, C]``, final normalised backbone tokens).
    """
    bb = model.backbone
    x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(images))))
    B, N, _ = x.shape
    seq = torch.cat([x] + [p.tokens.expand(B, -1, -1) for p in prompts], dim=1)
    owner_q = [-1] * N + [i for i, p in enumerate(prompts) for _ in range(p.config.n_prompt)]
    owner_k = owner_q + [i for i, p in enumerate(prompts) for _ in range(p.config.n_memory)]
    oq, ok = torch.tensor(owner_q), torch.tensor(owner_k)
    allowed = (ok[None, :] == -1) | (ok[None, :] == oq[:, None])  # [Q, K]
    for layer, blk in enumerate(bb.blocks):
        attn = blk.attn
        full = torch.cat([seq] + [p.memory[layer].expand(B, -1, -1) for p in prompts], dim=1)
        T = full.shape[1]
        qkv = attn.qkv(blk.norm1(full)).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        scores = (q * attn.scale) @ k.transpose(-2, -1)  # [B, H, T, T]
        scores = scores[:, :, : seq.shape[1]].masked_fill(~allowed, float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, seq.shape[1], -1)
        seq = seq + blk.ls1(attn.proj(attn.norm(o)))
        seq = seq + blk.ls2(blk.mlp(blk.norm2(seq)))
    seq = bb.norm(seq)
    pooled = bb.forward_head(seq[:, :N], pre_logits=True)  # the backbone's own pooled feature
    out, start = [], N
    for p in prompts:
        feats = seq[:, start:start + p.config.n_prompt].flatten(1)  # [B, P·D]: each token's output
        start += p.config.n_prompt
        out.append(p.head(torch.cat([feats, pooled], -1)).masked_fill(~p.label_mask, float("-inf")))
    return torch.stack(out), seq[:, :N]


def mixed_prompts(model, seeds=(0, 1, 2, 3, 4)):
    shapes = [dict(), dict(n_memory=0), dict(n_prompt=3, n_memory=2), dict(), dict(n_prompt=3, n_memory=2)]
    return [random_prompt(model, seed=s, **shape) for s, shape in zip(seeds, shapes)]


def as_double(prompts):
    return [copy.deepcopy(p).double() for p in prompts]


# --------------------------------------------------------------------------------------
# backbone pass
# --------------------------------------------------------------------------------------


def test_backbone_forward_equals_forward_features_bitwise(model, images):
    features, kv = model.backbone_forward(images)
    with torch.no_grad():
        expected = model.backbone.forward_features(images)
    assert torch.equal(features, expected)
    L, H, hd = model.depth, model.num_heads, model.head_dim
    N = expected.shape[1]
    assert kv.shape == (L, 2, len(images), H, N, hd)
    assert not features.requires_grad and not kv.requires_grad
    # no hook is left behind
    assert all(not blk.attn.qkv._forward_hooks for blk in model.backbone.blocks)


@pytest.mark.parametrize("name", ["model", "fancy_model"])
def test_captured_kv_are_each_layers_keys_and_values(name, images, request):
    model = request.getfixturevalue(name)
    inputs = []
    hooks = [blk.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for blk in model.backbone.blocks]
    try:
        _, kv = model.backbone_forward(images)
    finally:
        for h in hooks:
            h.remove()
    assert len(inputs) == model.depth
    B, N, _ = inputs[0].shape
    for layer, (blk, x) in enumerate(zip(model.backbone.blocks, inputs)):
        a = blk.attn
        qkv = a.qkv(blk.norm1(x)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        torch.testing.assert_close(kv[layer, 0], a.k_norm(qkv[1]), rtol=0, atol=1e-6)
        torch.testing.assert_close(kv[layer, 1], qkv[2], rtol=0, atol=1e-6)


def test_forward_kv_equals_forward(model, model64, images, prompts):
    # forward runs the prompts layer by layer inside the backbone pass; forward_kv from stored kv
    features, kv = model.backbone_forward(images)
    with torch.no_grad():
        torch.testing.assert_close(model(images, prompts), model.forward_kv(kv, model.pooled(features), prompts),
                                   rtol=1e-5, atol=1e-5)
    prompts64 = as_double(mixed_prompts(model64))
    x = images.double()
    features, kv = model64.backbone_forward(x)
    with torch.no_grad():
        torch.testing.assert_close(model64(x, prompts64), model64.forward_kv(kv, model64.pooled(features), prompts64),
                                   rtol=0, atol=1e-10)


def test_forward_leaves_no_hooks_and_backbone_untouched(model, images, prompts):
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with torch.no_grad():
        model(images, prompts)
    with pytest.raises(ValueError):
        model(images, [])
    assert all(not blk.attn.qkv._forward_hooks for blk in model.backbone.blocks)
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())


def test_concurrent_threads_share_the_backbone(model, images):
    # hooks live on the shared backbone: a pass in one thread must not see another thread's layers
    import threading

    prompts = [random_prompt(model, seed=s) for s in range(2)]
    with torch.no_grad():
        expected_logits = model(images, prompts)
        expected_kv = model.backbone_kv(images[:2])
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with torch.no_grad():
                for _ in range(4):
                    if i % 2:
                        torch.testing.assert_close(model(images, prompts), expected_logits, rtol=1e-5, atol=1e-5)
                    else:
                        torch.testing.assert_close(model.backbone_kv(images[:2]), expected_kv, rtol=1e-5, atol=1e-5)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


# --------------------------------------------------------------------------------------
# structured attention
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model64", "fancy_model"])
def test_matches_naive_masked_attention(name, images, request):
    model = request.getfixturevalue(name)
    prompts = mixed_prompts(model)
    double = name == "model64"
    if not double:  # also exercise the float64 path of the fancy backbone
        model = APTViT(copy.deepcopy(model.backbone).double())
    prompts = as_double(prompts)
    x = images.double()
    with torch.no_grad():
        ref, bb_tokens = reference_logits(model, x, prompts)
        got = model(x, prompts)
        features, _ = model.backbone_forward(x)
    torch.testing.assert_close(bb_tokens, features, rtol=0, atol=1e-10)
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(got))
    torch.testing.assert_close(got[finite], ref[finite], rtol=0, atol=1e-10)


def test_logits_independent_of_company_and_order_float64(model64, images):
    prompts = as_double([random_prompt(model64, seed=s) for s in (5, 6, 7)])
    x = images.double()
    with torch.no_grad():
        solo = [model64(x, [p])[0] for p in prompts]
        for perm in itertools.permutations(range(3)):
            out = model64(x, [prompts[i] for i in perm])
            for pos, i in enumerate(perm):
                torch.testing.assert_close(out[pos], solo[i], rtol=0, atol=1e-10)
        # same prompt twice in one call
        out = model64(x, [prompts[0], prompts[0]])
        torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-10)


def test_logits_independent_of_company_float32(model, images):
    prompts = [random_prompt(model, seed=s) for s in range(6)]
    with torch.no_grad():
        solo = torch.stack([model(images, [p])[0] for p in prompts])
        together = model(images, prompts)
        reversed_ = model(images, prompts[::-1]).flip(0)
    torch.testing.assert_close(together, solo, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reversed_, solo, rtol=1e-5, atol=1e-5)


def test_mixed_shapes_grouping_matches_solo(model64, images):
    prompts = as_double(mixed_prompts(model64))
    x = images.double()
    with torch.no_grad():
        together = model64(x, prompts)
        assert together.shape == (len(prompts), len(images), NUM_CLASSES)
        for i, p in enumerate(prompts):
            torch.testing.assert_close(together[i], model64(x, [p])[0], rtol=0, atol=1e-10)


def test_batch_elements_are_independent(model64, images):
    prompts = as_double(mixed_prompts(model64)[:3])
    x = images.double()
    with torch.no_grad():
        full = model64(x, prompts)
        one = model64(x[2:3], prompts)
    torch.testing.assert_close(full[:, 2:3], one, rtol=0, atol=1e-10)


def test_changing_another_prompt_does_not_change_logits(model, images, prompts):
    with torch.no_grad():
        before = model(images, prompts)[0]
        for p in prompts[1:]:
            p.tokens.mul_(-3.0).add_(1.0)
            p.memory.normal_()
            p.head.weight.normal_()
        after = model(images, prompts)
    torch.testing.assert_close(after[0], before, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(after[1], before)  # the others did change


def test_no_gradient_reaches_backbone_or_other_prompts(model, images, prompts):
    logits = model(images, prompts)
    loss = logits[0].logsumexp(-1).sum() + logits[0].square().sum()
    loss.backward()
    p0 = prompts[0]
    assert p0.tokens.grad is not None and p0.tokens.grad.abs().sum() > 0
    assert p0.memory.grad is not None and (p0.memory.grad.abs().sum(dim=(1, 2)) > 0).all()  # every layer
    assert p0.head.weight.grad is not None and p0.head.weight.grad.abs().sum() > 0
    for p in prompts[1:]:
        for param in p.parameters():
            assert param.grad is None or not param.grad.any()
    for param in model.backbone.parameters():
        assert not param.requires_grad and param.grad is None


def test_gradient_isolation_in_grouping_path(model, images):
    prompts = mixed_prompts(model)
    logits = model(images, prompts)
    logits[2].square().sum().backward()
    assert prompts[2].tokens.grad.abs().sum() > 0
    for i, p in enumerate(prompts):
        if i != 2:
            assert all(param.grad is None or not param.grad.any() for param in p.parameters())


def test_label_set_masks_logits(model, images):
    p = random_prompt(model, seed=0, labels=range(5))
    with torch.no_grad():
        logits = model(images, [p])[0]
    assert torch.isfinite(logits[:, :5]).all()
    assert torch.isneginf(logits[:, 5:]).all()


def test_forward_rejects_bad_prompt_lists(model, images):
    with pytest.raises(ValueError, match="at least one"):
        model(images, [])
    a, b = random_prompt(model, 0), random_prompt(model, 1, num_classes=7)
    with pytest.raises(ValueError, match="label space"):
        model(images, [a, b])


def test_train_mode_keeps_backbone_in_eval(model):
    model.train()
    try:
        assert model.training and not model.backbone.training
        assert all(not m.training for m in model.backbone.modules())
    finally:
        model.eval()


def test_apt_has_no_parameters_of_its_own(model):
    assert all(not p.requires_grad for p in model.parameters())
    assert {id(p) for p in model.parameters()} == {id(p) for p in model.backbone.parameters()}


def test_unsupported_backbones_rejected():
    with pytest.raises(UnsupportedBackboneError):
        APTViT(nn.Linear(3, 3))
    vit = make_vit(0, depth=1)
    vit.blocks[0] = nn.Identity()
    with pytest.raises(UnsupportedBackboneError):
        APTViT(vit)


# --------------------------------------------------------------------------------------
# composition
# --------------------------------------------------------------------------------------


@pytest.fixture
def logits3(model, images):
    prompts = [random_prompt(model, 0), random_prompt(model, 1, labels=range(5)), random_prompt(model, 2)]
    with torch.no_grad():
        return model(images, prompts)


def test_compose_is_mean_of_solo_softmaxes(model64, images):
    prompts = as_double([random_prompt(model64, s) for s in range(3)])
    x = images.double()
    with torch.no_grad():
        composed = model64.compose(x, prompts)
        solos = torch.stack([model64(x, [p])[0].softmax(-1) for p in prompts])
    torch.testing.assert_close(composed, solos.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(composed.sum(-1), torch.ones(len(x), dtype=torch.float64), rtol=0, atol=1e-12)


def test_compose_weights_vector_and_matrix(logits3):
    probs = logits3.softmax(-1)
    k, B = logits3.shape[:2]
    w = torch.tensor([1.0, 3.0, 0.0])
    out = compose_probs(logits3, w)
    torch.testing.assert_close(out, 0.25 * probs[0] + 0.75 * probs[1])
    w2 = torch.rand(k, B, generator=torch.Generator().manual_seed(0)) + 0.1
    out2 = compose_probs(logits3, w2)
    expected = (w2[..., None] * probs).sum(0) / w2.sum(0)[:, None]
    torch.testing.assert_close(out2, expected)
    # scale-invariant, lists accepted
    torch.testing.assert_close(compose_probs(logits3, [2.0, 6.0, 0.0]), out)
    for o in (out, out2):
        torch.testing.assert_close(o.sum(-1), torch.ones(B))


def test_compose_confidence(logits3):
    probs = logits3.softmax(-1)
    w = probs.amax(-1)
    expected = (w[..., None] * probs).sum(0) / w.sum(0)[:, None]
    out = compose_probs(logits3, composition_weights(Weighting.CONFIDENCE, logits3, []))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(-1), torch.ones(logits3.shape[1]))


def test_compose_label_set_masking(model, images):
    p = random_prompt(model, 0, labels=range(5))
    q = random_prompt(model, 1, labels=range(5, 10))
    with torch.no_grad():
        only = model.compose(images, [p])
        both = model.compose(images, [p, q], weighting=torch.tensor([1.0, 1.0]))
    assert torch.equal(only[:, 5:], torch.zeros_like(only[:, 5:]))
    assert (only[:, :5] > 0).all()
    torch.testing.assert_close(only.sum(-1), torch.ones(len(images)))
    # disjoint label sets: the composition is the concatenation of the halves
    torch.testing.assert_close(both[:, :5].sum(-1), torch.full((len(images),), 0.5))
    torch.testing.assert_close(both[:, :5] * 2, only[:, :5])


@pytest.mark.parametrize("weights", [
    torch.tensor([1.0, -1.0, 1.0]),  # negative
    torch.tensor([1.0, float("nan"), 1.0]),
    torch.tensor([1.0, float("inf"), 1.0]),
    torch.tensor([1.0, 1.0]),  # wrong k
    torch.ones(3, 4),  # wrong B
    torch.ones(3, 5, 1),
    torch.tensor(1.0),
    torch.zeros(3),  # no prompt weighted: rows could not sum to 1
])
def test_compose_invalid_weights(logits3, weights):
    with pytest.raises(ValueError):
        compose_probs(logits3, weights)


def test_unknown_weighting_name_rejected(logits3):
    with pytest.raises(ValueError, match="max"):
        composition_weights("max", logits3, [])


def test_compose_zero_weight_column_rejected(logits3):
    w = torch.ones(3, logits3.shape[1])
    w[:, 1] = 0
    with pytest.raises(ValueError):
        compose_probs(logits3, w)


# --------------------------------------------------------------------------------------
# load_backbone and fingerprints
# --------------------------------------------------------------------------------------


def test_load_backbone_cache(vit_tiny):
    again = load_backbone("vit_tiny_patch16_224", pretrained=False, img_size=IMG, device="cpu")
    assert again is vit_tiny
    other = load_backbone("vit_tiny_patch16_224", pretrained=False, img_size=48, device="cpu")
    assert other is not vit_tiny
    assert other.pos_embed.shape[1] == 1 + (48 // 16) ** 2
    assert not vit_tiny.training and all(not p.requires_grad for p in vit_tiny.parameters())
    assert vit_tiny.num_classes == 0


def test_random_init_is_seeded_and_does_not_touch_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    model_mod._create_backbone("vit_tiny_patch16_224", None, False, IMG)
    after = torch.rand(1)
    assert torch.equal(before, after)
    a = model_mod._create_backbone("vit_tiny_patch16_224", None, False, IMG)
    b = model_mod._create_backbone("vit_tiny_patch16_224", None, False, IMG)
    assert backbone_fingerprint(a) == backbone_fingerprint(b)


def _other_vit_tiny(img_size: int, seed: int = 123) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=img_size)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_local_checkpoint(tmp_path, vit_tiny, suffix):
    src = _other_vit_tiny(IMG)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = load_backbone("vit_tiny_patch16_224", checkpoint=path, img_size=IMG, device="cpu")
    assert loaded is not vit_tiny
    assert loaded is load_backbone("vit_tiny_patch16_224", checkpoint=str(path), img_size=IMG, device="cpu")
    got = loaded.state_dict()
    assert got.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(got[k], v), k
    assert backbone_fingerprint(loaded) == backbone_fingerprint(src)
    assert backbone_fingerprint(loaded) != backbone_fingerprint(vit_tiny)


def test_checkpoint_pos_embed_resampled(tmp_path):
    src = _other_vit_tiny(IMG)  # 2x2 grid + class token
    path = tmp_path / "small.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    loaded = load_backbone("vit_tiny_patch16_224", checkpoint=path, img_size=64, device="cpu")  # 4x4 grid
    assert loaded.pos_embed.shape == (1, 17, 192)
    expected = resample_abs_pos_embed(src.pos_embed, new_size=(4, 4), num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(loaded.pos_embed, expected)
    torch.testing.assert_close(loaded.pos_embed[:, 0], src.pos_embed[:, 0])
    assert torch.equal(loaded.blocks[5].mlp.fc2.weight, src.blocks[5].mlp.fc2.weight)
    with torch.no_grad():
        assert loaded(torch.zeros(1, 3, 64, 64)).shape == (1, 192)


def test_checkpoint_of_other_architecture_rejected(tmp_path):
    path = tmp_path / "wrong.safetensors"
    safetensors.torch.save_file({"foo.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="does not fit"):
        load_backbone("vit_tiny_patch16_224", checkpoint=path, img_size=IMG, device="cpu")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_backbone("vit_tiny_patch16_224", checkpoint=tmp_path / "nope.safetensors", img_size=IMG, device="cpu")


def test_offline_hub_failure(monkeypatch):
    real = timm.create_model
    calls = []

    def fake_create_model(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' (simulated offline)")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    with pytest.raises(BackboneUnavailableError, match="checkpoint=PATH") as info:
        load_backbone("vit_tiny_patch16_224", pretrained=True, img_size=IMG, device="cpu")
    assert isinstance(info.value.__cause__, OSError)
    assert calls == [True]
    key = ("vit_tiny_patch16_224", None, True, IMG, "cpu")
    assert key not in model_mod._BACKBONES  # a failure is not cached


def test_fingerprint_stable_and_sensitive():
    a, b = make_vit(0), make_vit(0)
    fa = backbone_fingerprint(a)
    assert len(fa) == 64 and fa == backbone_fingerprint(a) == backbone_fingerprint(b)
    assert backbone_fingerprint(make_vit(1)) != fa
    assert backbone_fingerprint(make_vit(0, img_size=48)) != fa
    with torch.no_grad():
        a.blocks[1].mlp.fc1.weight[0, 0] += 1e-3
    assert backbone_fingerprint(a) != fa  # must not return a stale cached value
    with torch.no_grad():
        a.blocks[1].mlp.fc1.weight[0, 0] -= 1e-3
    a.load_state_dict(b.state_dict())
    assert backbone_fingerprint(a) == fa
    assert APTViT(b).fingerprint == fa


def test_fingerprint_independent_of_device_dtype_copy(vit):
    fp = backbone_fingerprint(vit)
    assert backbone_fingerprint(copy.deepcopy(vit)) == fp
    assert backbone_fingerprint(copy.deepcopy(vit).double()) == fp
