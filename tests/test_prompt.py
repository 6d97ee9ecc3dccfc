"""The Prompt artefact: construction, round trips, and rejection of every kind of bad file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
from conftest import NUM_CLASSES, make_vit, random_prompt

import common.density as density_mod
from common.compose import Weighting, default_weighting
from common.density import SourceDensity
from common.model import APTViT
from common.prompt import (
    FORMAT_VERSION,
    BackboneMismatchError,
    Prompt,
    PromptConfig,
    PromptDensityError,
    PromptError,
    PromptFormatError,
    PromptShapeError,
    PromptValueError,
    PromptVersionError,
    read_metadata,
    read_metadata_bytes,
    source_seed,
)

pytestmark = pytest.mark.usefixtures("single_thread")

TENSORS = ("tokens", "memory", "head.weight", "head.bias")


@pytest.fixture
def prompt(model) -> Prompt:
    p = random_prompt(model, seed=4, n_prompt=2, n_memory=3, labels=[1, 3, 5, 7], source="hospital-7")
    p.config = replace(p.config, num_examples=123)
    return p


def assert_same_prompt(a: Prompt, b: Prompt) -> None:
    assert a.config.to_metadata() == b.config.to_metadata()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() == set(TENSORS)
    for name in TENSORS:
        assert sa[name].dtype == sb[name].dtype == torch.float32
        assert torch.equal(sa[name], sb[name]), name
    assert a.config == b.config


def bad_bytes(prompt: Prompt, arrays=None, **meta_changes) -> bytes:
    """A safetensors file like ``prompt.to_bytes()`` with some arrays/metadata replaced."""
    arrs = prompt.arrays() if arrays is None else arrays
    meta = prompt.config.to_metadata()
    for k, v in meta_changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    return safetensors.numpy.save(arrs, metadata=meta)


# --------------------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------------------


def test_init_shapes_and_binding(model):
    p = Prompt.init(model, num_classes=NUM_CLASSES, n_prompt=2, n_memory=3, seed=0)
    assert p.tokens.shape == (2, model.embed_dim)
    assert p.memory.shape == (model.depth, 3, model.embed_dim)
    assert p.head.weight.shape == (NUM_CLASSES, 3 * model.embed_dim) and p.head.bias.shape == (NUM_CLASSES,)
    assert p.config.fingerprint == model.fingerprint and p.config.backbone == model.backbone_name
    assert p.config.labels == tuple(range(NUM_CLASSES))
    assert {n for n, _ in p.named_parameters()} == set(TENSORS)


def test_init_deterministic_in_seed(model):
    a, b, c = (Prompt.init(model, NUM_CLASSES, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.memory, b.memory)
    assert not torch.equal(a.tokens, c.tokens)


def test_init_starts_at_random_tokens_with_uniform_predictions(model, images):
    p = Prompt.init(model, NUM_CLASSES, n_prompt=3, seed=0, labels=range(4))
    tokens = p.tokens.detach()
    assert 0.5 < float(tokens.std()) < 1.5 and abs(float(tokens.mean())) < 0.3  # standard normal
    assert float(p.memory.detach().abs().max()) < 0.2
    assert not torch.equal(p.tokens[0], p.tokens[1])
    with torch.no_grad():
        probs = model.compose(images, [p])
    torch.testing.assert_close(probs[:, :4], torch.full((len(images), 4), 0.25))
    assert torch.equal(probs[:, 4:], torch.zeros(len(images), NUM_CLASSES - 4))


def test_label_mask_and_labels_normalised(model):
    p = Prompt.init(model, NUM_CLASSES, labels=[7, 2, 2, 5])
    assert p.config.labels == (2, 5, 7)
    assert p.label_mask.tolist() == [i in (2, 5, 7) for i in range(NUM_CLASSES)]


@pytest.mark.parametrize("labels", [[], [-1, 2], [0, NUM_CLASSES]])
def test_bad_label_set_rejected_at_construction(model, labels):
    with pytest.raises(PromptShapeError):
        Prompt.init(model, NUM_CLASSES, labels=labels)


@pytest.mark.parametrize("dims", [dict(embed_dim=0), dict(depth=0), dict(num_classes=0), dict(n_prompt=0),
                                  dict(n_memory=-1)])
def test_bad_dimensions_rejected(dims):
    kwargs = dict(embed_dim=8, depth=2, num_classes=3, n_prompt=1, n_memory=2) | dims
    with pytest.raises(PromptShapeError):
        PromptConfig(**kwargs)


def test_exception_hierarchy():
    for exc in (PromptFormatError, PromptVersionError, PromptShapeError, PromptValueError, BackboneMismatchError):
        assert issubclass(exc, PromptError) and issubclass(exc, ValueError)
    assert issubclass(PromptVersionError, PromptFormatError)


# --------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------


def test_save_load_roundtrip_bitwise(prompt, model, tmp_path):
    path = prompt.save(tmp_path / "sub" / "p.safetensors")
    assert path.is_file()
    assert [f.name for f in path.parent.iterdir()] == ["p.safetensors"]  # no temporary left behind
    for loaded in (Prompt.load(path), Prompt.load(path, model=model)):
        assert_same_prompt(loaded, prompt)
    assert read_metadata(path) == prompt.config.to_metadata()
    # loaded prompts behave identically
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x, [Prompt.load(path, model)]), model(x, [prompt]))


def test_save_overwrites_atomically(prompt, model, tmp_path):
    path = tmp_path / "p.safetensors"
    random_prompt(model, seed=9).save(path)
    prompt.save(path)
    assert_same_prompt(Prompt.load(path), prompt)
    assert len(list(tmp_path.iterdir())) == 1


def test_bytes_roundtrip(prompt, model):
    data = prompt.to_bytes()
    assert isinstance(data, bytes)
    assert_same_prompt(Prompt.from_bytes(data), prompt)
    assert_same_prompt(Prompt.from_bytes(data, model), prompt)
    assert read_metadata_bytes(data) == prompt.config.to_metadata()
    assert_same_prompt(Prompt.from_bytes(Prompt.from_bytes(data).to_bytes()), prompt)


def test_bytes_are_deterministic(prompt):
    """safetensors orders header keys at random; the artefact must not (the pool checksums it)."""
    assert len({prompt.to_bytes() for _ in range(20)}) == 1
    assert int.from_bytes(prompt.to_bytes()[:8], "little") % 8 == 0  # header stays 8-byte aligned


def test_arrays_roundtrip(prompt, model):
    arrays, meta = prompt.arrays(), prompt.config.to_metadata()
    assert set(arrays) == set(TENSORS)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays.values())
    assert all(isinstance(v, str) for v in meta.values())
    arrays["tokens"][0, 0] += 1.0  # arrays are copies, not views of the parameters
    assert prompt.tokens[0, 0].item() != arrays["tokens"][0, 0]
    back = Prompt.from_arrays(prompt.arrays(), meta, model=model)
    assert_same_prompt(back, prompt)
    assert json.loads(meta["labels"]) == [1, 3, 5, 7] and meta["format_version"] == str(FORMAT_VERSION)


def test_float64_prompt_exported_as_float32(prompt):
    double = Prompt.from_bytes(prompt.to_bytes()).double()
    assert_same_prompt(Prompt.from_bytes(double.to_bytes()), prompt)


# --------------------------------------------------------------------------------------
# rejection of bad artefacts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TENSORS)
def test_wrong_shape(prompt, name):
    arrays = prompt.arrays()
    arrays[name] = np.concatenate([arrays[name], arrays[name]], axis=0)
    with pytest.raises(PromptShapeError, match=name):
        Prompt.from_arrays(arrays, prompt.config.to_metadata())
    with pytest.raises(PromptShapeError):
        Prompt.from_bytes(bad_bytes(prompt, arrays))


def test_shape_inconsistent_with_metadata(prompt):
    with pytest.raises(PromptShapeError):
        Prompt.from_bytes(bad_bytes(prompt, n_memory="4"))
    with pytest.raises(PromptShapeError):
        Prompt.from_bytes(bad_bytes(prompt, num_classes="11"))


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
@pytest.mark.parametrize("name", ["tokens", "head.bias"])
def test_wrong_dtype(prompt, dtype, name):
    arrays = prompt.arrays()
    arrays[name] = arrays[name].astype(dtype)
    with pytest.raises(PromptShapeError, match="float32"):
        Prompt.from_arrays(arrays, prompt.config.to_metadata())
    with pytest.raises(PromptShapeError, match="float32"):
        Prompt.from_bytes(bad_bytes(prompt, arrays))


def test_non_array_rejected(prompt):
    arrays = prompt.arrays()
    arrays["tokens"] = torch.from_numpy(arrays["tokens"])
    with pytest.raises(PromptShapeError):
        Prompt.from_arrays(arrays, prompt.config.to_metadata())


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", TENSORS)
def test_non_finite_values(prompt, name, value):
    arrays = prompt.arrays()
    arrays[name].reshape(-1)[-1] = value
    with pytest.raises(PromptValueError, match=name):
        Prompt.from_arrays(arrays, prompt.config.to_metadata())
    with pytest.raises(PromptValueError):
        Prompt.from_bytes(bad_bytes(prompt, arrays))


@pytest.mark.parametrize("change", ["missing", "extra", "renamed"])
def test_tensor_keys(prompt, change):
    arrays = prompt.arrays()
    if change == "missing":
        del arrays["memory"]
    elif change == "extra":
        arrays["backdoor"] = np.zeros(3, np.float32)
    else:
        arrays["head.w"] = arrays.pop("head.weight")
    with pytest.raises(PromptShapeError):
        Prompt.from_arrays(arrays, prompt.config.to_metadata())
    with pytest.raises(PromptShapeError):
        Prompt.from_bytes(bad_bytes(prompt, arrays))


def test_truncated_files(prompt, tmp_path):
    data = prompt.to_bytes()
    for cut in (0, 5, 8, 9, 40, len(data) // 2, len(data) - 4, len(data) - 1):
        with pytest.raises(PromptFormatError):
            Prompt.from_bytes(data[:cut])
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(PromptFormatError):
            Prompt.load(path)


def test_garbage_and_corrupted_header(prompt):
    data = prompt.to_bytes()
    header_len = int.from_bytes(data[:8], "little")
    rng = np.random.default_rng(0)
    candidates = [
        rng.bytes(len(data)),  # random garbage
        b"\x10\x00\x00\x00\x00\x00\x00\x00" + rng.bytes(100),  # plausible length, garbage header
        data[:8] + b"#" * header_len + data[8 + header_len:],  # header overwritten
        data[:8] + data[8:20] + b"\xff\xfe" + data[22:],  # invalid utf-8 inside the header
        data[:8] + b"[" + data[9:],  # broken JSON
        (2).to_bytes(8, "little") + b"[]",  # JSON, but not an object
        (2).to_bytes(8, "little") + b"{}",  # no metadata
        b"PK\x03\x04" + data[4:],  # a zip file's magic
    ]
    for bad in candidates:
        with pytest.raises(PromptFormatError):
            Prompt.from_bytes(bad)


def test_corrupted_tensor_offsets(prompt):
    data = prompt.to_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    header["memory"]["data_offsets"][1] += 4  # points past its tensor
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    body = data[8 + header_len:]
    with pytest.raises(PromptError):
        Prompt.from_bytes(len(raw).to_bytes(8, "little") + raw + body)


@pytest.mark.parametrize("version", ["5", "0", "999"])
def test_unknown_format_version(prompt, version):
    with pytest.raises(PromptVersionError, match="version"):
        Prompt.from_bytes(bad_bytes(prompt, format_version=version))


def test_future_version_with_different_fields_reports_version(prompt):
    # a future format may rename fields: the version must be what is reported
    with pytest.raises(PromptVersionError):
        Prompt.from_bytes(bad_bytes(prompt, format_version="5", n_memory=None, depth=None))


@pytest.mark.parametrize("changes", [
    dict(format="something-else"),
    dict(format=None),
    dict(fingerprint=None),
    dict(labels=None),
    dict(format_version=None),
    dict(n_prompt="one"),
    dict(format_version="1.5"),
    dict(created_at="yesterday"),
    dict(labels="[1, 2"),
    dict(labels='{"a": 1}'),
    dict(labels='[1.5, 2]'),
])
def test_bad_metadata(prompt, changes):
    with pytest.raises(PromptFormatError):
        Prompt.from_bytes(bad_bytes(prompt, **changes))
    meta = prompt.config.to_metadata()
    for k, v in changes.items():
        meta.pop(k) if v is None else meta.__setitem__(k, v)
    with pytest.raises(PromptFormatError):
        Prompt.from_arrays(prompt.arrays(), meta)


@pytest.mark.parametrize("labels", ["[]", "[-1]", f"[0, {NUM_CLASSES}]", "[3, 100]"])
def test_label_set_out_of_range(prompt, labels):
    with pytest.raises(PromptShapeError, match="label set"):
        Prompt.from_bytes(bad_bytes(prompt, labels=labels))


def test_backbone_mismatch(prompt, model, vit_tiny):
    data = prompt.to_bytes()
    Prompt.from_bytes(data, model)  # fits its own backbone
    other_seed = APTViT(make_vit(seed=1))  # same architecture, other weights
    with pytest.raises(BackboneMismatchError, match="trained on"):
        Prompt.from_bytes(data, other_seed)
    other_size = APTViT(make_vit(seed=0, img_size=48))  # same seed, other pos-embed
    with pytest.raises(BackboneMismatchError):
        Prompt.from_bytes(data, other_size)
    with pytest.raises(BackboneMismatchError):
        Prompt.from_arrays(prompt.arrays(), prompt.config.to_metadata(), APTViT(vit_tiny))
    # without a model the file itself is fine
    assert_same_prompt(Prompt.from_bytes(data), prompt)


def test_width_depth_mismatch_with_forged_fingerprint(prompt, vit_tiny):
    tiny = APTViT(vit_tiny)
    with pytest.raises(PromptShapeError, match="width"):
        Prompt.from_bytes(bad_bytes(prompt, fingerprint=tiny.fingerprint), tiny)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        Prompt.load(tmp_path / "nope.safetensors")


def test_huge_dimensions_in_metadata_rejected_without_allocating(prompt):
    # a forged header must not make the reader allocate terabytes before checking shapes
    with pytest.raises(PromptShapeError):
        Prompt.from_bytes(bad_bytes(prompt, depth=str(10**9), n_memory=str(10**6)))
    with pytest.raises(PromptShapeError):
        Prompt.from_bytes(bad_bytes(prompt, num_classes=str(10**12)))


def test_prompt_without_memory_roundtrip(model):
    p = random_prompt(model, seed=1, n_memory=0, n_prompt=4)
    back = Prompt.from_bytes(p.to_bytes(), model)
    assert_same_prompt(back, p)
    assert back.memory.shape == (model.depth, 0, model.embed_dim)


# --------------------------------------------------------------------------------------
# the source density inside the artefact (format version 2)
# --------------------------------------------------------------------------------------


def with_density(prompt: Prompt, seed: int = 0) -> Prompt:
    """``prompt`` carrying a density fitted on random features of its own classes."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor(prompt.config.labels).repeat(6)
    features = torch.randn(len(labels), prompt.config.embed_dim, generator=gen) + labels[:, None].float()
    prompt.density = SourceDensity.fit(features, labels, rank=3)
    return prompt


