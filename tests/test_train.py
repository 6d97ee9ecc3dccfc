"""Prompt training, evaluation, and the backbone key/value cache."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import IMG, NUM_CLASSES, make_vit, random_prompt

import common.train as train_mod
from common.compose import compose_probs, density_weights
from common.kv_cache import KVCache, Prefetch
from common.model import APTViT
from common.probe import L2_GRID, fit_probe
from common.prompt import Prompt
from common.train import TrainConfig, evaluate, train_prompt

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSES = (2, 7)  # global labels of the toy problem


def toy_batches(n: int = 32, batch: int = 8, seed: int = 0, offset: int = 0):
    """A separable 2-class problem: two fixed random patterns plus noise, as (images, labels, indices)."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(99))
    which = torch.arange(n) % 2
    images = patterns[which] + 0.5 * torch.randn(n, 3, IMG, IMG, generator=gen)
    labels = torch.tensor(CLASSES)[which]
    indices = torch.arange(offset, offset + n)
    return [(images[i:i + batch], labels[i:i + batch], indices[i:i + batch]) for i in range(0, n, batch)]


def quiet(**kwargs) -> TrainConfig:
    """The plain tuning loop: no probe initialisation, exactly ``epochs`` epochs."""
    return TrainConfig(progress=False, **({"probe_init": False, "min_steps": 0} | kwargs))


def fresh_prompt(model, seed=0, labels=CLASSES, **kwargs) -> Prompt:
    return Prompt.init(model, NUM_CLASSES, seed=seed, labels=labels, **kwargs)


def mean_loss(model, prompt, batches) -> float:
    with torch.no_grad():
        total = 0.0
        for images, labels, _ in batches:
            logits = model(images, [prompt])[0][:, list(prompt.config.labels)]
            targets = torch.tensor([prompt.config.labels.index(int(c)) for c in labels])
            total += F.cross_entropy(logits, targets, reduction="sum").item()
    return total / sum(len(b[1]) for b in batches)


# --------------------------------------------------------------------------------------
# train_prompt
# --------------------------------------------------------------------------------------


def test_training_learns_a_separable_problem(model):
    batches = toy_batches()
    prompt = fresh_prompt(model)
    before = mean_loss(model, prompt, batches)
    assert before == pytest.approx(math.log(2), abs=1e-6)  # zero head: uniform over the label set
    metrics = train_prompt(model, prompt, batches, quiet(epochs=8, lr=1e-2))
    after = mean_loss(model, prompt, batches)
    assert after < 0.5 * before
    assert metrics["loss"] < before and metrics["accuracy"] >= 0.9
    assert metrics["num_examples"] == 32 and prompt.config.num_examples == 32
    assert metrics["steps"] == 8 * len(batches) and metrics["seconds"] > 0
    assert not prompt.training
    held_out = toy_batches(seed=1)
    result = evaluate(model, [prompt], [(x, y) for x, y, _ in held_out])
    assert result["prompt_accuracy"][0] >= 0.9 and result["accuracy"] >= 0.9


def test_training_changes_only_the_prompt(model):
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    fingerprint = model.fingerprint
    prompt = fresh_prompt(model, n_prompt=2, n_memory=2)
    bystander = random_prompt(model, seed=5)
    bystander_before = copy.deepcopy(bystander.state_dict())
    prompt_before = copy.deepcopy(prompt.state_dict())
    train_prompt(model, prompt, toy_batches(16), quiet(epochs=2))
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone_before[k]), k
    for p in model.backbone.parameters():
        assert p.grad is None and not p.requires_grad
    assert not model.backbone.training
    assert model.fingerprint == fingerprint
    for k, v in bystander.state_dict().items():
        assert torch.equal(v, bystander_before[k])
    after = prompt.state_dict()
    for k in ("tokens", "memory", "head.weight", "head.bias"):
        assert not torch.equal(after[k], prompt_before[k]), f"{k} was not trained"
    assert all(not torch.equal(after["memory"][layer], prompt_before["memory"][layer]) for layer in range(model.depth))


