"""Tests of common.data on small files generated in tmp_path (no network)."""

from __future__ import annotations

import gzip
import os
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import cifar_rows, dump_pickle

from common import data
from common.data import (
    DatasetNotFoundError,
    FileImageDataset,
    Partitioner,
    Shard,
    backbone_data_config,
    backbone_transform,
    image_transform,
    limit_per_partition,
    load_client_shard,
    load_local_dataset,
    load_split,
    partition_indices,
    train_val_split,
)

CONFIG = {"input_size": (3, 16, 20), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.5, 1.0),
          "interpolation": "bilinear"}


@pytest.fixture(autouse=True)
def _fresh_caches():
    data._load_split_cached.cache_clear()
    data._cached_partitions.cache_clear()
    yield
    data._load_split_cached.cache_clear()
    data._cached_partitions.cache_clear()


def images_and_labels(n: int, num_classes: int, shape: tuple[int, ...], seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    return images, np.arange(n, dtype=np.uint8) % num_classes


def write_idx(path: Path, array: np.ndarray) -> None:
    payload = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_idx_dataset(folder: Path, n_train: int = 30, n_test: int = 10, gz: bool = True):
    suffix = ".gz" if gz else ""
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = images_and_labels(n, 10, (28, 28), seed=n)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        out[prefix] = (images, labels)
    return out


def write_png_tree(root: Path, per_class: dict[str, int], mode: str = "RGB") -> None:
    for c, (name, n) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            Image.new(mode, (12, 10), color=(c * 40, k * 10, 7)[: len(mode)] if mode == "RGB" else c * 40).save(
                root / name / f"img{k}.png"
            )


def hf_dataset(n: int, names: list[str] | None = None, image_col: str = "image", label_col: str = "label"):
    import datasets

    images = [Image.new("L", (8, 6), color=k * 10) for k in range(n)]
    labels = [k % 3 for k in range(n)]
    label_feature = datasets.ClassLabel(names=names) if names else datasets.Value("int64")
    features = datasets.Features({image_col: datasets.Image(), label_col: label_feature})
    return datasets.Dataset.from_dict({image_col: images, label_col: labels}, features=features)


# --------------------------------------------------------------------------- IDX


def test_idx_gz_round_trip_and_grayscale_to_rgb(tmp_path):
    written = write_idx_dataset(tmp_path)
    train = load_split("fashion_mnist", tmp_path, "train")
    test = load_split("fashion-mnist", str(tmp_path), "test")
    assert (len(train), len(test)) == (30, 10)
    assert train.labels.dtype == np.int64
    np.testing.assert_array_equal(train.labels, written["train"][1])
    assert train.classes[0] == "T-shirt/top" and len(train.classes) == 10
    image, label = train[3]
    assert image.mode == "RGB" and image.size == (28, 28)
    assert label == int(written["train"][1][3])
    rgb = np.asarray(image)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], written["train"][0][3])


def test_idx_uncompressed_in_torchvision_layout(tmp_path):
    write_idx_dataset(tmp_path / "MNIST" / "raw", gz=False)
    ds = load_split("mnist", tmp_path, "test")
    assert len(ds) == 10 and ds.classes == [str(d) for d in range(10)]


def test_idx_truncated_file_is_rejected(tmp_path):
    write_idx_dataset(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "rb") as f:
        payload = f.read()
    with gzip.open(path, "wb") as f:
        f.write(payload[:-5])
    with pytest.raises(ValueError, match="truncated"):
        load_split("fashion_mnist", tmp_path, "test")