def test_round_trip_with_and_without_density(prompt, model):
    plain = Prompt.from_bytes(prompt.to_bytes(), model)
    assert plain.density is None and not any(k.startswith("density.") for k in plain.arrays())
    with_density(prompt)
    again = Prompt.from_bytes(prompt.to_bytes(), model)
    assert_same_prompt(again, prompt)
    assert again.density is not None and prompt.to_bytes() == again.to_bytes()
    for name, value in prompt.density.to_arrays().items():
        assert np.array_equal(again.density.to_arrays()[name], value), name
    assert again.config.to_metadata()["format_version"] == str(FORMAT_VERSION) == "4"


def old_bytes(prompt: Prompt, version: str) -> bytes:
    """An artefact of ``version`` < 4 for ``prompt``'s tensors: its head reads the *mean* of the token
    outputs through the first ``D`` columns of ``prompt``'s head (``[C, D]`` before version 3),
    then, from version 3, the pooled feature through the last ``D`` columns (``[C, 2D]``)."""
    arrays, D = prompt.arrays(), prompt.config.embed_dim
    weight = arrays["head.weight"]
    blocks = [weight[:, :D]] + ([weight[:, -D:]] if version == "3" else [])
    arrays["head.weight"] = np.concatenate(blocks, axis=1)
    return bad_bytes(prompt, arrays, format_version=version)


