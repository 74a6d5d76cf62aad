"""Lightning datamodule: train/val/test splits of an image dataset plus named OOD sets.

Batches are ``(x float32 [B,C,H,W] in [0,1], target int64 [B], sample_id int64 [B])``; a sample's
id is its position in its split (``0 .. len - 1``), the same on every pass and every run with the
same arguments, so per-sample scores can be matched across epochs and checkpoints.
"""

from __future__ import annotations

import lightning as L
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fimcb.data.datasets import (
    canonical_name,
    dataset_info,
    download_dataset,
    is_dataset_name,
    load_image_dataset,
    resolve_root,
    to_float,
)
from fimcb.data.ood import check_ood_name, default_ood, make_ood_set
from fimcb.data.splits import subset_indices, train_val_indices


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool = False) -> DataLoader:
    """The loader every fimcb datamodule hands out (workers kept alive between epochs when there are any)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


class ImageSplit(Dataset):
    """One split held whole as uint8 levels; item ``i`` is ``(x float32 [C,H,W], target, i)``.

    ``source_index[i]`` is the sample's index in the dataset split it was taken from (``-1`` for
    synthetic samples), to check disjointness and trace a sample back to its origin.
    """

    def __init__(self, images: Tensor, targets: Tensor, num_levels: int, source_index: Tensor) -> None:
        if not len(images) == len(targets) == len(source_index):
            raise ValueError(
                f"lengths differ: {len(images)} images, {len(targets)} targets, {len(source_index)}"
            )
        self.images = images
        self.targets = targets
        self.num_levels = num_levels
        self.source_index = source_index

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return to_float(self.images[i], self.num_levels), self.targets[i], i


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


class ImageDataModule(L.LightningDataModule):
    """Image dataset splits for likelihood models, with OOD sets for novelty scoring.

    Args:
        dataset: ``digits`` (offline default), ``mnist``, ``fashionmnist``, ``kmnist``, ``cifar10``,
            ``svhn`` or ``npz:<path>``; see :mod:`fimcb.data.datasets`.
        root: folder holding the datasets; None means ``$FIMCB_DATA_ROOT`` or ``data``.
        download: let torchvision download missing datasets into ``root`` (in ``prepare_data``).
        ood: OOD set names (see :mod:`fimcb.data.ood`); None picks :func:`~fimcb.data.ood.default_ood`.
        val_size: validation samples taken from the training split: a count (int) or a fraction (float).
        train_size: cap on the training samples left after the validation set (None: all of them).
        test_size: cap on the official test split, a deterministic subset (None: all of it).
        ood_size: cap on each OOD set (None: the size of the test set).
        batch_size: training batch size.
        eval_batch_size: batch size of val/test/OOD loaders (None: ``batch_size``).
        num_workers: DataLoader worker processes.
        split_seed: seed of the train/val permutation, the test subset and the OOD sets.
    """

    def __init__(
        self,
        dataset: str = "digits",
        root: str | None = None,
        download: bool = False,
        ood: list[str] | None = None,
        val_size: int | float = 0.1,
        train_size: int | None = None,
        test_size: int | None = None,
        ood_size: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name, value in [
            ("train_size", train_size),
            ("test_size", test_size),
            ("ood_size", ood_size),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
        ]:
            _check_positive(name, value)
        self.dataset = canonical_name(dataset)
        self.root = resolve_root(root)
        self.download = download
        self.val_size = val_size
        self.train_size = train_size
        self.test_size = test_size
        self.ood_size = ood_size
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = num_workers
        self.split_seed = split_seed
        self._info = dataset_info(self.dataset, self.root)
        names = default_ood(self.dataset) if ood is None else ood
        checked = [check_ood_name(name, self.dataset, self._info.image_shape, self.root) for name in names]
        self.ood_names: list[str] = list(dict.fromkeys(checked))
        self.train_set: ImageSplit | None = None
        self.val_set: ImageSplit | None = None
        self.test_set: ImageSplit | None = None
        self._test_split: tuple[Tensor, Tensor] | None = None
        self._ood_sets: dict[str, ImageSplit] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image, known before ``setup``."""
        return self._info.image_shape

    @property
    def num_levels(self) -> int:
        """Number of intensity levels (256 for 8-bit data, 17 for digits), known before ``setup``."""
        return self._info.num_levels

    def prepare_data(self) -> None:
        """Download the in-distribution and OOD datasets when ``download`` is set; nothing otherwise."""
        if not self.download:
            return
        for name in [self.dataset, *self.ood_names]:
            if is_dataset_name(name):
                download_dataset(name, self.root)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits a stage needs (each split is loaded once)."""
        if stage in (None, "fit", "validate"):
            self._setup_fit()
        if stage in (None, "test", "predict"):
            self._setup_test()

    def _setup_fit(self) -> None:
        if self.train_set is not None:
            return
        images, targets, levels = load_image_dataset(self.dataset, self.root, "train", self.download)
        train, val = train_val_indices(len(images), self.val_size, self.train_size, self.split_seed)
        self.train_set = ImageSplit(images[train], targets[train], levels, train)
        self.val_set = ImageSplit(images[val], targets[val], levels, val)

    def _setup_test(self) -> None:
        if self.test_set is not None:
            return
        images, targets, levels = load_image_dataset(self.dataset, self.root, "test", self.download)
        self._test_split = (images, targets)
        idx = subset_indices(len(images), self.test_size, self.split_seed)
        self.test_set = ImageSplit(images[idx], targets[idx], levels, idx)

    def ood_dataset(self, name: str) -> ImageSplit:
        """The OOD set ``name`` (one of ``ood_names``), built on first use."""
        name = check_ood_name(name, self.dataset, self.image_shape, self.root)
        if name not in self._ood_sets:
            self._setup_test()
            assert self._test_split is not None and self.test_set is not None
            images, targets, source = make_ood_set(
                name,
                id_test_images=self._test_split[0],
                id_test_targets=self._test_split[1],
                num_levels=self.num_levels,
                size=len(self.test_set) if self.ood_size is None else self.ood_size,
                seed=self.split_seed,
                root=self.root,
                download=self.download,
            )
            self._ood_sets[name] = ImageSplit(images, targets, self.num_levels, source)
        return self._ood_sets[name]

    def _loader(self, dataset: ImageSplit, batch_size: int, shuffle: bool = False) -> DataLoader:
        return make_loader(dataset, batch_size, self.num_workers, shuffle)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (the order draws from the global torch RNG, which Lightning seeds)."""
        self._setup_fit()
        assert self.train_set is not None
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        self._setup_fit()
        assert self.val_set is not None
        return self._loader(self.val_set, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        self._setup_test()
        assert self.test_set is not None
        return self._loader(self.test_set, self.eval_batch_size)

    def ood_dataloaders(self) -> dict[str, DataLoader]:
        """One loader per OOD set in ``ood_names``, in a fixed order."""
        return {name: self._loader(self.ood_dataset(name), self.eval_batch_size) for name in self.ood_names}
