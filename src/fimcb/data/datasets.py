"""Image datasets by name, each split loaded whole into a uint8 tensor of intensity levels.

Images are ``uint8 [N, C, H, W]`` holding levels ``0 .. num_levels - 1``; :func:`to_float` maps
level ``k`` to ``k / (num_levels - 1)``, which for 8-bit data is exactly torchvision's ``ToTensor``.
All of these datasets are small, so loading a split once beats per-item PIL transforms.

Names (case-insensitive; ``-``, ``_`` and spaces ignored, so ``fashion_mnist`` works):

- ``digits``: scikit-learn's ``load_digits`` (1797 images, 1x8x8, 17 levels), shipped with
  scikit-learn, hence the offline default. It has no official split, so a fixed permutation
  (seed 0, independent of any ``split_seed``) puts 20% (359 images) in ``test``.
- ``mnist``, ``fashionmnist``, ``kmnist``: torchvision, ``ROOT/<MNIST|FashionMNIST|KMNIST>/raw/``.
- ``cifar10``: ``ROOT/cifar10.npz`` when present (it holds only the first 10,000 training images),
  else torchvision's ``ROOT/cifar-10-batches-py/``.
- ``tinyimagenet32``: ``ROOT/tinyimagenet32.npz``, Tiny ImageNet's 10,000 validation photos downscaled to
  3x32x32 (arrays ``x_test``, ``y_test``). It has one split only, so a fixed permutation (seed 0,
  independent of any ``split_seed``) puts 20% (2,000 images) in ``test`` and the rest in ``train``.
- ``svhn``: torchvision, ``ROOT/train_32x32.mat`` and ``ROOT/test_32x32.mat`` (needs scipy).
- ``npz:<path>``: arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``; images uint8 NHWC or NHW.
  A relative path that does not exist is also looked up under ``ROOT``.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

PathLike = str | os.PathLike[str]
SPLITS = ("train", "test")
NPZ_PREFIX = "npz:"


class DatasetInfo(NamedTuple):
    """What a model needs to know about a dataset before any of it is loaded."""

    image_shape: tuple[int, int, int]
    num_levels: int


_INFO: dict[str, DatasetInfo] = {
    "digits": DatasetInfo((1, 8, 8), 17),
    "mnist": DatasetInfo((1, 28, 28), 256),
    "fashionmnist": DatasetInfo((1, 28, 28), 256),
    "kmnist": DatasetInfo((1, 28, 28), 256),
    "cifar10": DatasetInfo((3, 32, 32), 256),
    "svhn": DatasetInfo((3, 32, 32), 256),
    "tinyimagenet32": DatasetInfo((3, 32, 32), 256),
}
DATASET_NAMES: tuple[str, ...] = tuple(_INFO)

_LAYOUT = {
    "mnist": "{root}/MNIST/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte",
    "fashionmnist": "{root}/FashionMNIST/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte",
    "kmnist": "{root}/KMNIST/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte",
    "cifar10": "{root}/cifar10.npz (x_train, y_train, x_test, y_test) or {root}/cifar-10-batches-py/",
    "svhn": "{root}/train_32x32.mat and {root}/test_32x32.mat",
    "tinyimagenet32": "{root}/tinyimagenet32.npz (x_test uint8 NHWC 32x32x3, y_test)",
}

# Datasets shipped as one split get a fixed train/test split, the same whatever a run's split_seed.
_FIXED_TEST_FRACTION = 0.2
_FIXED_SPLIT_SEED = 0


def canonical_name(name: str) -> str:
    """Normalise a dataset name (``Fashion-MNIST`` -> ``fashionmnist``); ``npz:`` paths keep their path."""
    stripped = name.strip()
    if stripped.lower().startswith(NPZ_PREFIX):
        return NPZ_PREFIX + stripped[len(NPZ_PREFIX) :]
    canonical = stripped.lower().replace("-", "").replace("_", "").replace(" ", "")
    if canonical not in _INFO:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}, npz:<path>")
    return canonical


def is_dataset_name(name: str) -> bool:
    """Whether ``name`` names a dataset (rather than, say, an OOD transform)."""
    try:
        canonical_name(name)
    except ValueError:
        return False
    return True


def resolve_root(root: PathLike | None) -> Path:
    return Path(os.environ.get("FIMCB_DATA_ROOT", "data") if root is None else root).expanduser()


def _npz_path(name: str, root: PathLike | None) -> Path:
    path = Path(name[len(NPZ_PREFIX) :]).expanduser()
    if not path.is_absolute() and not path.exists() and (resolve_root(root) / path).exists():
        return resolve_root(root) / path
    if not path.exists():
        searched = [path.resolve()] + ([] if path.is_absolute() else [(resolve_root(root) / path).resolve()])
        raise FileNotFoundError(
            f"dataset {name!r}: no file at {' or '.join(map(str, searched))}. "
            "Expected an .npz with uint8 arrays x_train, y_train, x_test, y_test (images NHWC or NHW). "
            "Fix: give an existing path, e.g. --data.dataset npz:/abs/path/data.npz, or put the file under "
            "--data.root PATH (or FIMCB_DATA_ROOT) and give its path relative to that root."
        )
    return path


def _npz_image_shape(path: Path) -> tuple[int, ...]:
    """Shape of ``x_train`` read from the .npy header inside the zip, without loading the array."""
    with zipfile.ZipFile(path) as archive, archive.open("x_train.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, _, _ = read_header(f)
    return shape


def _chw(shape: tuple[int, ...], source: str) -> tuple[int, int, int]:
    if len(shape) == 3:
        return (1, shape[1], shape[2])
    if len(shape) == 4:
        return (shape[3], shape[1], shape[2])
    raise ValueError(f"{source}: images must be NHW or NHWC, got an array of shape {shape}")


def dataset_info(name: str, root: PathLike | None = None) -> DatasetInfo:
    """Image shape ``(C, H, W)`` and number of levels, from a static table or an npz header."""
    canonical = canonical_name(name)
    if canonical.startswith(NPZ_PREFIX):
        path = _npz_path(canonical, root)
        return DatasetInfo(_chw(_npz_image_shape(path), str(path)), 256)
    return _INFO[canonical]


def to_float(images: Tensor, num_levels: int) -> Tensor:
    """Levels ``k`` -> float32 ``k / (num_levels - 1)`` in ``[0, 1]`` (ToTensor for 8-bit data)."""
    return images.to(torch.float32).div(num_levels - 1)


def _missing(name: str, root: Path, cause: Exception) -> FileNotFoundError:
    layout = _LAYOUT[name].format(root=root.resolve())
    return FileNotFoundError(
        f"dataset {name!r} not found under root {str(root.resolve())!r} ({cause}). "
        f"Expected layout: {layout}. "
        "Fix: point --data.root PATH (or the FIMCB_DATA_ROOT environment variable) at a folder holding it, "
        "or pass --data.download true to download it there."
    )


def _fixed_split(images: Tensor, targets: Tensor, split: str) -> tuple[Tensor, Tensor]:
    """The ``split`` part of a dataset that ships as one split: 20% test by a permutation fixed once."""
    n = len(targets)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_FIXED_SPLIT_SEED))
    n_test = round(_FIXED_TEST_FRACTION * n)
    idx = (perm[:n_test] if split == "test" else perm[n_test:]).sort().values
    return images[idx].contiguous(), targets[idx]


def _load_digits(split: str) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.uint8))[:, None]
    return _fixed_split(images, torch.from_numpy(digits.target.astype(np.int64)), split)


def _load_tinyimagenet32(root: Path, split: str) -> tuple[Tensor, Tensor]:
    path = root / "tinyimagenet32.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset 'tinyimagenet32' not found: no file {path.resolve()}. Expected layout: "
            f"{_LAYOUT['tinyimagenet32'].format(root=root.resolve())}; it is built offline (there is no "
            "download). Fix: point --data.root PATH (or FIMCB_DATA_ROOT) at the folder that holds it."
        )
    images, targets = _load_arrays(path, "test", str(path))
    return _fixed_split(images, targets, split)


def _load_arrays(path: Path, split: str, source: str) -> tuple[Tensor, Tensor]:
    with np.load(path) as arrays:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.dtype != np.uint8:
        raise ValueError(f"{source}: x_{split} must be uint8 (0..255), got {x.dtype}")
    _chw(x.shape, source)
    images = torch.from_numpy(x)
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.from_numpy(y.astype(np.int64)).reshape(-1)


def _torchvision_dataset(name: str, root: Path, split: str, download: bool) -> Any:
    from torchvision import datasets

    train = split == "train"
    if name == "svhn":
        return datasets.SVHN(os.fspath(root), split=split, download=download)
    cls = {
        "mnist": datasets.MNIST,
        "fashionmnist": datasets.FashionMNIST,
        "kmnist": datasets.KMNIST,
        "cifar10": datasets.CIFAR10,
    }[name]
    return cls(os.fspath(root), train=train, download=download)


def _load_torchvision(name: str, root: Path, split: str, download: bool) -> tuple[Tensor, Tensor]:
    try:
        ds = _torchvision_dataset(name, root, split, download)
    except RuntimeError as error:
        if "not found" in str(error).lower():
            raise _missing(name, root, error) from error
        raise
    if name == "svhn":  # data: uint8 NCHW array, labels: int array
        return torch.from_numpy(ds.data).contiguous(), torch.from_numpy(ds.labels.astype(np.int64))
    if name == "cifar10":  # data: uint8 NHWC array, targets: list
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(ds.targets, dtype=torch.int64)
    return ds.data[:, None].contiguous(), ds.targets.to(torch.int64)


def load_image_dataset(
    name: str, root: PathLike | None, split: str, download: bool = False
) -> tuple[Tensor, Tensor, int]:
    """Load one split of a dataset whole: ``(images uint8 [N,C,H,W], targets int64 [N], num_levels)``.

    ``root=None`` means ``$FIMCB_DATA_ROOT`` or ``data``. Raises FileNotFoundError, saying where it
    looked and how to fix it, when the data is not there and ``download`` is False.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    canonical = canonical_name(name)
    path_root = resolve_root(root)
    if canonical == "digits":
        images, targets = _load_digits(split)
    elif canonical.startswith(NPZ_PREFIX):
        images, targets = _load_arrays(_npz_path(canonical, root), split, canonical)
    elif canonical == "cifar10" and (path_root / "cifar10.npz").is_file():
        images, targets = _load_arrays(path_root / "cifar10.npz", split, "cifar10.npz")
    elif canonical == "tinyimagenet32":
        images, targets = _load_tinyimagenet32(path_root, split)
    else:
        images, targets = _load_torchvision(canonical, path_root, split, download)
    return images, targets, dataset_info(canonical, root).num_levels


def download_dataset(name: str, root: PathLike | None) -> None:
    """Download both splits of a torchvision dataset into ``root``; nothing for local or embedded ones."""
    canonical = canonical_name(name)
    path_root = resolve_root(root)
    if canonical in ("digits", "tinyimagenet32") or canonical.startswith(NPZ_PREFIX):
        return  # tinyimagenet32 has no download source: it is built offline (see its layout)
    if canonical == "cifar10" and (path_root / "cifar10.npz").is_file():
        return
    for split in SPLITS:
        _torchvision_dataset(canonical, path_root, split, download=True)