@pytest.mark.parametrize("version", ["1", "2", "3"])
def test_old_artefact_loads_as_the_same_function(prompt, model, images, version):
    """An older head read the mean of the P token outputs: it loads as one block ``W / P`` per token
    (and zero pooled-feature columns before version 3), giving the old logits."""
    loaded = Prompt.from_bytes(old_bytes(prompt, version), model)
    D, P = model.embed_dim, prompt.config.n_prompt
    assert P > 1 and loaded.head.weight.shape == (NUM_CLASSES, (P + 1) * D)
    weight = prompt.head.weight.detach()
    pooled_block = weight[:, -D:] if version == "3" else torch.zeros_like(weight[:, -D:])
    features, kv = model.backbone_forward(images)
    with torch.no_grad():
        mean_output = model.features_kv(kv, [prompt])[0].reshape(len(images), P, D).mean(1)  # [B, D]
        old = mean_output @ weight[:, :D].T + model.pooled(features) @ pooled_block.T + prompt.head.bias
        old = old.masked_fill(~prompt.label_mask, float("-inf"))
        torch.testing.assert_close(model(images, [loaded])[0], old, rtol=1e-5, atol=1e-5)
    two_blocks = prompt.arrays() | {"head.weight": weight[:, :2 * D].numpy().copy()}
    with pytest.raises(PromptShapeError, match="head.weight"):  # a version-4 head has a block per token
        Prompt.from_bytes(bad_bytes(prompt, two_blocks), model)


