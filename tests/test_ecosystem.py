"""Models fimcb did not write, in float64 and float32, against a naive per-sample loop: the patterns that
escape module hooks and tiny random-init configs of transformers, diffusers, zuko and normflows."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from ecosystem_models import LIBRARIES, PATTERNS, idioms
from lightning.pytorch.loggers import WandbLogger
from torch.utils.data import DataLoader, TensorDataset
from toy_models import naive_layer_norms

from fimcb import FIMNormCallback, per_sample_layer_norms
from fimcb.lightning.options import Evaluation, Pictures, Scoring, Tracking
from fimcb.run.history import load_history

CASES = {**PATTERNS, **LIBRARIES}


def _build(name: str, dtype: torch.dtype):
    library = CASES[name].library
    if library is not None and importlib.util.find_spec(library) is None:
        if os.environ.get("FIMCB_REQUIRE_EXTRAS"):
            pytest.fail(f"{library} is not installed (pip install -e '.[test]')")
        pytest.skip(f"{library} is not installed")
    return CASES[name].build(dtype)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest deviation of a layer norm, relative to the largest layer norm of the same sample."""
    scale = want.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    return float(((got - want).abs() / scale).max())


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("group_size", [1, 2])
def test_hooks_engine_is_exact_in_float64_without_fallback(
    name: str, group_size: int, caplog: pytest.LogCaptureFixture
) -> None:
    model, x = _build(name, torch.float64)
    want, want_ll = naive_layer_norms(model, x, group_size)
    with caplog.at_level(logging.INFO, logger="fimcb"):
        for _ in range(3):  # the first batch runs tracked and checked; the next ones as the check decided
            norms = per_sample_layer_norms(model, x, engine="hooks", group_size=group_size)
            assert _relative_error(norms.values, want) <= 1e-10
            torch.testing.assert_close(norms.log_likelihood, want_ll, rtol=1e-12, atol=1e-12)
    assert "fallback" not in caplog.text and "torch.func for" not in caplog.text, caplog.text


@pytest.mark.parametrize("name", list(CASES))
def test_hooks_engine_is_exact_in_float32(name: str) -> None:
    model, x = _build(name, torch.float32)
    want, _ = naive_layer_norms(model, x)
    for _ in range(2):
        assert _relative_error(per_sample_layer_norms(model, x, engine="hooks").values, want) <= 1e-4


@pytest.mark.parametrize("name", list(idioms()))
def test_hooks_engine_is_exact_on_other_layers_and_idioms(name: str) -> None:
    """Layers without a rule of ours (attention, recurrent, parametrised, bag and 3-d layers) and parameters
    used through torch functions: exact in float64, by whichever route serves them."""
    model, x = idioms()[name]
    model = model.double().eval()
    x = x.double() if x.is_floating_point() else x
    want, want_ll = naive_layer_norms(model, x)
    for _ in range(3):
        norms = per_sample_layer_norms(model, x, engine="hooks")
        assert _relative_error(norms.values, want) <= 1e-10
        torch.testing.assert_close(norms.log_likelihood, want_ll, rtol=1e-12, atol=1e-12)


def test_the_callback_on_a_transformers_model_twice_in_one_wandb_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a user would: Hugging Face GPT-2 in a LightningModule, W&B offline, two runs in one folder."""
    model, _ = _build("transformers_gpt2", torch.float32)  # skips (or fails in CI) without transformers
    wandb = pytest.importorskip("wandb")

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = model

        def log_likelihood(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.gpt.log_likelihood(tokens)

        def training_step(self, batch, index):  # type: ignore[no-untyped-def]
            return -self.log_likelihood(batch[0]).mean()

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.Adam(self.parameters(), 1e-3)

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    generator = torch.Generator().manual_seed(0)

    def tokens(n: int, high: int = 40) -> DataLoader:
        return DataLoader(TensorDataset(torch.randint(0, high, (n, 10), generator=generator)), batch_size=8)

    folders = []
    for _ in range(2):
        callback = FIMNormCallback(
            Tracking(every_n_train_steps=2, n_train_probe=8, n_val_probe=8),
            Scoring(metric="kfac"),
            Evaluation(max_samples=16),
            Pictures(enabled=False),
            fit_loader=tokens(16),
            test_loader=tokens(16),
            ood_loaders={"few_tokens": tokens(16, 3)},
        )
        logger = WandbLogger(project="users", save_dir=str(tmp_path), offline=True)
        trainer = L.Trainer(max_steps=4, callbacks=[callback], logger=logger, enable_progress_bar=False)
        trainer.fit(Module(), tokens(32))
        wandb.finish()
        assert callback.errors == 0 and (callback.folder.path / "ood_metrics.json").is_file()
        history = load_history(callback.folder.path / "history")
        assert sorted(set(history.select("train_probe").step.tolist())) == [0, 2, 4]
        folders.append(callback.folder.path)
    assert folders[0] != folders[1] and folders[0].parent == folders[1].parent == tmp_path / "users"
