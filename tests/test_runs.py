"""Every run its own: run folders for every logger, W&B-native results, several callbacks, plain loaders,
fast_dev_run, small checkpoints, and resumes from Python and from the command line."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import threading
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_runs import CONFIGS, run_config
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from fimcb import FIMNormCallback
from fimcb.data import ImageDataModule
from fimcb.detectors import DEFAULT_METHODS
from fimcb.lightning.options import Evaluation, Pictures, Scoring, Tracking
from fimcb.lightning.runs import _next_version
from fimcb.models import Glow
from fimcb.run.folder import RunFolder
from fimcb.run.history import load_history

OOD = ["vflip", "noise"]


def _datamodule() -> ImageDataModule:
    return ImageDataModule("digits", ood=OOD, val_size=48, train_size=128, test_size=48, batch_size=32)


def _model() -> Glow:
    return Glow((1, 8, 8), 17, n_levels=1, n_steps=2, hidden_channels=8, n_samples=4, warmup_steps=1)


def _callback(pictures: bool = False, **options) -> FIMNormCallback:
    tracking = Tracking(every_n_train_steps=2, n_train_probe=8, n_val_probe=8)
    drawn = Pictures(enabled=pictures, n_novel=2, saliency=False, influence_samples=0)
    return FIMNormCallback(
        tracking, evaluation=Evaluation(max_samples=24), pictures=drawn, progress=False, **options
    )


def _fit(callbacks: list, max_steps: int, **trainer_options) -> L.Trainer:
    options = dict(
        max_steps=max_steps,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    trainer = L.Trainer(callbacks=callbacks, **{**options, **trainer_options})
    L.seed_everything(0)
    trainer.fit(_model(), _datamodule())
    return trainer


def _fingerprint(folder: Path) -> dict[str, str]:
    """Every file of a run folder by its content (the run marker aside)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _flat(table: dict) -> dict[str, float]:
    return {
        f"ood/{o}/{m}/{k}": v
        for o, by in table.items()
        for m, values in by.items()
        for k, v in values.items()
    }


def test_two_wandb_runs_in_one_folder_each_keep_their_own_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger
    from wandb_records import artifacts, metric_definitions, summary_values

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    runs = []
    for steps in (6, 4):
        callback = _callback(pictures=True)
        logger = WandbLogger(project="fimcb-test", save_dir=str(tmp_path), offline=True)
        _fit([callback], steps, logger=logger)
        wandb.finish()
        runs.append((callback, logger.version, _fingerprint(callback.folder.path)))
    (first, first_id, first_files), (second, second_id, _) = runs
    assert first.folder.path == tmp_path / "fimcb-test" / first_id
    assert second.folder.path == tmp_path / "fimcb-test" / second_id != first.folder.path
    assert _fingerprint(first.folder.path) == first_files  # the second run left the first one intact
    for callback, steps in ((first, [0, 2, 4, 6]), (second, [0, 2, 4])):
        history = load_history(callback.folder.path / "history")
        assert sorted(set(history.select("train_probe").step.tolist())) == steps
        assert (callback.folder.path / "ood_scores.pt").is_file() and list(
            callback.folder.figures.glob("*.png")
        )
    for callback, run_id in ((first, first_id), (second, second_id)):
        (offline,) = tmp_path.glob(f"wandb/offline-run-*-{run_id}")
        table = json.loads((callback.folder.path / "ood_metrics.json").read_text())
        summary = summary_values(offline)
        for key, value in _flat(table).items():
            assert summary[key] == pytest.approx(value), key
        kind, files = artifacts(offline)[f"fimcb-{callback.run_id}"]
        assert kind == "fimcb-run"
        assert {"ood_metrics.json", "ood_scores.pt", "fim_detectors.pt"} <= set(files)
        assert any(f.startswith("history/part-") for f in files) and any(
            f.startswith("figures/") for f in files
        )
        definitions = metric_definitions(offline)
        assert definitions["fim/*"] == definitions["ood/*"] == "trainer/global_step"


def test_two_runs_without_a_logger_get_their_own_version_folders(tmp_path: Path) -> None:
    first, second = _callback(), _callback()
    _fit([first], 4, logger=False, default_root_dir=tmp_path)
    files = _fingerprint(first.folder.path)
    _fit([second], 2, logger=False, default_root_dir=tmp_path)
    assert first.folder.path == tmp_path / "fimcb" / "version_0"
    assert second.folder.path == tmp_path / "fimcb" / "version_1"
    assert _fingerprint(first.folder.path) == files
    assert sorted(set(load_history(second.folder.path / "history").step.tolist())) == [0, 2]