def test_label_outside_label_set(model):
    prompt = fresh_prompt(model, labels=(2,))
    with pytest.raises(ValueError, match=r"\[7\]"):
        train_prompt(model, prompt, toy_batches(8), quiet())
    bad = [(torch.zeros(2, 3, IMG, IMG), torch.tensor([2, NUM_CLASSES + 3]), torch.arange(2))]
    with pytest.raises(ValueError, match="outside"):
        train_prompt(model, fresh_prompt(model), bad, quiet())
    bad = [(torch.zeros(2, 3, IMG, IMG), torch.tensor([2, -1]), torch.arange(2))]
    with pytest.raises(ValueError, match="outside"):
        train_prompt(model, fresh_prompt(model), bad, quiet())


def test_empty_loader_and_bad_config(model):
    with pytest.raises(ValueError, match="empty"):
        train_prompt(model, fresh_prompt(model), [], quiet())
    with pytest.raises(ValueError, match="epochs"):
        train_prompt(model, fresh_prompt(model), toy_batches(8), quiet(epochs=0))
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, [fresh_prompt(model)], [])


def test_label_smoothing_and_two_tuple_batches(model):
    batches = [(x, y) for x, y, _ in toy_batches(16)]
    metrics = train_prompt(model, fresh_prompt(model), batches, quiet(label_smoothing=0.1))
    assert math.isfinite(metrics["loss"])
    with pytest.raises(ValueError, match="indices"):
        train_prompt(model, fresh_prompt(model), batches, quiet(), cache=KVCache(model, dtype=torch.float32))


def test_evaluate_per_prompt_and_composed(model):
    batches = toy_batches(24, batch=10)
    prompts = [random_prompt(model, seed=s) for s in range(3)] + [random_prompt(model, seed=3, labels=CLASSES)]
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0])
    result = evaluate(model, prompts, [(x, y) for x, y, _ in batches], weights=weights)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        logits = model(images, prompts)
        probs = model.compose(images, prompts, weights)
    expected = [(logits[i].argmax(-1) == labels).float().mean().item() for i in range(len(prompts))]
    assert result["prompt_accuracy"] == pytest.approx(expected)
    assert result["accuracy"] == pytest.approx((probs.argmax(-1) == labels).float().mean().item())
    nll = -probs.gather(1, labels[:, None]).log().mean().item()
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["num_examples"] == 24
    # a uniform composition differs from the weighted one when weights change the argmax
    conf = evaluate(model, prompts, [(x, y) for x, y, _ in batches], weights="confidence")
    assert 0.0 <= conf["accuracy"] <= 1.0 and conf["prompt_accuracy"] == result["prompt_accuracy"]


# --------------------------------------------------------------------------------------
# KVCache
# --------------------------------------------------------------------------------------


def test_cache_float32_is_exact(model, images, prompts):
    cache = KVCache(model, dtype=torch.float32)
    indices = torch.arange(len(images))
    features, expected_kv = model.backbone_forward(images)
    pooled = model.pooled(features)
    first = cache.kv(indices, images)
    assert (cache.hits, cache.misses, len(cache)) == (0, len(images), len(images))
    second = cache.kv(indices, torch.full_like(images, float("nan")))  # hits never look at the images
    assert (cache.hits, cache.misses) == (len(images), len(images))
    assert torch.equal(first, expected_kv) and torch.equal(second, expected_kv)
    assert second.dtype == torch.float32 and second.shape == expected_kv.shape
    with torch.no_grad():
        assert torch.equal(model.forward_kv(second, pooled, prompts), model.forward_kv(expected_kv, pooled, prompts))
        torch.testing.assert_close(model.forward_kv(*cache.fetch(indices, images), prompts), model(images, prompts),
                                   rtol=1e-5, atol=1e-5)
    cache.close()


def test_cache_mixed_hits_and_misses_keep_batch_order(model, images):
    cache = KVCache(model, dtype=torch.float32)
    cache.kv(torch.tensor([10, 12]), images[[0, 2]])
    order = torch.tensor([3, 0, 4, 2, 1])
    got = cache.kv(torch.tensor([10, 11, 12, 13, 14])[order], images[order])
    assert (cache.hits, cache.misses) == (2, 5)
    torch.testing.assert_close(got, model.backbone_kv(images[order]), rtol=0, atol=1e-5)