def test_fashion_mnist_default_locations(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", debian)
    assets = types.ModuleType("common.assets")
    assets.default_data_dir = lambda: tmp_path / "home"
    monkeypatch.setitem(sys.modules, "common.assets", assets)
    with pytest.raises(DatasetNotFoundError, match="data_dir"):
        load_split("fashion_mnist", None, "train")
    write_idx_dataset(tmp_path / "home" / "fashion-mnist", n_train=12)
    assert len(load_split("fashion_mnist", None, "train")) == 12
    data._load_split_cached.cache_clear()
    write_idx_dataset(debian, n_train=7)
    assert len(load_split("fashion_mnist", "", "train")) == 7


def test_mnist_has_no_default_location(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="data_dir"):
        load_split("mnist", None, "train")


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_pickle_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    names = [f"c{k}".encode() for k in range(10)]
    dump_pickle(folder / "batches.meta", {"label_names": names})
    batches = {}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        images, labels = images_and_labels(4, 10, (32, 32, 3), seed=len(batches))
        dump_pickle(folder / name, {"data": cifar_rows(images), "labels": labels.tolist()})
        batches[name] = (images, labels)
    train = load_split("cifar10", tmp_path, "train")
    test = load_split("cifar10", folder, "test")
    assert (len(train), len(test)) == (20, 4)
    assert train.classes == [f"c{k}" for k in range(10)]
    image, label = train[5]  # second image of data_batch_2
    np.testing.assert_array_equal(np.asarray(image), batches["data_batch_2"][0][1])
    assert label == batches["data_batch_2"][1][1]


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    dump_pickle(folder / "meta", {"fine_label_names": [f"f{k}".encode() for k in range(100)],
                                  "coarse_label_names": [b"x"] * 20})
    for split, n in (("train", 6), ("test", 3)):
        images, _ = images_and_labels(n, 100, (32, 32, 3))
        dump_pickle(folder / split, {"data": cifar_rows(images), "fine_labels": [99, 50, 1, 2, 3, 4][:n],
                                     "coarse_labels": [0] * n})
    test = load_split("cifar100", folder, "test")
    assert len(test) == 3 and len(test.classes) == 100
    np.testing.assert_array_equal(test.labels, [99, 50, 1])
    assert test[0][0].size == (32, 32)


def test_cifar_missing_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        load_split("cifar10", tmp_path, "train")


# --------------------------------------------------------------------------- ImageFolder


def test_imagefolder_with_split_folders(tmp_path):
    write_png_tree(tmp_path / "train", {"cat": 3, "dog": 2}, mode="L")
    write_png_tree(tmp_path / "val", {"cat": 1, "dog": 1, "emu": 1}, mode="L")
    train = load_split("imagefolder", tmp_path, "train")
    test = load_split("imagefolder", tmp_path, "test")
    assert isinstance(train, FileImageDataset)
    assert train.classes == test.classes == ["cat", "dog", "emu"]
    np.testing.assert_array_equal(train.labels, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(test.labels, [0, 1, 2])
    image, label = test[2]
    assert image.mode == "RGB" and image.size == (12, 10) and label == 2


def test_imagefolder_flat_holdout_is_deterministic_and_disjoint(tmp_path):
    write_png_tree(tmp_path, {"a": 10, "b": 5})
    train = load_split("imagefolder", tmp_path, "train")
    test = load_split("imagefolder", tmp_path, "test")
    assert (len(train), len(test)) == (12, 3)
    assert not set(train.paths) & set(test.paths)
    assert set(train.paths) | set(test.paths) == set(tmp_path.rglob("*.png"))
    np.testing.assert_array_equal(np.bincount(test.labels), [2, 1])
    data._load_split_cached.cache_clear()
    assert load_split("imagefolder", tmp_path, "test").paths == test.paths


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError):
        load_split("imagefolder", tmp_path / "missing", "train")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no images"):
        load_split("imagefolder", tmp_path, "train")
    write_png_tree(tmp_path / "other" / "train", {"a": 1})
    with pytest.raises(DatasetNotFoundError, match="test split"):
        load_split("imagefolder", tmp_path / "other", "test")


# --------------------------------------------------------------------------- Hugging Face


def test_hf_disk_dataset_dict(tmp_path):
    import datasets

    names = ["x", "y", "z"]
    datasets.DatasetDict({"train": hf_dataset(9, names), "test": hf_dataset(4, names)}).save_to_disk(tmp_path)
    train = load_split("hf-disk", tmp_path, "train")
    test = load_split("hf_disk", tmp_path, "test")
    assert (len(train), len(test)) == (9, 4)
    assert train.classes == names
    np.testing.assert_array_equal(test.labels, [0, 1, 2, 0])
    image, label = test[1]
    assert image.mode == "RGB" and image.size == (8, 6) and label == 1
    assert np.asarray(image)[0, 0].tolist() == [10, 10, 10]


def test_hf_disk_single_dataset_holdout_and_plain_int_labels(tmp_path):
    hf_dataset(10, None, image_col="img").save_to_disk(tmp_path)
    train = load_split("hf-disk", tmp_path, "train")
    test = load_split("hf-disk", tmp_path, "test")
    assert len(train) + len(test) == 10 and len(test) == 3  # one per class (4, 3, 3)
    assert train.classes == ["0", "1", "2"]
    pixels = {np.asarray(train[i][0])[0, 0, 0] for i in range(len(train))}
    pixels |= {np.asarray(test[i][0])[0, 0, 0] for i in range(len(test))}
    assert len(pixels) == 10


def test_hf_disk_errors(tmp_path):
    import datasets

    with pytest.raises(DatasetNotFoundError, match="save_to_disk"):
        load_split("hf-disk", tmp_path, "train")
    no_image = datasets.Dataset.from_dict({"x": [1, 2], "label": [0, 1]})
    no_image.save_to_disk(tmp_path / "noimg")
    with pytest.raises(ValueError, match="no image column"):
        load_split("hf-disk", tmp_path / "noimg", "train")


def test_hub_name_failure_says_pass_data_dir(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetNotFoundError, match="data_dir"):
        load_split("zalando-datasets/fashion_mnist", None, "train")


def test_hub_name_uses_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake(name, split, cache_dir):
        calls.append((name, split, cache_dir))
        return hf_dataset(5, ["a", "b", "c"], image_col="img")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    ds = load_split("uoft-cs/cifar10", None, "test")
    assert calls == [("uoft-cs/cifar10", "test", None)]
    assert len(ds) == 5 and ds.classes == ["a", "b", "c"]


# --------------------------------------------------------------------------- names and splits


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="supported: mnist, fashion_mnist"):
        load_split("svhn", "/nowhere", "train")
    with pytest.raises(ValueError, match="split"):
        load_split("mnist", "/nowhere", "validation")