def test_a_logger_folder_reused_by_a_fresh_run_is_not_mixed_into(tmp_path: Path) -> None:
    """A CSV logger with a fixed version, reused: the second run writes into a subfolder of its own."""
    first, second = _callback(), _callback()
    _fit([first], 4, logger=CSVLogger(tmp_path, "run", version=0))
    history = load_history(first.folder.path / "history")
    with pytest.warns(UserWarning, match="holds another run's outputs"):
        _fit([second], 2, logger=CSVLogger(tmp_path, "run", version=0))
    assert second.folder.path.parent == first.folder.path and second.folder.path.name.startswith("fimcb-")
    again = load_history(first.folder.path / "history")
    assert torch.equal(again.step, history.step) and torch.equal(again.layers, history.layers)


def test_runs_started_at_once_never_share_a_folder(tmp_path: Path) -> None:
    """Claims and new version folders are atomic: of many runs racing for one, exactly one gets it."""
    folder = RunFolder(tmp_path / "contested")
    won: list[bool] = []
    versions: list[Path] = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        won.append(folder.claim(f"run-{i}"))
        versions.append(_next_version(tmp_path / "root"))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(won) == [False] * 7 + [True]
    assert len(set(versions)) == 8


def _checkpointed(tmp_path: Path, callbacks: list, steps: int, ckpt: Path | None = None) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[
            *callbacks,
            ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1),
        ],
        logger=CSVLogger(tmp_path, "run"),
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    L.seed_everything(0)
    trainer.fit(_model(), _datamodule(), ckpt_path=ckpt)
    return trainer


def test_two_callbacks_checkpointed_and_resumed_give_what_each_gives_alone(tmp_path: Path) -> None:
    """An identity and a K-FAC callback in one trainer, killed after a checkpoint and resumed: each one's
    history and OOD table equal those of the same run with that callback alone."""

    def pair() -> list[FIMNormCallback]:
        return [_callback(name="plain"), _callback(name="kfac", scoring=Scoring(metric="kfac"))]

    results: dict[str, dict[str, Path]] = {}
    for label, make in (("pair", pair), ("plain", lambda: pair()[:1]), ("kfac", lambda: pair()[1:])):
        root = tmp_path / label
        _checkpointed(root, make(), 6)  # "killed" at step 6; the checkpoint of step 4 survives
        resumed = make()
        _checkpointed(root, resumed, 8, ckpt=root / "ckpt" / "epoch=0-step=4.ckpt")
        results[label] = {c.name: c.folder.path for c in resumed}
    for name in ("plain", "kfac"):
        together, alone = results["pair"][name], results[name][name]
        assert together.name == name and together.parent.name == "version_0"  # its own subfolder
        # Equal up to float32 reduction order: BLAS may use fewer threads on a busy machine, which moves
        # the last bits; a callback reading the other's state would move them by orders of magnitude more.
        table = _flat(json.loads((together / "ood_metrics.json").read_text()))
        assert table == pytest.approx(_flat(json.loads((alone / "ood_metrics.json").read_text())), abs=0.01)
        a, b = load_history(together / "history"), load_history(alone / "history")
        assert a.split == b.split and torch.equal(a.step, b.step)
        torch.testing.assert_close(a.layers, b.layers, rtol=1e-4, atol=0)
        keys = list(zip(a.split, a.step.tolist(), a.id.tolist(), strict=True))
        assert len(keys) == len(set(keys))  # the replayed events replaced their first recording
        assert sorted(set(a.select("train_probe").step.tolist())) == [0, 2, 4, 6, 8]
    rows = (tmp_path / "pair" / "run" / "version_1" / "metrics.csv").read_text()
    assert "fim/plain/train_probe/log_norm_mean" in rows and "ood/kfac/noise/fim_gaussian/auroc" in rows


def test_callbacks_with_one_name_are_refused() -> None:
    with pytest.raises(RuntimeError, match="state_key` must be unique"):  # Lightning's own check
        L.Trainer(callbacks=[_callback(), _callback()], logger=False)


def test_plain_loaders_without_a_datamodule(tmp_path: Path) -> None:
    data = _datamodule()
    data.setup("fit")
    ood = data.ood_dataloaders()
    empty = DataLoader(TensorDataset(torch.empty(0, 1, 8, 8)), batch_size=4)
    wide = DataLoader(TensorDataset(torch.rand(8, 1, 9, 9)), batch_size=4)
    callback = _callback(test_loader=data.val_dataloader(), ood_loaders={**ood, "empty": empty, "wide": wide})
    trainer = L.Trainer(max_steps=2, callbacks=[callback], logger=False, default_root_dir=tmp_path)
    L.seed_everything(0)
    with pytest.warns(UserWarning) as warned:
        trainer.fit(_model(), data.train_dataloader(), data.val_dataloader())
    messages = " ".join(str(w.message) for w in warned)
    assert "skipping OOD set empty" in messages and "samples have shape [1, 9, 9]" in messages
    assert list(callback.result.measures) == OOD


