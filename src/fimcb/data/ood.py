"""Out-of-distribution sets: other datasets, transforms of the in-distribution test split, natural patches.

Every set is uint8 levels on the in-distribution grid (same ``image_shape`` and ``num_levels``) and
deterministic given its seed. Names:

- a dataset name (see :mod:`fimcb.data.datasets`): its test split, requantised to the ID levels;
  it must have the ID image shape.
- :data:`OOD_TRANSFORMS` of the ID test split: ``vflip``, ``hflip``, ``noise`` (i.i.d. uniform
  levels), ``constant`` (each image one uniform level), ``invert`` (``k -> L - 1 - k``).
- ``sample_patches``: crops of scikit-learn's two sample photos (china.jpg, flower.jpg), real
  natural-image structure available offline.

Targets: flips and ``invert`` keep the source image's class, other datasets their own classes,
and ``noise``, ``constant`` and ``sample_patches`` have target ``-1`` (no class).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import lru_cache
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fimcb.data.datasets import (
    DATASET_NAMES,
    PathLike,
    canonical_name,
    dataset_info,
    is_dataset_name,
    load_image_dataset,
)
from fimcb.data.splits import subset_indices

OODTransform = Callable[[Tensor, int, torch.Generator], Tensor]
"""``(images uint8 [N,C,H,W], num_levels, generator) -> images uint8 [N,C,H,W]``."""


def _vflip(images: Tensor, num_levels: int, generator: torch.Generator) -> Tensor:
    return images.flip(-2)


def _hflip(images: Tensor, num_levels: int, generator: torch.Generator) -> Tensor:
    return images.flip(-1)


def _noise(images: Tensor, num_levels: int, generator: torch.Generator) -> Tensor:
    return torch.randint(0, num_levels, images.shape, generator=generator, dtype=torch.uint8)


def _constant(images: Tensor, num_levels: int, generator: torch.Generator) -> Tensor:
    levels = torch.randint(0, num_levels, (len(images), 1, 1, 1), generator=generator, dtype=torch.uint8)
    return levels.expand_as(images).contiguous()


def _invert(images: Tensor, num_levels: int, generator: torch.Generator) -> Tensor:
    return (num_levels - 1) - images


OOD_TRANSFORMS: dict[str, OODTransform] = {
    "vflip": _vflip,
    "hflip": _hflip,
    "noise": _noise,
    "constant": _constant,
    "invert": _invert,
}
SAMPLE_PATCHES = "sample_patches"
_UNLABELLED = frozenset({"noise", "constant", SAMPLE_PATCHES})

# A patch spans 1/4 of the downscaled photo's shorter side, and must span an eighth of the level
# range: enough structure to be a picture, not a flat piece of sky.
_PATCHES_PER_SIDE = 4
_MIN_PATCH_RANGE = 1 / 8


def valid_ood_names() -> list[str]:
    """Every accepted OOD name (``npz:<path>`` stands for any npz dataset)."""
    return [*DATASET_NAMES, "npz:<path>", *OOD_TRANSFORMS, SAMPLE_PATCHES]


def default_ood(dataset: str) -> list[str]:
    """Offline-safe OOD sets for a dataset: a same-shaped dataset where one ships, else transforms."""
    name = canonical_name(dataset)
    if name == "digits":
        return [SAMPLE_PATCHES, "vflip", "noise"]
    if name in ("mnist", "kmnist"):
        return ["fashionmnist", "vflip", "noise"]
    if name == "fashionmnist":
        return ["mnist", "vflip", "noise"]
    return ["vflip", "hflip", "noise", "constant"]


def canonical_ood_name(name: str) -> str:
    """Normalise an OOD name; ValueError listing the valid names when it is none of them."""
    key = name.strip().lower()
    if key in OOD_TRANSFORMS or key == SAMPLE_PATCHES:
        return key
    if is_dataset_name(name):
        return canonical_name(name)
    raise ValueError(f"unknown OOD set {name!r}; valid names: {', '.join(valid_ood_names())}")


def check_ood_name(
    name: str, dataset: str, image_shape: tuple[int, int, int], root: PathLike | None = None
) -> str:
    """Canonical OOD name, after checking that it can be paired with the in-distribution ``dataset``."""
    ood = canonical_ood_name(name)
    if not is_dataset_name(ood):
        if ood == SAMPLE_PATCHES and image_shape[0] not in (1, 3):
            raise ValueError(f"sample_patches needs 1 or 3 channels, the images have shape {image_shape}")
        return ood
    if ood == canonical_name(dataset):
        raise ValueError(f"OOD set {name!r} is the in-distribution dataset itself; pick another one")
    ood_shape = dataset_info(ood, root).image_shape
    if tuple(ood_shape) != tuple(image_shape):
        raise ValueError(
            f"OOD dataset {ood!r} has images of shape {tuple(ood_shape)} but the in-distribution dataset "
            f"{canonical_name(dataset)!r} has {tuple(image_shape)}; pick an OOD dataset of the same shape, "
            "or "
            f"a transform of the test split ({', '.join(OOD_TRANSFORMS)}) or {SAMPLE_PATCHES}"
        )
    return ood


def requantize(images: Tensor, from_levels: int, to_levels: int) -> Tensor:
    """Map levels ``k`` of a ``from_levels`` grid to the nearest level of a ``to_levels`` grid."""
    if from_levels == to_levels:
        return images
    scaled = images.to(torch.float64) * ((to_levels - 1) / (from_levels - 1))
    return scaled.round().to(torch.uint8)


@lru_cache(maxsize=8)
def natural_images(channels: int, patch_side: int, num_levels: int) -> tuple[Tensor, ...]:
    """scikit-learn's sample photos as uint8 levels ``[C, h, w]``, the shorter side ``4 * patch_side``.

    Grayscale (ITU-R 601 luma) when ``channels == 1``; area-downscaled so that a patch of
    ``patch_side`` pixels shows a recognisable piece of the scene. Cached; do not modify in place.
    """
    from sklearn.datasets import load_sample_images

    out = []
    for photo in load_sample_images().images:
        x = torch.from_numpy(np.array(photo, dtype=np.float32)).permute(2, 0, 1)
        if channels == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
        h, w = x.shape[1:]
        short = _PATCHES_PER_SIDE * patch_side
        size = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
        x = F.interpolate(x[None], size=size, mode="area")[0]
        out.append((x / 255 * (num_levels - 1)).round().clamp(0, num_levels - 1).to(torch.uint8))
    return tuple(out)


def sample_patches(
    n: int, image_shape: tuple[int, int, int], num_levels: int, generator: torch.Generator
) -> Tensor:
    """``n`` crops ``uint8 [n, C, H, W]`` of :func:`natural_images`, at seeded positions.

    Only crops spanning at least an eighth of the level range are used; they are drawn without
    repetition until all have been used.
    """
    c, h, w = image_shape
    if c not in (1, 3):
        raise ValueError(f"sample_patches needs 1 or 3 channels, got image shape {image_shape}")
    sources = natural_images(c, max(h, w), num_levels)
    candidates = []
    for i, src in enumerate(sources):
        windows = src.unfold(1, h, 1).unfold(2, w, 1)  # [C, rows, cols, h, w]
        spread = windows.amax(dim=(0, 3, 4)).int() - windows.amin(dim=(0, 3, 4)).int()
        rows, cols = torch.nonzero(spread >= _MIN_PATCH_RANGE * (num_levels - 1), as_tuple=True)
        candidates.append(torch.stack([torch.full_like(rows, i), rows, cols], dim=1))
    positions = torch.cat(candidates)
    order = torch.randperm(len(positions), generator=generator)
    picks = positions[order[torch.arange(n) % len(order)]]
    return torch.stack([sources[i][:, y : y + h, x : x + w] for i, y, x in picks.tolist()])


def ood_generator(name: str, seed: int) -> torch.Generator:
    """A generator seeded by the OOD set's name and ``seed``, so each set has its own stream."""
    return torch.Generator().manual_seed(zlib.crc32(f"{name}:{seed}".encode()))