def test_version_1_artefact_still_loads_and_composes_uniformly(prompt, model, images):
    loaded = Prompt.from_bytes(old_bytes(prompt, "1"), model)
    assert loaded.density is None and default_weighting([loaded]) is Weighting.UNIFORM
    with_density(prompt)
    with pytest.raises(PromptVersionError, match="version-1 prompt cannot carry a density"):
        Prompt.from_bytes(old_bytes(prompt, "1"), model)


@pytest.mark.parametrize(("change", "match"), [
    (lambda a: a.__setitem__("density.variances", -a["density.variances"]), "positive"),
    (lambda a: a.__setitem__("density.mean", np.full_like(a["density.mean"], np.nan)), "NaN"),
    (lambda a: a.pop("density.basis"), "exactly"),
    (lambda a: a.__setitem__("density.classes", a["density.classes"] + 1), "outside the prompt's label set"),
    (lambda a: a.__setitem__("density.mean", a["density.mean"][:, :5].copy()), "inconsistent shapes"),
    (lambda a: a.__setitem__("density.basis", np.zeros((4, 40, 64), np.float32)), "rank"),
    (lambda a: a.__setitem__("density.junk", np.zeros(1, np.float32)), "exactly"),
])
def test_corrupt_density_is_rejected(prompt, model, change, match):
    arrays = with_density(prompt).arrays()
    change(arrays)
    with pytest.raises(PromptDensityError, match=match):
        Prompt.from_arrays(arrays, prompt.config.to_metadata(), model)


