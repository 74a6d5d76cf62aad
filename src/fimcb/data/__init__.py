"""Data for likelihood models: image datasets by name, deterministic splits and OOD sets, and token
sequences (modular arithmetic, character-level text), each behind a Lightning datamodule."""

from fimcb.data.datamodule import ImageDataModule, ImageSplit
from fimcb.data.datasets import (
    DATASET_NAMES,
    DatasetInfo,
    canonical_name,
    dataset_info,
    load_image_dataset,
    to_float,
)
from fimcb.data.ood import (
    OOD_TRANSFORMS,
    default_ood,
    make_ood_set,
    requantize,
    sample_patches,
    valid_ood_names,
)
from fimcb.data.sequences import CharTextDataModule, ModularArithmeticDataModule, SequenceDataModule
from fimcb.data.splits import subset_indices, train_val_indices

__all__ = [
    "DATASET_NAMES",
    "OOD_TRANSFORMS",
    "CharTextDataModule",
    "DatasetInfo",
    "ImageDataModule",
    "ImageSplit",
    "ModularArithmeticDataModule",
    "SequenceDataModule",
    "canonical_name",
    "dataset_info",
    "default_ood",
    "load_image_dataset",
    "make_ood_set",
    "requantize",
    "sample_patches",
    "subset_indices",
    "to_float",
    "train_val_indices",
    "valid_ood_names",
]