def test_fast_dev_run_is_a_smoke_test(tmp_path: Path) -> None:
    callback = _callback(pictures=True, scoring=Scoring(metric="kfac"))
    trainer = L.Trainer(fast_dev_run=3, callbacks=[callback], default_root_dir=tmp_path)
    L.seed_everything(0)
    trainer.fit(_model(), _datamodule())
    assert callback.last_tracked_step == 0  # one tracking event
    assert callback.result is not None and len(callback.result.norms["test"]) <= 16
    assert callback.folder is None and not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize("metric", ["kfac", "low_rank"])
def test_a_checkpoint_holds_small_state_and_the_run_folder_the_fitted_one(
    tmp_path: Path, metric: str
) -> None:
    callback = _callback(scoring=Scoring(metric=metric))
    trainer = _fit([callback], 2, logger=CSVLogger(tmp_path, "run"))
    trainer.save_checkpoint(tmp_path / "done.ckpt")
    (state,) = torch.load(tmp_path / "done.ckpt", weights_only=False)["callbacks"].values()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert set(state) == {"run_folder", "run_id", "probe_indices", "last_tracked_step", "errors"}
    assert buffer.tell() < 4096 < (callback.folder.path / "fim_metric.pt").stat().st_size
    restored = _callback(scoring=Scoring(metric=metric))
    restored.load_state_dict(state)
    assert restored.metric_state.keys() == callback.metric_state.keys()
    assert list(restored.detectors) == list(DEFAULT_METHODS)


# ---- the command line: resume with --ckpt_path, every shipped config ------------------------------

MODEL_TINY = {
    "Glow": {"n_levels": 1, "n_steps": 1, "hidden_channels": 4},
    "VAE": {"hidden_channels": 4, "latent_channels": 2, "n_downsample": 1, "n_res_blocks": 0},
    "PixelCNN": {"n_layers": 1, "hidden_channels": 4},
    "Diffusion": {"channels": 4, "channel_mults": "[1]", "n_groups": 2, "n_eval_timesteps": 2},
    "Transformer": {"d_model": 8, "n_heads": 2, "n_layers": 1},
}
DATA_TINY = {
    "ImageDataModule": {"train_size": 32, "val_size": 8, "test_size": 8, "ood_size": 8, "batch_size": 8},
    "ModularArithmeticDataModule": {"p": 5, "batch_size": 8, "train_fraction": 0.5},
    "CharTextDataModule": {"batch_size": 8, "seq_len": 8, "ood_size": 8},
}


def _tiny(config: str, tmp_path: Path, data_root: Path) -> list[str]:
    import yaml

    parsed = yaml.safe_load((CONFIGS / config).read_text())
    model = parsed["model"]["class_path"].rsplit(".", 1)[1]
    data = parsed["data"]["class_path"].rsplit(".", 1)[1]
    options = {f"model.init_args.{k}": v for k, v in {**MODEL_TINY[model], "n_samples": 0}.items()}
    options |= {f"data.init_args.{k}": v for k, v in DATA_TINY[data].items()}
    if data == "ImageDataModule":
        options |= {"data.init_args.root": data_root, "data.init_args.eval_batch_size": 8}
    if data == "CharTextDataModule":
        text = tmp_path / "text.txt"
        text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
        options["data.init_args.path"] = text
    options |= {
        "trainer.accelerator": "cpu",
        "trainer.max_epochs": 1,
        "trainer.max_steps": -1,
        "trainer.limit_train_batches": 4,
        "trainer.limit_val_batches": 1,
        "trainer.val_check_interval": 1.0,
        "trainer.check_val_every_n_epoch": 1,
        "trainer.enable_checkpointing": True,
        "trainer.callbacks.init_args.tracking.every_n_train_steps": 2,
        "trainer.callbacks.init_args.tracking.n_train_probe": 4,
        "trainer.callbacks.init_args.tracking.n_val_probe": 4,
        "trainer.callbacks.init_args.evaluation.max_samples": 8,
    }
    return [arg for key, value in options.items() for arg in (f"--{key}", str(value))]


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_resumes_from_the_command_line_into_its_own_run_folder(
    config: str, tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])
    tiny = _tiny(config, tmp_path, data_root)
    first = run_config(tmp_path, config, *tiny)
    (callback,) = [c for c in first.trainer.callbacks if isinstance(c, FIMNormCallback)]
    folder = callback.folder.path
    (ckpt,) = (Path(first.trainer.log_dir) / "checkpoints").glob("*.ckpt")
    resumed = run_config(tmp_path, config, *tiny, "--trainer.max_epochs", "2", "--ckpt_path", str(ckpt))
    (again,) = [c for c in resumed.trainer.callbacks if isinstance(c, FIMNormCallback)]
    assert again.folder.path == folder and again.run_id == callback.run_id
    history = load_history(folder / "history")
    steps = sorted(set(history.select("train_probe").step.tolist()))
    end = resumed.trainer.global_step
    assert first.trainer.global_step < end and steps == list(range(0, end + 1, 2))
    keys = list(zip(history.split, history.step.tolist(), history.id.tolist(), strict=True))
    assert len(keys) == len(set(keys))
    assert RunFolder(folder).read().metrics is not None  # both parts' metrics.csv, joined


