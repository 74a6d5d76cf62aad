"""Tests of fimcb.data: datasets by name, deterministic splits, OOD sets and the datamodule."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits
from torch import Tensor
from torch.utils.data import DataLoader

from fimcb.data import (
    OOD_TRANSFORMS,
    ImageDataModule,
    canonical_name,
    load_image_dataset,
    requantize,
    subset_indices,
    to_float,
    train_val_indices,
)
from fimcb.data.ood import natural_images
from fimcb.data.splits import num_val


def _all(loader: DataLoader) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate a loader's batches, checking the batch format on the way."""
    xs, ys, ids = [], [], []
    for x, y, i in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and i.dtype == torch.int64
        assert x.ndim == 4 and y.shape == i.shape == (len(x),)
        xs.append(x)
        ys.append(y)
        ids.append(i)
    return torch.cat(xs), torch.cat(ys), torch.cat(ids)


def _on_grid(x: Tensor, num_levels: int) -> bool:
    scaled = x * (num_levels - 1)
    return bool(x.min() >= 0 and x.max() <= 1 and torch.allclose(scaled, scaled.round(), atol=1e-4))


def _loaders(dm: ImageDataModule) -> dict[str, DataLoader]:
    return {
        "train": dm.train_dataloader(),
        "val": dm.val_dataloader(),
        "test": dm.test_dataloader(),
        **dm.ood_dataloaders(),
    }


@pytest.fixture(scope="module")
def digits() -> ImageDataModule:
    dm = ImageDataModule(batch_size=50, eval_batch_size=70)
    dm.setup()
    return dm


# --- digits: the offline default --------------------------------------------------------------------


def test_digits_shape_and_levels_known_before_setup() -> None:
    dm = ImageDataModule()
    assert dm.image_shape == (1, 8, 8)
    assert dm.num_levels == 17
    assert dm.ood_names == ["sample_patches", "vflip", "noise"]
    assert dm.hparams["dataset"] == "digits"
    assert dm.train_set is None  # nothing loaded yet


def test_digits_batches_shapes_and_value_grid(digits: ImageDataModule) -> None:
    for name, loader in _loaders(digits).items():
        x = _all(loader)[0]
        assert x.shape[1:] == (1, 8, 8), name
        assert _on_grid(x, 17), name
        assert len(x) == len(loader.dataset), name
    assert next(iter(digits.train_dataloader()))[0].shape[0] == 50
    assert next(iter(digits.val_dataloader()))[0].shape[0] == 70


def test_digits_split_sizes(digits: ImageDataModule) -> None:
    n_train_split = 1797 - 359
    assert len(digits.test_set) == 359
    assert len(digits.val_set) == round(0.1 * n_train_split)
    assert len(digits.train_set) + len(digits.val_set) == n_train_split
    assert all(len(digits.ood_dataset(name)) == 359 for name in digits.ood_names)


def test_digits_fixed_split_partitions_load_digits() -> None:
    train, train_y, levels = load_image_dataset("digits", None, "train")
    test, test_y, _ = load_image_dataset("digits", None, "test")
    assert levels == 17 and train.dtype == torch.uint8 and train.shape[1:] == (1, 8, 8)
    assert (len(train), len(test)) == (1797 - 359, 359)
    # train + test is exactly load_digits, as a multiset of (image, label) rows
    digits = load_digits()
    rows = np.concatenate([digits.images.reshape(-1, 64), digits.target[:, None]], axis=1).astype(np.int64)
    ours = torch.cat([torch.cat([train, test]).reshape(-1, 64), torch.cat([train_y, test_y])[:, None]], 1)
    assert Counter(map(tuple, rows.tolist())) == Counter(map(tuple, ours.tolist()))


def test_ids_unique_and_stable_across_passes(digits: ImageDataModule) -> None:
    for name, loader in _loaders(digits).items():
        x1, y1, id1 = _all(loader)
        x2, y2, id2 = _all(loader)
        assert sorted(id1.tolist()) == list(range(len(loader.dataset))), name
        order1, order2 = id1.argsort(), id2.argsort()
        assert torch.equal(x1[order1], x2[order2]) and torch.equal(y1[order1], y2[order2]), name
    # the train loader shuffles, the others keep their order
    assert not torch.equal(_all(digits.train_dataloader())[2], torch.arange(len(digits.train_set)))
    assert torch.equal(_all(digits.val_dataloader())[2], torch.arange(len(digits.val_set)))


def test_train_order_follows_the_global_seed(digits: ImageDataModule) -> None:
    def first_ids(seed: int) -> Tensor:
        torch.manual_seed(seed)
        return next(iter(digits.train_dataloader()))[2]

    assert torch.equal(first_ids(1), first_ids(1))
    assert not torch.equal(first_ids(1), first_ids(2))