def test_cache_reuses_one_buffer_for_all_hit_batches(model, images):
    cache = KVCache(model, dtype=torch.float32)
    cache.kv(torch.arange(5), images)
    expected = model.backbone_kv(images)  # [L, 2, 5, H, N, hd]
    first = cache.kv(torch.tensor([4, 3, 2, 1, 0]), images)
    torch.testing.assert_close(first, expected.flip(2), rtol=0, atol=0)
    pointer = first.data_ptr()
    second = cache.kv(torch.tensor([1, 3]), images[:2])  # a smaller batch: the leading rows of the same buffer
    assert second.data_ptr() == pointer and second.shape[2] == 2
    assert torch.equal(second, expected[:, :, [1, 3]])
    assert all(second[layer, i].is_contiguous() for layer in range(model.depth) for i in range(2))
    third = cache.kv(torch.arange(5), images)
    assert third.data_ptr() == pointer and torch.equal(third, expected)
    cache.close()


def test_caches_of_one_thread_share_the_all_hit_buffer(model, images):
    """A process with a cache per simulated client holds one output buffer per thread, not one per cache."""
    caches = [KVCache(model, dtype=torch.float32) for _ in range(3)]
    for cache in caches:
        cache.kv(torch.arange(5), images)
    expected = model.backbone_kv(images)
    outputs = [cache.kv(torch.arange(5), images) for cache in caches]
    assert len({out.data_ptr() for out in outputs}) == 1
    assert torch.equal(outputs[-1], expected)
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.append(caches[0].kv(torch.arange(5), images)))
    thread.start()
    thread.join()
    assert elsewhere[0].data_ptr() != outputs[0].data_ptr() and torch.equal(elsewhere[0], expected)
    assert torch.equal(caches[1].kv(torch.tensor([2]), images[:1]), expected[:, :, [2]])  # refilled, not stale
    for cache in caches:
        cache.close()


def test_cache_float16_is_close(model, images, prompts):
    cache = KVCache(model)  # fp16 by default
    indices = torch.arange(len(images))
    cache.kv(indices, images)
    kv16 = cache.kv(indices, images)
    assert cache.hits == len(images) and kv16.dtype == torch.float32
    kv = model.backbone_kv(images)
    assert not torch.equal(kv16, kv)  # it really went through half precision
    torch.testing.assert_close(kv16, kv, rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_kv(*cache.fetch(indices, images), prompts), model(images, prompts),
                                   rtol=0, atol=1e-2)
    cache.close()


def test_a_cache_returns_the_same_values_for_a_miss_as_for_a_hit(model, images):
    cache = KVCache(model)  # fp16
    indices = torch.arange(len(images))
    computed, pooled = (t.clone() for t in cache.fetch(indices, images))  # all misses
    assert torch.equal(cache.kv(indices, images), computed)  # all hits
    assert torch.equal(computed, model.backbone_kv(images).half().float())
    mixed = cache.kv(torch.tensor([0, 99, 1]), images[[0, 3, 1]])  # hit, miss, hit
    assert torch.equal(mixed, computed[:, :, [0, 3, 1]])
    cache.close()


def test_a_prompt_trained_through_a_warm_cache_equals_one_trained_through_a_cold_one(model):
    """A simulated client's cache lives in whichever worker trained its source before: what a
    prompt learns must not depend on it (recipe with probe initialisation and selection)."""
    batches, val = toy_batches(16), toy_batches(8, seed=1, offset=100)
    warm = KVCache(model)
    for batch in batches + val:
        warm.fetch(batch[2], batch[0])
    trained = []
    for cache in (KVCache(model), warm):
        prompt = fresh_prompt(model)
        train_prompt(model, prompt, batches, TrainConfig(epochs=2, min_steps=0, progress=False), cache=cache,
                     val_loader=val)
        trained.append(prompt.state_dict())
        cache.close()
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])