def test_oversized_density_is_rejected(prompt, model, monkeypatch):
    arrays = with_density(prompt).arrays()
    monkeypatch.setattr(density_mod, "MAX_DENSITY_BYTES", 1000)
    with pytest.raises(PromptDensityError, match="byte limit"):
        Prompt.from_arrays(arrays, prompt.config.to_metadata(), model)


@pytest.mark.parametrize("changes", [
    dict(created_at="inf"),
    dict(created_at="nan"),
    dict(created_at="1e12"),
    dict(created_at="-5"),
    dict(num_examples=str(2**64)),
    dict(n_memory="-1"),
    dict(labels="[" * 200_000),
    dict(labels="[1, true]"),
])
def test_out_of_range_metadata_is_rejected(prompt, changes):
    with pytest.raises(PromptFormatError):
        Prompt.from_bytes(bad_bytes(prompt, **changes))


def test_source_seed_is_the_same_in_another_process_and_differs_between_sources():
    """A source's fresh tokens must not depend on the process (``hash`` would: PYTHONHASHSEED)."""
    seeds = [source_seed(f"source-{i}") for i in range(5)]
    assert len(set(seeds)) == 5 and all(0 <= s < 2**32 for s in seeds)
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": repo}
    code = "from common.prompt import source_seed; print(source_seed('source-0'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert int(out.stdout) == seeds[0]