def test_splits_disjoint(digits: ImageDataModule) -> None:
    train, val = digits.train_set.source_index, digits.val_set.source_index
    assert len(set(train.tolist()) & set(val.tolist())) == 0
    assert len(set(train.tolist())) == len(train) and len(set(val.tolist())) == len(val)
    assert max(train.max(), val.max()) < 1797 - 359
    assert torch.equal(digits.train_set.images, load_image_dataset("digits", None, "train")[0][train])


def test_sizes_honour_arguments() -> None:
    dm = ImageDataModule(val_size=200, train_size=300, test_size=50, ood_size=20)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (300, 200, 50)
    assert all(len(loader.dataset) == 20 for loader in dm.ood_dataloaders().values())
    frac = ImageDataModule(val_size=0.25)
    frac.setup("fit")
    assert len(frac.val_set) == round(0.25 * (1797 - 359)) and frac.test_set is None


def test_deterministic_across_instances_and_seeded_by_split_seed() -> None:
    a, b, c = (ImageDataModule(ood=[*OOD_TRANSFORMS, "sample_patches"], split_seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    for split in ("train_set", "val_set", "test_set"):
        assert torch.equal(getattr(a, split).images, getattr(b, split).images)
        assert torch.equal(getattr(a, split).targets, getattr(b, split).targets)
    for name in a.ood_names:
        assert torch.equal(a.ood_dataset(name).images, b.ood_dataset(name).images), name
    assert not torch.equal(a.val_set.source_index, c.val_set.source_index)
    assert not torch.equal(a.ood_dataset("noise").images, c.ood_dataset("noise").images)


def test_invalid_sizes() -> None:
    with pytest.raises(ValueError, match="val_size"):
        ImageDataModule(val_size=1.5).setup("fit")
    with pytest.raises(ValueError, match="train_size"):
        ImageDataModule(train_size=0)


# --- splits ------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 400),
    val=st.one_of(st.floats(0.0, 0.999), st.integers(0, 399)),
    train_size=st.one_of(st.none(), st.integers(1, 500)),
    seed=st.integers(0, 2**31),
)
def test_train_val_indices_invariants(n: int, val: int | float, train_size: int | None, seed: int) -> None:
    if isinstance(val, int) and val >= n:
        with pytest.raises(ValueError, match="val_size"):
            train_val_indices(n, val, train_size, seed)
        return
    train, val_idx = train_val_indices(n, val, train_size, seed)
    n_val = num_val(n, val)
    assert len(val_idx) == n_val == (val if isinstance(val, int) else round(val * n))
    assert len(train) == (n - n_val if train_size is None else min(train_size, n - n_val))
    both = torch.cat([train, val_idx])
    assert len(both.unique()) == len(both) and (both.min() >= 0 if len(both) else True) and both.max() < n
    assert torch.equal(train, train.sort().values)
    again = train_val_indices(n, val, train_size, seed)
    assert torch.equal(again[0], train) and torch.equal(again[1], val_idx)
    # capping the training set never moves samples between train and val
    assert torch.equal(train_val_indices(n, val, None, seed)[1], val_idx)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 300), small=st.integers(1, 300), extra=st.integers(0, 300), seed=st.integers(0, 99))
def test_subset_indices_are_nested(n: int, small: int, extra: int, seed: int) -> None:
    a, b = subset_indices(n, small, seed), subset_indices(n, small + extra, seed)
    assert len(a) == min(small, n) and len(a.unique()) == len(a)
    assert set(a.tolist()) <= set(b.tolist())
    assert torch.equal(subset_indices(n, None, seed), torch.arange(n))


@given(k=st.integers(0, 16))
def test_requantize_round_trip(k: int) -> None:
    up = requantize(torch.tensor([k], dtype=torch.uint8), 17, 256)
    assert int(up) == round(k * 255 / 16)
    assert int(requantize(up, 256, 17)) == k


# --- OOD sets ------------------------------------------------------------------------------------------


def test_ood_transforms_of_test_split(digits: ImageDataModule) -> None:
    test = digits.test_set.images
    extra = ImageDataModule(ood=list(OOD_TRANSFORMS))
    sets = {name: extra.ood_dataset(name) for name in OOD_TRANSFORMS}
    assert torch.equal(sets["vflip"].images, test.flip(-2))
    assert torch.equal(sets["hflip"].images, test.flip(-1))
    assert torch.equal(sets["invert"].images, 16 - test)
    assert torch.equal(sets["vflip"].targets, digits.test_set.targets)
    constant = sets["constant"].images.flatten(1)
    assert (constant == constant[:, :1]).all() and len(constant[:, 0].unique()) > 5
    noise = sets["noise"].images.float()
    assert noise.max() == 16 and noise.min() == 0 and abs(noise.mean() - 8) < 0.2
    assert (sets["noise"].targets == -1).all()