def test_cache_size_cap(model, images, tmp_path):
    item = model.backbone_kv(images[:1])[:, :, 0]  # [L, 2, H, N, hd]
    item_bytes = item.numel() * 2
    cache = KVCache(model, root=tmp_path, max_bytes=3 * item_bytes + item_bytes // 2)
    indices = torch.arange(len(images))
    expected = model.backbone_kv(images)
    for _ in range(3):
        got = cache.kv(indices, images)
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    assert len(cache) == 3
    assert cache.hits == 2 * 3 and cache.misses == len(images) + 2 * (len(images) - 3)
    cache.close()


KILLED_CACHE = """
import sys, time, torch
sys.path[:0] = [{tests!r}, {repo!r}]
from conftest import IMG, make_vit
from common.kv_cache import KVCache
from common.model import APTViT
cache = KVCache(APTViT(make_vit(0)), root={root!r})
cache.kv(torch.arange(2), torch.randn(2, 3, IMG, IMG))
print(len(cache), flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(os.name != "posix", reason="the cache file is unlinked while mapped on POSIX only")
def test_a_killed_process_leaves_no_cache_file(tmp_path):
    """Ray kills a simulation's actors, so no finaliser runs: the cache file has no name while
    it is mapped, and a SIGKILLed process leaves nothing behind in the cache's folder."""
    tests = Path(__file__).parent
    script = KILLED_CACHE.format(tests=str(tests), repo=str(tests.parent), root=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "2"  # two images cached, the process still alive
        assert child.poll() is None and not any(tmp_path.iterdir())
    finally:
        child.kill()
        child.wait(timeout=60)
    assert not any(tmp_path.iterdir())


def test_cache_cap_below_one_image_caches_nothing(model, images, tmp_path):
    cache = KVCache(model, root=tmp_path, max_bytes=100, dtype=torch.float32)
    indices = torch.arange(len(images))
    for _ in range(2):
        assert torch.equal(cache.kv(indices, images), model.backbone_kv(images))
    assert len(cache) == 0 and cache.hits == 0 and cache.misses == 2 * len(images)
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) <= 100


def test_cache_repeated_index_in_a_batch(model, images):
    cache = KVCache(model, dtype=torch.float32)
    x = images[[0, 0, 1]]
    cache.kv(torch.tensor([0, 0, 1]), x)
    assert len(cache) == 2
    got = cache.kv(torch.tensor([0, 1, 2]), images[:3])
    assert cache.hits == 2
    torch.testing.assert_close(got, model.backbone_kv(images[:3]), rtol=0, atol=1e-5)


def test_caches_sharing_a_root_do_not_collide(model, images, tmp_path):
    a = KVCache(model, root=tmp_path, dtype=torch.float32)
    b = KVCache(model, root=tmp_path, dtype=torch.float32)
    idx = torch.arange(2)
    a.kv(idx, images[:2])
    b.kv(idx, images[2:4])
    assert torch.equal(a.kv(idx, images[:2]), model.backbone_kv(images[:2]))
    assert torch.equal(b.kv(idx, images[2:4]), model.backbone_kv(images[2:4]))
    a.close()
    b.close()


def test_cache_rejects_bad_dtype(model):
    with pytest.raises(ValueError):
        KVCache(model, dtype=torch.bfloat16)


def test_training_with_cache_follows_the_same_trajectory(model, monkeypatch):
    losses: list[float] = []
    real = F.cross_entropy

    def recording(*args, **kwargs):
        loss = real(*args, **kwargs)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(train_mod.F, "cross_entropy", recording)
    batches = toy_batches(24)
    plain = fresh_prompt(model, seed=3, n_memory=2)
    cached = copy.deepcopy(plain)
    m1 = train_prompt(model, plain, batches, quiet(epochs=3))
    trajectory, losses[:] = list(losses), []
    cache = KVCache(model, dtype=torch.float32)
    m2 = train_prompt(model, cached, batches, quiet(epochs=3), cache=cache)
    assert len(trajectory) == 9 and losses == trajectory
    assert m1["loss"] == m2["loss"] and m1["accuracy"] == m2["accuracy"]
    for k, v in plain.state_dict().items():
        assert torch.equal(v, cached.state_dict()[k]), k
    assert cache.misses == 24 and cache.hits == 2 * 24
    assert len(set(trajectory)) > 1  # it did train


def test_training_with_fp16_cache_is_close(model):
    batches = toy_batches(16)
    plain, cached = fresh_prompt(model, seed=1), fresh_prompt(model, seed=1)
    m1 = train_prompt(model, plain, batches, quiet(epochs=2))
    m2 = train_prompt(model, cached, batches, quiet(epochs=2), cache=KVCache(model))
    assert m2["loss"] == pytest.approx(m1["loss"], abs=1e-2)
    torch.testing.assert_close(cached.tokens, plain.tokens, rtol=0, atol=1e-2)


def test_cache_on_another_backbone_is_separate(images):
    a, b = APTViT(make_vit(0)), APTViT(make_vit(1))
    ca, cb = KVCache(a, dtype=torch.float32), KVCache(b, dtype=torch.float32)
    idx = torch.arange(2)
    assert not torch.equal(ca.kv(idx, images[:2]), cb.kv(idx, images[:2]))


# --------------------------------------------------------------------------------------
# the recipe: probe-initialised head, step floor, selection on validation loss
# --------------------------------------------------------------------------------------


def head_features(model, prompt, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """What the head reads, ``[out_1 ; … ; out_P ; pooled]``, and the local targets of ``batches``."""
    with torch.no_grad():
        feats = []
        for x, _, _ in batches:
            features, kv = model.backbone_forward(x)
            feats.append(torch.cat([model.features_kv(kv, [prompt])[0], model.pooled(features)], dim=-1))
    targets = torch.cat([torch.tensor([prompt.config.labels.index(int(c)) for c in y]) for _, y, _ in batches])
    return torch.cat(feats), targets


@pytest.mark.parametrize("n_prompt", [1, 3])
def test_probe_init_head_equals_a_probe_fit_and_separates_the_data(model, n_prompt):
    batches = toy_batches(32)
    prompt = fresh_prompt(model, n_prompt=n_prompt)
    l2 = train_mod.probe_init_head(model, prompt, batches)
    feats, targets = head_features(model, prompt, batches)
    probe = fit_probe(feats, targets, len(CLASSES))
    assert l2 == probe.l2 and l2 in L2_GRID
    torch.testing.assert_close(prompt.head.weight[list(CLASSES)], probe.weight)
    torch.testing.assert_close(prompt.head.bias[list(CLASSES)], probe.bias)
    blocks = prompt.head.weight.reshape(NUM_CLASSES, n_prompt + 1, model.embed_dim)  # one block per token, pooled
    assert all(blocks[:, t].any() for t in range(n_prompt + 1))  # it reads every token's output and the pooled
    others = [c for c in range(NUM_CLASSES) if c not in CLASSES]
    assert not prompt.head.weight[others].any() and not prompt.head.bias[others].any()
    test = toy_batches(32, seed=5)
    with torch.no_grad():  # the fresh prompt's logits are exactly the probe's
        logits = torch.cat([model(x, [prompt])[0][:, list(CLASSES)] for x, _, _ in test])
    torch.testing.assert_close(logits, probe.logits(head_features(model, prompt, test)[0]), rtol=1e-4, atol=1e-4)
    result = evaluate(model, [prompt], [(x, y) for x, y, _ in test])
    assert result["prompt_accuracy"][0] == 1.0  # separable: the probe alone solves it


def scripted_validation(monkeypatch, per_epoch: list[torch.Tensor]) -> list[dict]:
    """Make the recipe see these per-example validation losses (before tuning, then after each
    epoch); returns the prompt states it was in at each measurement."""
    scripted, states = iter(per_epoch), []

    def fake_validation_losses(_model, prompt, _loader, _cache):
        states.append(copy.deepcopy(prompt.state_dict()))
        return next(scripted)

    monkeypatch.setattr(train_mod, "_validation_losses", fake_validation_losses)
    return states


def test_recipe_keeps_the_epoch_with_the_lowest_validation_loss(model, monkeypatch):
    base = torch.linspace(0.5, 1.3, 8)  # mean 0.9 before tuning
    states = scripted_validation(monkeypatch, [base, base - 0.2, base - 0.5, base - 0.3, base - 0.4])
    prompt = fresh_prompt(model)
    metrics = train_prompt(model, prompt, toy_batches(16), TrainConfig(epochs=4, min_steps=0, progress=False),
                           val_loader=toy_batches(8, seed=3))
    assert (metrics["selected_epoch"], metrics["epochs"]) == (2, 4)
    assert metrics["val_loss"] == pytest.approx(0.4)
    for name, value in prompt.state_dict().items():
        assert torch.equal(value, states[2][name]), name
    assert not torch.equal(states[2]["tokens"], states[4]["tokens"])  # it really went back to epoch 2


def test_recipe_ignores_a_gain_within_validation_noise(model, monkeypatch):
    """A lower mean loss that is within one standard error of the paired difference is noise:
    the untuned (probe-initialised) prompt stays."""
    base = torch.full((8,), 0.9)
    noisy = base + torch.tensor([-0.8, 0.7, -0.8, 0.7, -0.8, 0.7, -0.8, 0.7])  # mean 0.85, spread 0.8
    states = scripted_validation(monkeypatch, [base, noisy, noisy])
    prompt = fresh_prompt(model)
    metrics = train_prompt(model, prompt, toy_batches(16), TrainConfig(epochs=2, min_steps=0, progress=False),
                           val_loader=toy_batches(8, seed=3))
    assert metrics["selected_epoch"] == 0 and metrics["val_loss"] == pytest.approx(0.9)
    for name, value in prompt.state_dict().items():
        assert torch.equal(value, states[0][name]), name


@pytest.mark.parametrize(("level", "epochs", "kept"), [(0.05, 1, 1), (0.05, 4, 0), (0.5, 4, 1)])
def test_selection_level_is_family_wise_over_the_epochs_tested(model, monkeypatch, level, epochs, kept):
    """Every tuned epoch gains exactly 2 standard errors: enough for one test at level 0.05
    (z = 1.64), not for four (Bonferroni, z = 2.24); at level 0.5 over four (z = 1.15) the first
    such epoch is kept."""
    base = torch.full((8,), 0.9)
    gain = torch.tensor([0.3, -0.1] * 4)
    gain = gain - gain.mean() + 2.0 * float(gain.std() / math.sqrt(len(gain)))  # mean gain: exactly 2 SE
    scripted_validation(monkeypatch, [base] + [base - gain] * epochs)
    prompt = fresh_prompt(model)
    metrics = train_prompt(model, prompt, toy_batches(16),
                           TrainConfig(epochs=epochs, min_steps=0, selection_level=level, progress=False),
                           val_loader=toy_batches(8, seed=3))
    assert metrics["selected_epoch"] == kept


def test_one_validation_example_is_no_evidence_for_tuning(model, monkeypatch):
    """A single validation example has no standard error: however much lower its loss, the probe stays."""
    scripted_validation(monkeypatch, [torch.tensor([0.9]), torch.tensor([0.1])])
    prompt = fresh_prompt(model)
    metrics = train_prompt(model, prompt, toy_batches(16), TrainConfig(epochs=1, min_steps=0, progress=False),
                           val_loader=toy_batches(1, seed=3))
    assert metrics["selected_epoch"] == 0 and metrics["val_loss"] == pytest.approx(0.9)


@pytest.mark.parametrize("level", [0.0, 1.0, -0.1])
def test_selection_level_out_of_range_is_rejected(model, level):
    with pytest.raises(ValueError, match="selection-level"):
        train_prompt(model, fresh_prompt(model), toy_batches(16), TrainConfig(selection_level=level, progress=False))


def test_recipe_keeps_the_probe_when_tuning_hurts_validation(model):
    """A learning rate far too large wrecks the prompt during tuning: validation loss says so,
    and the probe-initialised prompt (epoch 0) is kept, bit for bit."""
    train = toy_batches(32)
    reference = fresh_prompt(model)
    train_mod.probe_init_head(model, reference, train)
    prompt = fresh_prompt(model)
    metrics = train_prompt(model, prompt, train, TrainConfig(epochs=3, min_steps=0, lr=1.0, progress=False),
                           val_loader=toy_batches(16, seed=4))
    assert metrics["selected_epoch"] == 0 and metrics["steps"] == 3 * len(train)
    assert metrics["val_loss"] == pytest.approx(mean_loss(model, reference, toy_batches(16, seed=4)))
    for name, value in reference.state_dict().items():
        assert torch.equal(prompt.state_dict()[name], value), name


def test_tuning_starts_from_the_probe_on_both_halves_of_the_head(model, monkeypatch):
    """Epoch 0 (what selection compares with) and the start of tuning are the exact probe on
    ``[prompt output ; pooled]``: its prompt columns are not zero, so the tokens get gradients."""
    train = toy_batches(16)
    reference = fresh_prompt(model)
    train_mod.probe_init_head(model, reference, train)
    states = scripted_validation(monkeypatch, [torch.ones(4), torch.ones(4)])
    seen = []
    monkeypatch.setattr(train_mod, "_train_epoch", lambda _m, prompt, *a: seen.append(prompt.head.weight.clone())
                        or {"loss": 0.0, "accuracy": 1.0, "num_examples": 16})
    train_prompt(model, fresh_prompt(model), train, TrainConfig(epochs=1, min_steps=0, progress=False),
                 val_loader=toy_batches(4, seed=3))
    torch.testing.assert_close(states[0]["head.weight"], reference.head.weight, rtol=0, atol=0)
    torch.testing.assert_close(seen[0], reference.head.weight, rtol=0, atol=0)
    assert seen[0][:, :model.embed_dim].any()


@pytest.mark.parametrize("probe_init", [True, False])
def test_a_fitted_head_learns_at_head_lr_scale(model, probe_init):
    """A probe-initialised head moves at ``head_lr_scale`` x ``lr`` (AdamW steps are about the
    learning rate in size); a zero head (no probe) learns at the full ``lr``; tokens always do."""
    train = toy_batches(32)  # 4 batches: 4 steps
    start = fresh_prompt(model)
    if probe_init:
        train_mod.probe_init_head(model, start, train)
    prompt = fresh_prompt(model)
    config = TrainConfig(epochs=1, min_steps=0, lr=0.05, head_lr_scale=1e-4, probe_init=probe_init, progress=False)
    train_prompt(model, prompt, train, config)
    head_moved = float((prompt.head.weight - start.head.weight).detach().abs().max())
    tokens_moved = float((prompt.tokens - start.tokens).detach().abs().max())
    head_bound = 2 * 4 * 0.05 * 1e-4  # 4 AdamW steps of at most ~lr x head_lr_scale each
    assert tokens_moved > 10 * head_bound  # the tokens learn at the full lr (small steps: the toy loss is ~0)
    if probe_init:
        assert 0 < head_moved < head_bound
    else:
        assert head_moved > 0.02
    with pytest.raises(ValueError, match="head-lr-scale"):
        train_prompt(model, fresh_prompt(model), train, TrainConfig(head_lr_scale=0.0, progress=False))


def test_step_floor_on_small_shards(model):
    batches = toy_batches(8)  # one batch
    metrics = train_prompt(model, fresh_prompt(model), batches, TrainConfig(epochs=1, min_steps=5, progress=False))
    assert metrics["steps"] == 5 and metrics["epochs"] == 5 and metrics["selected_epoch"] == 5
    with pytest.raises(ValueError, match="min-steps"):
        train_prompt(model, fresh_prompt(model), batches, TrainConfig(min_steps=-1, progress=False))


def test_trained_prompt_is_not_re_probed(model):
    """Only a fresh (zero) head is probe-initialised; a later round continues from its head."""
    prompt = random_prompt(model, seed=2, labels=CLASSES)
    metrics = train_prompt(model, prompt, toy_batches(8), TrainConfig(epochs=1, min_steps=0, progress=False))
    assert math.isnan(metrics["probe_l2"])


def test_source_density_uses_the_cached_pooled_features(model):
    batches = toy_batches(16)
    cache = KVCache(model, dtype=torch.float32)
    for x, _, i in batches:
        cache.kv(i, x)
    hits = cache.hits
    density = train_mod.source_density(model, [(torch.full_like(x, float("nan")), y, i) for x, y, i in batches],
                                       cache)
    assert cache.hits == hits + 16 and cache.misses == 16
    images = torch.cat([x for x, _, _ in batches])
    with torch.no_grad():
        pooled = model.pooled(model.backbone_forward(images)[0])
    direct = train_mod.source_density(model, batches)
    torch.testing.assert_close(density.mean, direct.mean)
    assert density.classes.tolist() == list(CLASSES) and density.num_images == 16
    torch.testing.assert_close(direct.mean[0], pooled[0::2].double().mean(0))


def test_evaluate_from_a_prefetched_cache_equals_evaluate_from_images(model):
    batches = toy_batches(24, batch=8)
    prompts = [random_prompt(model, seed=s, labels=CLASSES) for s in range(2)]
    for p, seed in zip(prompts, (0, 1)):
        p.density = train_mod.source_density(model, toy_batches(16, seed=seed))
    threads = torch.get_num_threads()
    with Prefetch(KVCache(model, dtype=torch.float32), batches) as prefetch:
        assert prefetch.wait(timeout=60)  # the loader is exhausted: the fill ended on its own
        cache = prefetch.result()
    assert len(cache) == 24 and torch.get_num_threads() == threads
    direct, cached = evaluate(model, prompts, batches), evaluate(model, prompts, batches, cache=cache)
    assert cache.hits == 24 and cache.misses == 24  # evaluate ran no backbone pass: every image was a hit
    assert cached["composed"] == direct["composed"] and cached["prompt_accuracy"] == direct["prompt_accuracy"]
    assert cached["nll"] == pytest.approx(direct["nll"], rel=1e-5)
    cache.close()


def test_prefetch_runs_on_one_idle_priority_thread_and_stops_when_asked(model):
    seen, started = [], threading.Event()

    def endless():  # runs in the fill's thread
        seen.append((torch.get_num_threads(), os.sched_getscheduler(0) if sys.platform.startswith("linux") else None))
        for i in range(10_000):
            images, labels, _ = toy_batches(2, batch=2)[0]
            if i == 1:  # the first batch is cached
                started.set()
            yield images, labels, torch.tensor([2 * i, 2 * i + 1])

    cache = KVCache(model, dtype=torch.float32)
    prefetch = Prefetch(cache, endless())
    assert started.wait(timeout=60)
    assert prefetch.result() is cache and prefetch.wait(timeout=0)
    assert 0 < len(cache) < 20_000  # stopped long before the loader's end
    assert seen == [(1, os.SCHED_IDLE if sys.platform.startswith("linux") else None)]
    cache.close()


def test_prefetch_stops_when_the_cache_is_full(model, images):
    item_bytes = model.backbone_kv(images[:1]).numel() * 4  # one image's float32 keys/values
    cache = KVCache(model, dtype=torch.float32, max_bytes=3 * item_bytes)
    batches = ((images[:1], torch.zeros(1, dtype=torch.long), torch.tensor([i])) for i in range(10_000))
    with Prefetch(cache, batches) as prefetch:
        assert prefetch.wait(timeout=60)
    assert cache.full and len(cache) == 3
    cache.close()


def test_prefetch_hands_its_error_to_the_caller_and_keeps_what_it_cached(model):
    def failing():
        yield toy_batches(4, batch=4)[0]
        raise OSError("disk full")

    cache = KVCache(model, dtype=torch.float32)
    prefetch = Prefetch(cache, failing())
    assert prefetch.wait(timeout=60)  # the error ended the fill
    with pytest.raises(RuntimeError, match="prefetching backbone keys/values failed: disk full"):
        prefetch.result()
    assert len(cache) == 4
    cache.close()


def test_evaluate_reports_uniform_and_density_composition(model):
    batches = toy_batches(24, batch=8)
    prompts = [random_prompt(model, seed=s, labels=CLASSES) for s in range(2)]
    plain = evaluate(model, prompts, [(x, y) for x, y, _ in batches])
    assert plain["weighting"] == "uniform" and set(plain["composed"]) == {"uniform"}
    for p, seed in zip(prompts, (0, 1)):
        p.density = train_mod.source_density(model, toy_batches(16, seed=seed))
    result = evaluate(model, prompts, [(x, y) for x, y, _ in batches])
    assert result["weighting"] == "density" and set(result["composed"]) == {"uniform", "density"}
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        probs = model.compose(images, prompts)
        logits, pooled = model.forward_with_pooled(images, prompts)
    expected = compose_probs(logits, density_weights([p.density for p in prompts], pooled))
    torch.testing.assert_close(probs, expected)
    assert result["accuracy"] == result["composed"]["density"] == pytest.approx(
        (expected.argmax(-1) == labels).float().mean().item())
    assert result["composed"]["uniform"] == plain["accuracy"]