# ---- failure policy: never the reason training stops --------------------------------------------------


class BreaksWhenScored(Glow):
    """Raises inside ``log_likelihood`` when fimcb scores it (eval mode, gradients on) from step 4 on;
    training and validation run as usual."""

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and torch.is_grad_enabled() and self.trainer.global_step >= 4:
            raise RuntimeError("boom inside the user's log_likelihood")
        return super().log_likelihood(x)


def _breaking_fit(tmp_path: Path, on_error: str) -> tuple[L.Trainer, FIMNormCallback]:
    callback = _callback(on_error=on_error)
    trainer = L.Trainer(
        max_steps=10,
        callbacks=[callback, ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)],
        logger=CSVLogger(tmp_path, "run"),
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    L.seed_everything(0)
    model = BreaksWhenScored(
        (1, 8, 8), 17, n_levels=1, n_steps=2, hidden_channels=8, n_samples=0, warmup_steps=1
    )
    trainer.fit(model, _datamodule())
    return trainer, callback


def test_scoring_that_starts_failing_mid_training_never_ends_it(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="boom inside the user's log_likelihood") as warned:
        trainer, callback = _breaking_fit(tmp_path, "warn")
    assert trainer.global_step == 10  # training reached max_steps
    assert any("the OOD evaluation failed" in str(w.message) for w in warned)
    history = load_history(callback.folder.path / "history")  # what was recorded before is kept
    assert sorted(set(history.select("train_probe").step.tolist())) == [0, 2]
    assert sorted(set(history.select("val").step.tolist())) == [2]
    rows = (Path(trainer.log_dir) / "metrics.csv").read_text().splitlines()
    errors = [float(r) for r in _column(rows, "fim/errors") if r]
    assert errors == sorted(errors) and errors[-1] == callback.errors >= 5  # probes, validations, evaluation
    assert not (callback.folder.path / "ood_metrics.json").exists()
    for ckpt in sorted((tmp_path / "ckpt").glob("*.ckpt")):  # checkpoints are intact and load
        state = torch.load(ckpt, weights_only=False)
        assert "state_dict" in state and any(k.startswith("FIMNormCallback") for k in state["callbacks"])
    assert {p.name for p in (tmp_path / "ckpt").glob("*.ckpt")} == {
        "epoch=1-step=5.ckpt",
        "epoch=2-step=10.ckpt",
    }


def _column(rows: list[str], name: str) -> list[str]:
    header = rows[0].split(",")
    return [r.split(",")[header.index(name)] for r in rows[1:]]


def test_on_error_raise_restores_strictness(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        _breaking_fit(tmp_path, "raise")


def test_what_can_be_known_before_training_fails_before_it(tmp_path: Path) -> None:
    class WrongShape(Glow):
        def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
            return super().log_likelihood(x).sum()  # reduced over the batch: not per sample

    class BatchStatistics(Glow):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.norm = torch.nn.BatchNorm2d(1, track_running_stats=False)

    arguments = ((1, 8, 8), 17)
    options = dict(n_levels=1, n_steps=1, hidden_channels=4, n_samples=0)
    for model, error, scoring in (
        (WrongShape(*arguments, **options), "one value per sample", Scoring()),
        (
            BatchStatistics(*arguments, **options),
            r"norm \(BatchNorm2d\) normalises with batch statistics",
            Scoring(),
        ),
        (Glow(*arguments, **options), "noise draws needs .* `noise_stream`", Scoring(noise_draws=4)),
    ):
        callback = _callback(scoring=scoring)
        trainer = L.Trainer(max_steps=4, callbacks=[callback], logger=False, default_root_dir=tmp_path)
        with pytest.raises(Exception, match=error):
            trainer.fit(model, _datamodule())
        assert trainer.global_step == 0
