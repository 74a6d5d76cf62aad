"""Tests of the gated PixelCNN: causal structure without blind spot, an exactly normalised discrete
likelihood, a sampler that draws from it, per-sample gradients in the hooks engine, training, Lightning
and the CLI config."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_runs import run_config
from image_training import held_out_bpd, train_steps
from scipy.stats import chisquare
from sklearn.datasets import load_digits
from torch import Tensor

from fimcb import FIMNormCallback, per_sample_layer_norms
from fimcb.data import ImageDataModule
from fimcb.engine.rules import rule_for
from fimcb.lightning.options import Evaluation, Tracking
from fimcb.models.pixelcnn import PixelCNN

TINY = {"n_layers": 2, "hidden_channels": 8, "kernel_size": 3, "input_kernel_size": 5}


def tiny_pixelcnn(image_shape: tuple[int, int, int], num_levels: int, **overrides: object) -> PixelCNN:
    """A tiny float64 PixelCNN in eval mode."""
    return PixelCNN(image_shape=image_shape, num_levels=num_levels, **{**TINY, **overrides}).double().eval()


def every_image(shape: tuple[int, int, int], num_levels: int) -> Tensor:
    """All ``num_levels ** (C*H*W)`` images of ``shape`` on the level grid, float64, ``[N, C, H, W]``."""
    codes = list(itertools.product(range(num_levels), repeat=math.prod(shape)))
    return torch.tensor(codes, dtype=torch.float64).reshape(-1, *shape) / (num_levels - 1)


def image_index(x: Tensor, num_levels: int) -> Tensor:
    """Index of each image in :func:`every_image`'s order (the levels read as base-``num_levels`` digits)."""
    levels = torch.round(x * (num_levels - 1)).to(torch.int64).flatten(1)
    weights = num_levels ** torch.arange(levels.shape[1] - 1, -1, -1)
    return (levels * weights).sum(1)


def digits() -> Tensor:
    """The 1797 sklearn 8x8 digits, 17 intensity levels, as ``[N, 1, 8, 8]`` in [0, 1]."""
    images = torch.as_tensor(load_digits().images, dtype=torch.float32)
    return (images / 16.0).unsqueeze(1)


@pytest.mark.parametrize("channels", [1, 3])
def test_logits_depend_on_exactly_the_earlier_sub_pixels(channels: int) -> None:
    """Logits of channel c at pixel p depend on every pixel q < p (raster order, all channels; no blind
    spot at this size) and on channels < c of pixel p, and on nothing else."""
    height = width = 5
    model = tiny_pixelcnn((channels, height, width), num_levels=4)
    x = torch.rand(1, channels, height, width, dtype=torch.float64)
    weights = torch.randn(4, dtype=torch.float64)  # a random projection of each sub-pixel's logits

    def projected(v: Tensor) -> Tensor:
        return (model.logits(v) * weights[:, None, None]).sum(2).flatten()

    jac = torch.autograd.functional.jacobian(projected, x).reshape(channels, height * width, -1)
    jac = jac.reshape(channels, height * width, channels, height * width)
    c, p, c_in, q = torch.meshgrid(*(torch.arange(n) for n in jac.shape), indexing="ij")
    allowed = (q < p) | ((q == p) & (c_in < c))
    assert (jac[~allowed] == 0).all()
    assert (jac[allowed] != 0).all()


@pytest.mark.parametrize(
    ("shape", "num_levels"), [((1, 2, 3), 3), ((1, 2, 2), 2), ((3, 1, 2), 2), ((3, 1, 1), 4)]
)
def test_probabilities_sum_to_one(shape: tuple[int, int, int], num_levels: int) -> None:
    model = tiny_pixelcnn(shape, num_levels)
    with torch.no_grad():
        ll = model.log_likelihood(every_image(shape, num_levels))
    assert (ll < 0).all()
    assert ll.max() - ll.min() > 0.5  # not trivially uniform
    torch.testing.assert_close(ll.exp().sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("shape", "num_levels"), [((1, 2, 2), 3), ((3, 1, 2), 2)])
def test_samples_follow_the_likelihood(shape: tuple[int, int, int], num_levels: int) -> None:
    model = tiny_pixelcnn(shape, num_levels)
    n = 20_000
    samples = model.sample(n)
    assert samples.shape == (n, *shape)
    torch.testing.assert_close(samples * (num_levels - 1), torch.round(samples * (num_levels - 1)))
    counts = torch.bincount(image_index(samples, num_levels), minlength=num_levels ** math.prod(shape))
    with torch.no_grad():
        probs = model.log_likelihood(every_image(shape, num_levels)).exp()
    assert chisquare(counts.numpy(), (n * probs).numpy()).pvalue > 1e-3