def test_vflip_batches_are_flipped_test_batches(digits: ImageDataModule) -> None:
    x_test = _all(digits.test_dataloader())[0]
    x_vflip = _all(digits.ood_dataloaders()["vflip"])[0]
    assert torch.equal(x_vflip, x_test.flip(-2))


def test_sample_patches_are_real_image_crops(digits: ImageDataModule) -> None:
    patches = digits.ood_dataset("sample_patches").images
    assert patches.shape == (359, 1, 8, 8) and patches.dtype == torch.uint8
    flat = patches.flatten(1)
    assert (flat.amax(1) > flat.amin(1)).all(), "every patch has structure"
    assert len(flat.unique(dim=0)) == len(flat), "patches are distinct"
    # each patch is a crop of a downscaled sample photo
    sources = natural_images(1, 8, 17)
    windows = torch.cat([s.unfold(1, 8, 1).unfold(2, 8, 1).reshape(-1, 64) for s in sources])
    for patch in flat[:20]:
        assert (windows == patch).all(1).any()
    # natural images are smooth: neighbouring pixels are far more alike than in noise
    step = (patches[..., 1:].float() - patches[..., :-1].float()).abs().mean()
    noise = digits.ood_dataset("noise").images.float()
    assert step < 0.5 * (noise[..., 1:] - noise[..., :-1]).abs().mean()


def test_sample_patches_rgb() -> None:
    from fimcb.data import sample_patches

    patches = sample_patches(10, (3, 32, 32), 256, torch.Generator().manual_seed(0))
    assert patches.shape == (10, 3, 32, 32)
    assert (patches.flatten(1).amax(1) - patches.flatten(1).amin(1) >= 32).all()


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"unknown OOD set 'nope'.*vflip.*sample_patches"):
        ImageDataModule(ood=["vflip", "nope"])
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'.*fashionmnist"):
        ImageDataModule("imagenet")
    with pytest.raises(ValueError, match="in-distribution dataset itself"):
        ImageDataModule(ood=["digits"])


@pytest.mark.parametrize("name", ["fashionmnist", "Fashion-MNIST", "fashion_mnist", " FASHIONMNIST "])
def test_dataset_name_matching(name: str) -> None:
    assert canonical_name(name) == "fashionmnist"


# --- missing data, npz files -----------------------------------------------------------------------


def test_missing_data_error_says_how_to_fix(tmp_path: Path) -> None:
    dm = ImageDataModule("fashionmnist", root=str(tmp_path), download=False, ood=["vflip"])
    assert dm.image_shape == (1, 28, 28)  # known without the data
    dm.prepare_data()  # download=False: does nothing
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    for part in ("'fashionmnist'", str(tmp_path), "FashionMNIST/raw", "--data.root", "--data.download true"):
        assert part in message


def test_root_defaults_to_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FIMCB_DATA_ROOT", str(tmp_path))
    assert ImageDataModule().root == tmp_path


def test_npz_dataset(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (30, 6, 5), dtype=np.uint8),
        "y_train": rng.integers(0, 3, 30),
        "x_test": rng.integers(0, 256, (12, 6, 5), dtype=np.uint8),
        "y_test": rng.integers(0, 3, 12),
    }
    np.savez_compressed(tmp_path / "tiny.npz", **arrays)
    dm = ImageDataModule("npz:tiny.npz", root=str(tmp_path), val_size=5, batch_size=8)
    assert dm.image_shape == (1, 6, 5) and dm.num_levels == 256
    assert dm.ood_names == ["vflip", "hflip", "noise", "constant"]
    x, y, _ = _all(dm.test_dataloader())
    assert torch.equal(x[:, 0], torch.from_numpy(arrays["x_test"]).float() / 255)
    assert torch.equal(y, torch.from_numpy(arrays["y_test"]))
    assert len(dm.train_dataloader().dataset) == 25
    with pytest.raises(FileNotFoundError, match=r"--data\.root"):
        ImageDataModule("npz:missing.npz", root=str(tmp_path))


# --- real datasets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "mean"), [("fashionmnist", 0.2860), ("mnist", 0.1307)])
def test_real_training_split_pixel_mean(data_root: Path, name: str, mean: float) -> None:
    images, targets, levels = load_image_dataset(name, data_root, "train")
    assert images.shape == (60000, 1, 28, 28) and targets.shape == (60000,) and levels == 256
    assert to_float(images, levels).mean().item() == pytest.approx(mean, abs=5e-4)