def test_missing_idx_files_error_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_split("fashion_mnist", tmp_path, "train")


def test_load_split_is_cached_per_process(tmp_path):
    write_idx_dataset(tmp_path)
    assert load_split("fashion_mnist", tmp_path, "train") is load_split("fashion-mnist", str(tmp_path), "train")


# --------------------------------------------------------------------------- transforms


def test_image_transform_shape_and_normalisation():
    transform = image_transform(CONFIG)
    white = transform(Image.new("L", (28, 28), 255))
    assert white.shape == (3, 16, 20) and white.dtype == torch.float32
    torch.testing.assert_close(white[:, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
    black = transform(Image.new("RGB", (5, 7)))
    torch.testing.assert_close(black[:, 3, 3], torch.tensor([-2.0, -1.0, -0.5]))
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8))
    assert torch.equal(transform(noisy), transform(noisy))


def test_image_transform_bad_interpolation():
    with pytest.raises(ValueError, match="interpolation"):
        image_transform({**CONFIG, "interpolation": "random"})


def test_backbone_transform_uses_built_image_size():
    import timm

    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    config = backbone_data_config(backbone)
    assert config["input_size"] == (3, 32, 32)
    assert backbone_transform(backbone)(Image.new("RGB", (28, 28))).shape == (3, 32, 32)


# --------------------------------------------------------------------------- partitions


LABELS = np.repeat(np.arange(10), 30)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_random_partitioners_are_deterministic_disjoint_and_complete(partitioner):
    parts = partition_indices(LABELS, 4, partitioner, alpha=0.5, seed=3)
    again = partition_indices(LABELS, 4, partitioner, alpha=0.5, seed=3)
    other = partition_indices(LABELS, 4, partitioner, alpha=0.5, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == len(LABELS)
    assert all(np.all(np.diff(p) > 0) and p.dtype == np.int64 for p in parts)


def test_iid_sizes_are_balanced():
    assert sorted(len(p) for p in partition_indices(LABELS, 7, "iid")) == [42] * 1 + [43] * 6


def test_partitioner_enum_and_its_value_give_the_same_shards():
    by_enum = partition_indices(LABELS, 3, Partitioner.DIRICHLET, alpha=0.5, seed=1)
    by_value = partition_indices(LABELS, 3, "dirichlet", alpha=0.5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(by_enum, by_value))


def test_classes_partitioner_gives_disjoint_class_groups():
    parts = partition_indices(LABELS, 3, "classes")
    label_sets = [sorted(set(LABELS[p].tolist())) for p in parts]
    assert label_sets == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert sum(len(p) for p in parts) == len(LABELS)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((LABELS, 11, "classes"), {}, "only 10 classes"),
        ((LABELS, 2, "shards"), {}, "unknown partitioner 'shards'; use one of iid, dirichlet, classes"),
        ((LABELS, 0, "iid"), {}, "positive integer"),
        ((LABELS, 2, "dirichlet"), {"alpha": 0.0}, "alpha"),
        ((LABELS.reshape(30, 10), 2, "iid"), {}, "1-D integer"),
        ((LABELS[:5], 6, "iid"), {}, "cannot fill"),
        ((LABELS, 4, "classes"), {"min_size": 70}, r"partitions \[2, 3\] have fewer"),
    ],
)
def test_partition_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        partition_indices(*args, **kwargs)