def test_log_likelihood_is_deterministic_and_batch_independent() -> None:
    model = PixelCNN(image_shape=(1, 8, 8), num_levels=17, **TINY)
    x = digits()[:6]
    rng_state = torch.get_rng_state()
    ll = model.eval().log_likelihood(x)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert ll.shape == (6,) and ll.dtype == torch.float32 and torch.isfinite(ll).all() and (ll < 0).all()
    assert torch.equal(model.log_likelihood(x), ll)
    torch.testing.assert_close(model.train().log_likelihood(x), ll)  # no noise: training mode agrees
    model.eval()
    singles = torch.cat([model.log_likelihood(x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(singles, ll, rtol=1e-5, atol=1e-4)
    other_batch = model.log_likelihood(torch.cat([digits()[100:103], x[2:3]]))
    torch.testing.assert_close(other_batch[-1], ll[2], rtol=1e-5, atol=1e-4)


def test_log_likelihood_is_the_sum_of_per_sub_pixel_cross_entropies() -> None:
    model = tiny_pixelcnn((3, 3, 4), num_levels=5)
    x = torch.randint(0, 5, (4, 3, 3, 4)).double() / 4
    logits = model.logits(x)  # [B, C, L, H, W]
    levels = torch.round(x * 4).long()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), levels, reduction="none")
    torch.testing.assert_close(model.log_likelihood(x), -nll.flatten(1).sum(1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("shape", "num_levels"), [((1, 8, 8), 17), ((3, 4, 4), 8)])
def test_hooks_engine_matches_loop_with_built_in_rules_only(
    shape: tuple[int, int, int], num_levels: int
) -> None:
    model = tiny_pixelcnn(shape, num_levels)
    owners = [m for m in model.modules() if list(m.parameters(recurse=False))]
    assert owners and all(rule_for(m) is not None for m in owners)  # no module-local torch.func fallback
    x = torch.randint(0, num_levels, (5, *shape)).double() / (num_levels - 1)
    hooks = per_sample_layer_norms(model, x, engine="hooks")
    loop = per_sample_layer_norms(model, x, engine="loop")
    assert hooks.names == loop.names == tuple(n for n, _ in model.named_parameters())
    torch.testing.assert_close(hooks.values, loop.values, rtol=1e-9, atol=0)
    torch.testing.assert_close(hooks.log_likelihood, model.log_likelihood(x), rtol=1e-12, atol=0)


def test_hooks_engine_in_float32() -> None:
    model = PixelCNN(image_shape=(1, 8, 8), num_levels=17, **TINY).eval()
    x = digits()[:4]
    hooks = per_sample_layer_norms(model, x, engine="hooks")
    loop = per_sample_layer_norms(model, x, engine="loop")
    torch.testing.assert_close(hooks.values, loop.values, rtol=1e-4, atol=1e-6 * loop.values.max().item())


def test_training_on_digits_beats_initialisation_and_samples_are_on_grid() -> None:
    data = digits()
    model = PixelCNN(image_shape=(1, 8, 8), num_levels=17, n_layers=3, hidden_channels=16)
    held_out = data[-256:]
    initial = held_out_bpd(model, held_out)
    train_steps(model, data[:-256], steps=40, lr=1e-2, generator=torch.Generator().manual_seed(0))
    final = held_out_bpd(model, held_out)
    assert final < 0.65 * initial, (initial, final)  # about 4.2 -> 2.2 bits/dim

    samples = model.sample(8)
    assert samples.shape == (8, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 1
    torch.testing.assert_close(samples * 16, torch.round(samples * 16))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="odd"):
        PixelCNN(image_shape=(1, 8, 8), kernel_size=4)
    with pytest.raises(ValueError, match="positive"):
        PixelCNN(image_shape=(1, 8, 8), n_layers=0)


def test_lightning_fit_with_callback_smoke(tmp_path: Path) -> None:
    datamodule = ImageDataModule(
        dataset="digits", ood=["vflip", "noise"], train_size=48, val_size=32, test_size=32, batch_size=16
    )
    model = PixelCNN(image_shape=(1, 8, 8), num_levels=17, n_samples=4, warmup_steps=2, **TINY)
    callback = FIMNormCallback(
        Tracking(every_n_train_steps=2, n_train_probe=8, n_val_probe=8),
        evaluation=Evaluation(max_samples=32),
        progress=False,
    )
    trainer = L.Trainer(
        max_steps=3,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run"),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule)
    assert trainer.global_step == 3
    log_dir = Path(trainer.log_dir)
    assert (log_dir / "ood_metrics.json").is_file()
    assert list((log_dir / "images").glob("samples_*.png"))
    assert callback.result.norms["test"].values.shape[1] == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("config", "shape", "ood"),
    [
        ("pixelcnn_fashionmnist.yaml", (1, 28, 28), ["mnist", "hflip", "vflip", "noise", "constant"]),
        ("pixelcnn_cifar10_gpu.yaml", (3, 32, 32), ["sample_patches", "hflip", "vflip", "noise", "constant"]),
    ],
)
def test_config_end_to_end_at_tiny_size(
    config: str,
    shape: tuple[int, int, int],
    ood: list[str],
    tmp_path: Path,
    data_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])
    tiny = {
        "trainer.accelerator": "cpu",
        "trainer.max_steps": 4,
        "trainer.limit_val_batches": 1,
        "model.init_args.n_layers": 1,
        "model.init_args.hidden_channels": 4,
        "model.init_args.n_samples": 2,
        "data.init_args.root": data_root,
        "data.init_args.num_workers": 0,
        "data.init_args.train_size": 32,
        "data.init_args.val_size": 8,
        "data.init_args.test_size": 8,
        "data.init_args.ood_size": 8,
        "data.init_args.batch_size": 8,
        "data.init_args.eval_batch_size": 8,  # one batch size: the engine times its routes once
    }
    overrides = [arg for key, value in tiny.items() for arg in (f"--{key}", str(value))]
    cli = run_config(tmp_path, config, *overrides)
    assert isinstance(cli.model, PixelCNN)
    assert cli.model.image_shape == shape and cli.model.num_levels == 256  # linked from the datamodule
    metrics = json.loads((Path(cli.trainer.log_dir) / "ood_metrics.json").read_text())
    assert list(metrics) == ood
    assert all(0 <= v <= 1 for m in metrics[ood[0]].values() for v in m.values())