def test_fashionmnist_module_with_mnist_ood(data_root: Path) -> None:
    from torchvision.datasets import FashionMNIST
    from torchvision.transforms.functional import to_tensor

    dm = ImageDataModule("fashion_mnist", root=str(data_root), val_size=100, train_size=300, test_size=64)
    assert dm.image_shape == (1, 28, 28) and dm.num_levels == 256
    assert dm.ood_names == ["mnist", "vflip", "noise"]
    dm.setup()
    x, _, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and _on_grid(x, 256)
    # exactly torchvision's ToTensor
    reference = FashionMNIST(str(data_root), train=False)
    first = int(dm.test_set.source_index[0])
    assert torch.equal(dm.test_set[0][0], to_tensor(reference[first][0]))
    mnist = dm.ood_dataset("mnist")
    assert len(mnist) == 64 and mnist.images.shape[1:] == (1, 28, 28)
    mnist_test, mnist_y, _ = load_image_dataset("mnist", data_root, "test")
    assert torch.equal(mnist.images, mnist_test[mnist.source_index])
    assert torch.equal(mnist.targets, mnist_y[mnist.source_index])
    xm, _, idm = _all(dm.ood_dataloaders()["mnist"])
    assert _on_grid(xm, 256) and torch.equal(idm, torch.arange(64))


def test_cifar10_from_npz(data_root: Path) -> None:
    if not (data_root / "cifar10.npz").is_file():
        pytest.skip("cifar10.npz not found")
    dm = ImageDataModule("CIFAR-10", root=str(data_root), val_size=1000, train_size=200, test_size=32)
    assert dm.image_shape == (3, 32, 32) and dm.num_levels == 256
    assert dm.ood_names == ["vflip", "hflip", "noise", "constant"]
    x, y, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (32, 3, 32, 32) and _on_grid(x, 256)
    with np.load(data_root / "cifar10.npz") as arrays:
        first = int(dm.test_set.source_index[0])
        expected = torch.from_numpy(arrays["x_test"][first]).permute(2, 0, 1).float() / 255
        assert torch.equal(x[0], expected) and int(y[0]) == int(arrays["y_test"][first])
        assert len(arrays["x_train"]) == 10000
    for loader in dm.ood_dataloaders().values():
        assert next(iter(loader))[0].shape[1:] == (3, 32, 32)


def test_shape_mismatch_error(data_root: Path) -> None:
    with pytest.raises(ValueError, match=r"\(3, 32, 32\).*\(1, 28, 28\); pick an OOD dataset of the same"):
        ImageDataModule("fashionmnist", root=str(data_root), ood=["cifar10"])


def test_download_true_asks_torchvision_to_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``download=True`` prepare_data hands ``download=True`` to torchvision for ID and OOD sets."""
    import torchvision

    calls: list[tuple[str, bool, bool]] = []

    def recorder(name: str):
        def make(root: str, train: bool = True, download: bool = False, **kwargs: object) -> None:
            calls.append((name, train, download))

        return make

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", recorder("fashionmnist"))
    monkeypatch.setattr(torchvision.datasets, "MNIST", recorder("mnist"))
    ImageDataModule("fashionmnist", root=str(tmp_path), download=True, ood=["mnist", "vflip"]).prepare_data()
    assert {(name, download) for name, _, download in calls} == {("fashionmnist", True), ("mnist", True)}
    assert {train for _, train, _ in calls} == {True, False}


def test_tinyimagenet32_fixed_split_partitions_the_file(data_root: Path) -> None:
    train, train_y, levels = load_image_dataset("tiny-imagenet32", data_root, "train")
    test, test_y, _ = load_image_dataset("tinyimagenet32", data_root, "test")
    assert levels == 256 and train.dtype == torch.uint8 and train.shape[1:] == (3, 32, 32)
    assert (len(train), len(test)) == (8000, 2000)
    with np.load(data_root / "tinyimagenet32.npz") as arrays:
        rows = np.concatenate([arrays["x_test"].reshape(10000, -1), arrays["y_test"][:, None]], axis=1)
    ours = torch.cat(
        [
            torch.cat([train, test]).permute(0, 2, 3, 1).reshape(10000, -1),
            torch.cat([train_y, test_y])[:, None],
        ],
        1,
    )
    assert Counter(map(tuple, rows.astype(np.int64).tolist())) == Counter(map(tuple, ours.tolist()))
    # the split does not follow a datamodule's split_seed, and CIFAR-10 pairs with it as an OOD set
    dm = ImageDataModule("tinyimagenet32", root=str(data_root), val_size=500, ood=["cifar10"], split_seed=3)
    dm.setup("test")
    assert torch.equal(dm.test_set.images, test)
    assert dm.ood_dataset("cifar10").images.shape == (2000, 3, 32, 32)


def test_tinyimagenet32_missing_file_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tinyimagenet32\.npz"):
        load_image_dataset("tinyimagenet32", tmp_path, "train")