def test_limit_and_train_val_split():
    indices = np.arange(100, 200)
    limited = limit_per_partition(indices, 30, seed=1)
    assert len(limited) == 30 and set(limited) <= set(indices)
    assert np.array_equal(limited, limit_per_partition(indices, 30, seed=1))
    assert np.array_equal(limit_per_partition(indices, None), indices)
    assert np.array_equal(limit_per_partition(indices, 0), indices)
    with pytest.raises(ValueError):
        limit_per_partition(indices, -1)
    train, val = train_val_split(limited, 0.2, seed=5)
    assert (len(train), len(val)) == (24, 6)
    assert sorted(np.concatenate([train, val]).tolist()) == limited.tolist()
    assert np.array_equal(val, train_val_split(limited, 0.2, seed=5)[1])
    assert len(train_val_split(np.array([7]), 0.5)[0]) == 1
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(limited, 1.0)


# --------------------------------------------------------------------------- shards


def test_shard_yields_global_indices(tmp_path):
    written = write_idx_dataset(tmp_path)
    raw = load_split("fashion_mnist", tmp_path, "train")
    shard = Shard(raw, [2, 5, 11], image_transform(CONFIG))
    assert len(shard) == 3
    np.testing.assert_array_equal(shard.labels, written["train"][1][[2, 5, 11]])
    assert shard.label_set() == sorted({2, 5, 1})
    image, label, index = shard[1]
    assert image.shape == (3, 16, 20) and (label, index) == (5, 5)
    batch = next(iter(torch.utils.data.DataLoader(shard, batch_size=3)))
    assert batch[0].shape == (3, 3, 16, 20) and batch[2].tolist() == [2, 5, 11]
    with pytest.raises(IndexError):
        Shard(raw, [30], image_transform(CONFIG))


def test_load_client_shard_partitions_train_split(tmp_path):
    write_idx_dataset(tmp_path, n_train=60)
    shards = [
        load_client_shard("fashion_mnist", tmp_path, k, 5, "classes", max_examples=10,
                          val_fraction=0.2, transform=image_transform(CONFIG))
        for k in range(5)
    ]
    for k, (train, val) in enumerate(shards):
        assert (len(train), len(val)) == (8, 2)
        assert set(train.label_set()) | set(val.label_set()) <= {2 * k, 2 * k + 1}
        assert not set(train.indices) & set(val.indices)
    with pytest.raises(ValueError, match="partition_id"):
        load_client_shard("fashion_mnist", tmp_path, 5, 5, transform=image_transform(CONFIG))


def test_load_local_dataset(tmp_path):
    write_png_tree(tmp_path / "train", {"a": 6, "b": 4})
    train, val = load_local_dataset(tmp_path, "imagefolder", image_transform(CONFIG), max_examples=8,
                                    val_fraction=0.25)
    assert (len(train), len(val)) == (6, 2)
    assert train[0][0].shape == (3, 16, 20)
    assert train.classes == ["a", "b"]


# --------------------------------------------------------------------------- real data


def _real_fashion_mnist_dir() -> Path | None:
    for candidate in (os.environ.get("ALACARTE_TEST_FMNIST"), str(data.DEBIAN_FASHION_MNIST_DIR)):
        if candidate and (Path(candidate) / "train-images-idx3-ubyte.gz").is_file():
            return Path(candidate)
    return None


@pytest.mark.skipif(_real_fashion_mnist_dir() is None,
                    reason="real Fashion-MNIST not found: set ALACARTE_TEST_FMNIST to its IDX folder")
def test_real_fashion_mnist():
    folder = _real_fashion_mnist_dir()
    train = load_split("fashion_mnist", folder, "train")
    test = load_split("fashion_mnist", folder, "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert len(train.classes) == 10
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    image, _ = train[0]
    assert image.mode == "RGB" and image.size == (28, 28)