def make_ood_set(
    name: str,
    *,
    id_test_images: Tensor,
    id_test_targets: Tensor,
    num_levels: int,
    size: int,
    seed: int = 0,
    root: PathLike | None = None,
    download: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Build one OOD set: ``(images uint8 [n,C,H,W], targets int64 [n], source_index int64 [n])``.

    ``id_test_images``/``id_test_targets`` are the full in-distribution test split; transforms use
    its subset :func:`~fimcb.data.splits.subset_indices` ``(N, size, seed)``, the same subset the
    test set uses when the sizes match. ``source_index`` is each image's index in the split it was
    made from (the ID or the OOD dataset's test split), ``-1`` for ``sample_patches``.
    """
    image_shape = cast(tuple[int, int, int], tuple(id_test_images.shape[1:]))
    if name == SAMPLE_PATCHES:
        images = sample_patches(size, image_shape, num_levels, ood_generator(name, seed))
        minus_one = torch.full((size,), -1, dtype=torch.int64)
        return images, minus_one, minus_one.clone()
    if name in OOD_TRANSFORMS:
        idx = subset_indices(len(id_test_images), size, seed)
        images = OOD_TRANSFORMS[name](id_test_images[idx], num_levels, ood_generator(name, seed))
        targets = torch.full_like(idx, -1) if name in _UNLABELLED else id_test_targets[idx]
        return images, targets, idx
    images, targets, levels = load_image_dataset(name, root, "test", download)
    if tuple(images.shape[1:]) != image_shape:
        raise ValueError(
            f"OOD dataset {name!r} has shape {tuple(images.shape[1:])}, the ID images {image_shape}"
        )
    idx = subset_indices(len(images), size, seed)
    return requantize(images[idx], levels, num_levels), targets[idx], idx
