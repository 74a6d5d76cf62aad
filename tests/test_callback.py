"""FIMNormCallback in real Lightning runs: what it logs and writes, and that it never disturbs training."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import fields
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from fimcb import FIMNormCallback, ModelProtocolError, per_sample_layer_norms
from fimcb.attribution.influence import influence
from fimcb.attribution.saliency import input_saliency, saliency_map
from fimcb.data import ImageDataModule
from fimcb.detectors import DEFAULT_DETECTOR, DEFAULT_METHODS, build_detector
from fimcb.evaluation.ood import load_features, load_scores
from fimcb.lightning.options import Evaluation, Pictures, Scoring, Tracking
from fimcb.metrics import METRICS
from fimcb.models import Glow
from fimcb.run.history import TRAJECTORY_COLUMNS, load_history

OOD = ["sample_patches", "vflip", "noise"]


def _datamodule(**kwargs) -> ImageDataModule:
    options = dict(dataset="digits", ood=OOD, val_size=64, train_size=256, test_size=64, batch_size=32)
    return ImageDataModule(**{**options, **kwargs})


def _model() -> Glow:
    return Glow(
        image_shape=(1, 8, 8),
        num_levels=17,
        n_levels=2,
        n_steps=2,
        hidden_channels=8,
        n_samples=4,
        warmup_steps=1,
        lr=2e-3,
    )


GROUPS = {
    Tracking: {f.name for f in fields(Tracking)},
    Scoring: {f.name for f in fields(Scoring)},
    Evaluation: {"methods", "max_samples", "evaluate"},
    Pictures: {"pictures", "n_novel", "saliency", "influence_samples", "novelty_method"},
}
RENAMED = {"evaluate": "enabled", "pictures": "enabled"}


def _callback(**kwargs) -> FIMNormCallback:
    """The callback with these tests' small defaults; keyword arguments go to their option group
    (``evaluate`` and ``pictures`` to the ``enabled`` flags), the others to the callback itself."""
    flat = dict(
        every_n_train_steps=4,
        n_train_probe=12,
        n_val_probe=10,
        max_samples=48,
        progress=False,
        pictures=False,
    )
    flat.update(kwargs)
    groups = {
        group: group(**{RENAMED.get(k, k): flat.pop(k) for k in list(flat) if k in names})
        for group, names in GROUPS.items()
    }
    return FIMNormCallback(groups[Tracking], groups[Scoring], groups[Evaluation], groups[Pictures], **flat)


def _trainer(tmp_path: Path, callbacks: list, max_steps: int = 10, **kwargs) -> L.Trainer:
    options = dict(
        max_steps=max_steps,
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=5,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=1,
    )
    return L.Trainer(**{**options, **kwargs})


def _rows(trainer: L.Trainer) -> list[dict[str, str]]:
    with open(Path(trainer.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _steps_with(rows: list[dict[str, str]], key: str) -> list[int]:
    return [int(r["step"]) for r in rows if r.get(key)]


def test_fit_tracks_probes_and_writes_the_ood_evaluation(tmp_path: Path) -> None:
    L.seed_everything(0)
    model, dm, callback = _model(), _datamodule(), _callback()
    trainer = _trainer(tmp_path, [callback], max_steps=12)
    trainer.fit(model, dm)
    rows = _rows(trainer)
    assert _steps_with(rows, "fim/train_probe/log_norm_mean") == [0, 4, 8, 12]
    assert _steps_with(rows, "fim/val/log_norm_mean") == [5, 10]  # nothing during the sanity check
    for q in ("q05", "q25", "q50", "q75", "q95"):
        assert _steps_with(rows, f"fim/train_probe/log_norm_{q}") == [0, 4, 8, 12]

    # The last training-probe summary equals an independent recomputation on the final model.
    probe = torch.stack([dm.train_dataloader().dataset[i][0] for i in callback.probe_indices["train"]])
    norms = per_sample_layer_norms(model, probe, engine="loop")
    last = next(r for r in reversed(rows) if r.get("fim/train_probe/log_norm_mean"))
    assert float(last["fim/train_probe/log_norm_mean"]) == pytest.approx(
        float(norms.total.log().mean()), rel=1e-5
    )
    assert len(callback.probe_indices["train"]) == 12

    metrics = json.loads((Path(trainer.log_dir) / "ood_metrics.json").read_text())
    assert list(metrics) == OOD
    for ood in OOD:
        assert list(metrics[ood]) == list(DEFAULT_METHODS)
        for values in metrics[ood].values():
            assert set(values) == {"auroc", "aupr_in", "aupr_out", "fpr95"}
            assert all(0.0 <= v <= 1.0 for v in values.values())
    logged = {k: float(v) for r in rows for k, v in r.items() if k.startswith("ood/") and v}
    assert logged["ood/noise/fim_gaussian/auroc"] == pytest.approx(metrics["noise"]["fim_gaussian"]["auroc"])
    assert len(logged) == len(OOD) * len(DEFAULT_METHODS) * 4

    states = torch.load(Path(trainer.log_dir) / "fim_detectors.pt")
    restored = build_detector("fim_gaussian")
    restored.load_state_dict(states["fim_gaussian"])
    test_norms = callback.result.norms["test"]
    torch.testing.assert_close(restored.score(test_norms), callback.result.scores["test"]["fim_gaussian"])
    assert (Path(trainer.log_dir) / "images").is_dir()

    features = load_features(Path(trainer.log_dir) / "ood_features.pt")
    assert list(features) == ["fit", "test", *OOD]
    for name, norms in callback.result.norms.items():
        assert torch.equal(features[name].values, norms.values) and features[name].names == norms.names
        assert torch.equal(features[name].ids, norms.ids)


def _final_state(tmp_path: Path, with_callback: bool, **trainer_kwargs) -> tuple[dict, list]:
    L.seed_everything(123)
    model, dm = _model(), _datamodule()
    callbacks = [_callback(every_n_train_steps=2)] if with_callback else []
    trainer = _trainer(tmp_path / str(with_callback), callbacks, max_steps=8, **trainer_kwargs)
    trainer.fit(model, dm)
    losses = [r["train/nll_step"] for r in _rows(trainer) if r.get("train/nll_step")]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.update({f"opt/{i}": v for i, v in enumerate(_optimizer_tensors(trainer))})
    return state, losses


def _optimizer_tensors(trainer: L.Trainer) -> list[torch.Tensor]:
    opt_state = trainer.optimizers[0].state_dict()["state"]
    return [t.clone() for s in opt_state.values() for t in s.values() if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize(("accumulate", "precision"), [(1, "32-true"), (2, "32-true"), (1, "bf16-mixed")])
def test_training_is_bitwise_identical_with_and_without_the_callback(
    tmp_path: Path, accumulate: int, precision: str
) -> None:
    options = {"accumulate_grad_batches": accumulate, "log_every_n_steps": 1, "precision": precision}
    without, losses_without = _final_state(tmp_path, False, **options)
    with_cb, losses_with = _final_state(tmp_path, True, **options)
    assert losses_with == losses_without and len(losses_with) > 0
    assert without.keys() == with_cb.keys()
    for key in without:
        assert torch.equal(without[key], with_cb[key]), key


def test_validate_and_test_run_in_inference_mode(tmp_path: Path) -> None:
    model, dm, callback = _model(), _datamodule(), _callback()
    trainer = _trainer(tmp_path, [callback])
    assert trainer.validate_loop.inference_mode and trainer.test_loop.inference_mode  # the defaults
    trainer.validate(model, dm)
    trainer.test(model, dm)
    rows = _rows(trainer)
    assert _steps_with(rows, "fim/val/log_norm_mean") == [0]
    assert _steps_with(rows, "fim/test/log_norm_mean") == [0]
    assert all(p.grad is None for p in model.parameters())


def test_resume_continues_without_duplicate_events(tmp_path: Path) -> None:
    L.seed_everything(0)
    first_cb = _callback(evaluate=False)
    trainer = _trainer(tmp_path, [first_cb], max_steps=8)
    model, dm = _model(), _datamodule()
    trainer.fit(model, dm)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed_cb = _callback(evaluate=False, seed=999)  # a new seed must not change the probe set
    resumed = _trainer(tmp_path, [resumed_cb], max_steps=16)
    resumed.fit(_model(), _datamodule(), ckpt_path=ckpt)
    assert resumed_cb.probe_indices == first_cb.probe_indices
    assert _steps_with(_rows(trainer), "fim/train_probe/log_norm_mean") == [0, 4, 8]
    assert _steps_with(_rows(resumed), "fim/train_probe/log_norm_mean") == [12, 16]


def test_model_without_log_likelihood_fails_before_training(tmp_path: Path) -> None:
    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(64, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0].flatten(1)).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = _trainer(tmp_path, [_callback()], max_steps=2)
    with pytest.raises(ModelProtocolError, match="has no method `log_likelihood"):
        trainer.fit(Plain(), _datamodule())


def test_ood_loaders_given_to_the_callback_and_groups(tmp_path: Path) -> None:
    dm = _datamodule()
    callback = _callback(
        ood_loaders={"flipped": dm.ood_dataloaders()["vflip"]},
        group_size=4,
        methods=["fim_gaussian", "typicality"],
    )
    trainer = _trainer(tmp_path, [callback], max_steps=4)
    trainer.fit(_model(), dm)
    metrics = json.loads((Path(trainer.log_dir) / "ood_metrics.json").read_text())
    assert list(metrics) == ["flipped"] and list(metrics["flipped"]) == ["fim_gaussian", "typicality"]
    assert len(callback.result.norms["test"]) == 48 // 4
    assert math.isfinite(metrics["flipped"]["fim_gaussian"]["auroc"])


@pytest.mark.parametrize("metric", ["layer_scalar", "kfac"])
def test_a_fitted_metric_is_fitted_on_training_data_used_and_saved(tmp_path: Path, metric: str) -> None:
    model, dm = _model(), _datamodule()
    callback = _callback(metric=metric, methods=["fim_gaussian_full", "fisher_method", "total_norm"])
    trainer = _trainer(tmp_path, [callback], max_steps=4)
    trainer.fit(model, dm)
    fitted = callback.result.metric
    assert fitted.name == metric and fitted.fitted
    restored = METRICS[metric]()
    restored.load_state_dict(torch.load(Path(trainer.log_dir) / "fim_metric.pt", weights_only=True))
    x = torch.stack([dm.test_dataloader().dataset[i][0] for i in range(8)])
    expected = per_sample_layer_norms(model, x, metric=fitted, engine="loop")
    again = per_sample_layer_norms(model, x, metric=restored, engine="loop")
    torch.testing.assert_close(again.values, expected.values)
    torch.testing.assert_close(callback.result.norms["test"].values[:8], expected.values, rtol=1e-4, atol=0)
    metrics = json.loads((Path(trainer.log_dir) / "ood_metrics.json").read_text())
    assert list(metrics["noise"]) == ["fim_gaussian_full", "fisher_method", "total_norm"]


def test_unknown_metric_fails_when_the_callback_is_built() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        FIMNormCallback(scoring=Scoring(metric="fullest"))


def test_wandb_offline_run_receives_the_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger
    from wandb_records import history_rows

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="fimcb-test", save_dir=str(tmp_path), offline=True)
    callback = _callback()
    trainer = _trainer(tmp_path, [callback], max_steps=8, logger=logger)
    trainer.fit(_model(), _datamodule())
    wandb.finish()
    (run_dir,) = tmp_path.glob("wandb/offline-run-*")
    rows = history_rows(run_dir)

    def steps(key: str) -> list[int]:
        return [r["trainer/global_step"] for r in rows if key in r]

    assert steps("fim/train_probe/log_norm_mean") == [0, 4, 8]
    assert steps("fim/val/log_norm_q50") == [5]
    assert steps("ood/noise/fim_gaussian/auroc") == [8]
    final = next(r for r in rows if "ood/vflip/typicality/fpr95" in r)
    assert final["ood/vflip/typicality/fpr95"] == pytest.approx(
        callback.result.measures["vflip"]["typicality"]["fpr95"]
    )
    assert all(len([k for k in r if k.startswith("ood/")]) in (0, 3 * len(DEFAULT_METHODS) * 4) for r in rows)
    images = [r for r in rows if "samples/_type" in r]  # nested keys come back joined by "/"
    assert images and images[0]["samples/_type"] == "images/separated"
    assert list(run_dir.glob("files/media/images/samples_*.png"))


def test_history_records_every_event_and_survives_a_kill_and_resume(tmp_path: Path) -> None:
    L.seed_everything(0)
    dm = _datamodule()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)
    first = _callback(evaluate=False, history_flush_rows=25)  # several parts: memory stays bounded
    trainer = _trainer(
        tmp_path,
        [first, checkpoints],
        max_steps=10,
        logger=CSVLogger(tmp_path, "run", 0),
        enable_checkpointing=True,
    )
    trainer.fit(_model(), dm)  # "killed" at step 10, after the checkpoint of step 8
    history_dir = Path(trainer.log_dir) / "history"
    assert len(list(history_dir.glob("part-*.pt"))) > 2
    before = load_history(history_dir)
    assert sorted(set(before.select("train_probe").step.tolist())) == [0, 4, 8]
    assert sorted(set(before.select("val").step.tolist())) == [5, 10]

    # The logged summary of the last training-probe event is the mean of its rows.
    rows = before.select("train_probe")
    last = rows.total[rows.step == 8].double().log().mean()
    logged = next(r for r in reversed(_rows(trainer)) if r.get("fim/train_probe/log_norm_mean"))
    assert float(logged["fim/train_probe/log_norm_mean"]) == pytest.approx(float(last), rel=1e-5)
    assert sorted(rows.id[rows.step == 8].tolist()) == sorted(first.probe_indices["train"])

    resumed = _trainer(
        tmp_path, [_callback(evaluate=False)], max_steps=16, logger=CSVLogger(tmp_path, "run", 0)
    )
    resumed.fit(_model(), _datamodule(), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=8.ckpt")
    after = load_history(history_dir)
    keys = list(zip(after.split, after.step.tolist(), after.id.tolist(), strict=True))
    assert len(keys) == len(set(keys))  # the replayed validation of step 10 replaced the first one
    train_steps = after.select("train_probe").step.tolist()
    assert sorted(set(train_steps)) == [0, 4, 8, 12, 16] and len(train_steps) == 5 * 12
    val_steps = after.select("val").step.tolist()
    assert sorted(set(val_steps)) == [5, 10, 15] and len(val_steps) == 3 * 10
    ids, steps, grid = after.trajectories("train_probe")
    assert sorted(ids.tolist()) == sorted(resumed.callbacks[0].probe_indices["train"])
    assert grid.shape == (12, 5) and torch.isfinite(grid).all()
    assert steps.tolist() == [0, 4, 8, 12, 16]


def test_a_checkpoint_saved_after_fit_restores_the_fitted_detectors_and_metric(tmp_path: Path) -> None:
    model, dm = _model(), _datamodule()
    callback = _callback(metric="layer_scalar", methods=["fim_gaussian_full", "typicality"])
    trainer = _trainer(tmp_path, [callback], max_steps=4)
    trainer.fit(model, dm)
    trainer.save_checkpoint(tmp_path / "done.ckpt")
    states = torch.load(tmp_path / "done.ckpt", weights_only=False)["callbacks"]
    (state,) = [v for k, v in states.items() if k.startswith("FIMNormCallback")]
    restored = _callback()
    restored.load_state_dict(state)
    assert sorted(restored.detectors) == ["fim_gaussian_full", "typicality"]
    metric = METRICS["layer_scalar"]()
    metric.load_state_dict(restored.metric_state)
    x = torch.stack([dm.test_dataloader().dataset[i][0] for i in range(6)])
    norms = per_sample_layer_norms(model, x, metric=metric)
    for name, detector in callback.result.detectors.items():
        torch.testing.assert_close(restored.detectors[name].score(norms), detector.score(norms))


def test_pictures_novel_samples_and_dashboards_from_one_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every picture artifact of a run, read back from the run directory and the offline W&B files and
    checked against independent recomputations on the final model."""
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger
    from PIL import Image
    from wandb_records import history_rows

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    L.seed_everything(0)
    logger = WandbLogger(project="fimcb-test", save_dir=str(tmp_path), offline=True)
    model, dm = _model(), _datamodule()
    callback = _callback(pictures=True, n_novel=3, influence_samples=20, track_train_batches=4)
    trainer = _trainer(tmp_path, [callback], max_steps=8, logger=logger)
    trainer.fit(model, dm)
    wandb.finish()
    run = callback.folder.path  # <save_dir>/<project>/<W&B run id>: this run's own
    assert run == tmp_path / "fimcb-test" / logger.version

    # Per-sample scores, and the most / least novel samples with their inputs, heat maps, influences.
    scores = load_scores(run / "ood_scores.pt")
    assert set(scores) == {"test", *OOD}
    torch.testing.assert_close(
        scores["noise"]["fim_gaussian"], callback.result.scores["noise"]["fim_gaussian"]
    )
    samples = torch.load(run / "novel_samples.pt", weights_only=True)
    assert samples["method"] == DEFAULT_DETECTOR and list(samples["sets"]) == ["test", *OOD]
    test_set = dm.test_dataloader().dataset
    for name, entry in samples["sets"].items():
        ranked = torch.sort(scores[name][DEFAULT_DETECTOR], descending=True)
        torch.testing.assert_close(entry["most"]["score"], ranked.values[:3])
        torch.testing.assert_close(entry["least"]["score"], ranked.values.flip(0)[:3])
        if name == "test":
            expected = torch.stack([test_set[int(i)][0] for i in entry["most"]["index"]])
            torch.testing.assert_close(entry["most"]["input"], expected)
    most = samples["sets"]["test"]["most"]
    expected_map = saliency_map(input_saliency(model, most["input"]))
    torch.testing.assert_close(
        most["saliency"], expected_map, rtol=1e-4, atol=1e-6 * float(expected_map.max())
    )
    assert most["saliency"].shape == (3, 8, 8) and float(most["saliency"].min()) >= 0

    train_set = dm.train_dataloader().dataset
    queries = samples["influence"]["queries"]
    assert len(queries) == 2 * (1 + len(OOD))
    first = queries[0]
    train_x = torch.stack([train_set[int(i)][0] for i in first["top"]["index"]])
    torch.testing.assert_close(first["top"]["input"], train_x)
    direct = influence(model, first["input"][None], train_x).values[0]
    torch.testing.assert_close(
        first["top"]["value"], direct, rtol=1e-4, atol=1e-6 * float(direct.abs().max())
    )
    probe = torch.stack([train_set[i][0] for i in callback.probe_indices["influence"]])
    everyone = influence(model, first["input"][None], probe).values[0]  # the whole influence probe, by hand
    torch.testing.assert_close(first["top"]["value"], everyone.sort(descending=True).values[:6])
    torch.testing.assert_close(first["bottom"]["value"], everyone.sort().values[:6])

    # Figures: decodable, not blank PNGs.
    pngs = {p.stem: p for p in (run / "figures").glob("*.png")}
    assert {"novelty_over_time", "roc_curves", "novel_samples_most", "influence"} <= set(pngs)
    for path in pngs.values():
        pixels = np.asarray(Image.open(path))
        assert pixels.ndim == 3 and pixels.std() > 0

    # History: the training batches' own samples beside the probes.
    history = load_history(run / "history")
    batch_rows = history.select("train_batch")
    assert sorted(set(batch_rows.step.tolist())) == [4, 8] and len(batch_rows) == 2 * 32

    # W&B: a histogram per tracking event, the figures and the trajectory table.
    (wandb_dir,) = tmp_path.glob("wandb/offline-run-*")
    rows = history_rows(wandb_dir)
    hist_steps = [r["trainer/global_step"] for r in rows if "fim/train_probe/log_norm_hist/_type" in r]
    assert hist_steps == [0, 4, 8]
    (hist,) = [r for r in rows if "fim/val/log_norm_hist/values" in r]
    assert sum(hist["fim/val/log_norm_hist/values"]) == 10
    for key in ("fimcb/roc_curves", "fimcb/novel_samples_most", "fimcb/layer_heatmap_val"):
        assert any(f"{key}/_type" in r for r in rows), key
    (roc_row,) = [r for r in rows if "fimcb/roc/fim_gaussian_table/_type" in r]  # an interactive ROC chart
    roc = json.loads((wandb_dir / "files" / roc_row["fimcb/roc/fim_gaussian_table/path"]).read_text())
    noise = next(key for _, key, _ in roc["data"] if key.startswith("noise ("))
    assert noise == f"noise ({callback.result.measures['noise']['fim_gaussian']['auroc']:.3f})"
    (table_row,) = [r for r in rows if "fimcb/trajectories/_type" in r]
    table = json.loads((wandb_dir / "files" / table_row["fimcb/trajectories/path"]).read_text())
    assert table["columns"] == list(TRAJECTORY_COLUMNS) and len(table["data"]) == len(history)


@pytest.mark.parametrize("bar", ["tqdm", "rich", None])
def test_scoring_progress_follows_the_trainers_progress_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, bar: str | None
) -> None:
    """Lightning's own bar draws the scoring passes: a tqdm line under its main bar, or a task of its Rich
    display (Lightning's default where rich is installed); no bar, no scoring bars."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    import fimcb.lightning.progress

    tasks: list[str] = []
    real = fimcb.lightning.progress._RichTask.__init__

    def recorded(self, bar_callback, total=None, desc="", **kwargs):
        tasks.append(f"{desc}/{total}")
        real(self, bar_callback, total=total, desc=desc, **kwargs)

    monkeypatch.setattr(fimcb.lightning.progress._RichTask, "__init__", recorded)
    bars = {"tqdm": [TQDMProgressBar()], "rich": [RichProgressBar()], None: []}[bar]
    callbacks = [_callback(progress=True), *bars]
    trainer = _trainer(tmp_path, callbacks, max_steps=2, enable_progress_bar=bar is not None)
    trainer.fit(_model(), _datamodule())
    out = capsys.readouterr().out  # Lightning's bars write to stdout; so do the scoring bars
    assert ("fimcb: scoring noise" in out) == (bar == "tqdm")
    assert ("/48 " in out) == (bar == "tqdm")  # the total is max_samples
    assert ("fimcb: scoring noise/48" in tasks) == (bar == "rich")


def test_failing_pictures_warn_and_keep_the_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no pictures today")

    monkeypatch.setattr("fimcb.lightning.callback.collect_novel_samples", broken)
    trainer = _trainer(tmp_path, [_callback(pictures=True)], max_steps=4)
    with pytest.warns(UserWarning, match="most novel samples failed .*no pictures today"):
        trainer.fit(_model(), _datamodule())
    run = Path(trainer.log_dir)
    assert json.loads((run / "ood_metrics.json").read_text())["noise"]["fim_gaussian"]["auroc"] >= 0
    assert (run / "ood_scores.pt").is_file() and not (run / "novel_samples.pt").exists()
    figures = {p.stem for p in (run / "figures").glob("*.png")}  # the other pictures are kept
    assert {"roc_curves", "novelty_over_time"} <= figures and "novel_samples_most" not in figures


def test_tensorboard_run_holds_histograms_over_steps_and_figures(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = _callback(pictures=True, n_novel=2, influence_samples=0, saliency=False)
    trainer = _trainer(tmp_path, [callback], max_steps=8, logger=logger)
    trainer.fit(_model(), _datamodule())
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    hists = events.Histograms("fim/train_probe/log_norm_hist")
    assert [h.step for h in hists] == [0, 4, 8]
    assert all(h.histogram_value.num == 12 for h in hists)  # one value per probe sample
    history = load_history(Path(logger.log_dir) / "history")
    last = history.select("train_probe")
    last_logs = last.total[last.step == 8].double().log()
    assert hists[-1].histogram_value.sum == pytest.approx(float(last_logs.sum()), rel=1e-5)
    images = set(events.Tags()["images"])
    assert {"fimcb/roc_curves", "fimcb/novelty_over_time", "fimcb/novel_samples_most"} <= images
    assert "fimcb/influence" not in images  # influence_samples=0
    assert "fimcb/trajectories/text_summary" in events.Tags()["tensors"]


def test_without_an_evaluation_the_history_figures_are_still_drawn(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [_callback(pictures=True, evaluate=False)], max_steps=4)
    trainer.fit(_model(), _datamodule())
    figures = {p.stem for p in (Path(trainer.log_dir) / "figures").glob("*.png")}
    assert {"novelty_over_time", "layer_heatmap_train_probe", "training_curves"} <= figures
    assert "roc_curves" not in figures


def test_bad_picture_and_batch_options_fail_early_or_are_skipped(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"pictures\.n_novel must be a positive integer"):
        FIMNormCallback(pictures=Pictures(n_novel=0))
    with pytest.raises(ValueError, match=r"n_train_probe \(12\) holds no group of scoring.group_size=40"):
        _callback(group_size=40)
    # Batches of 32 hold no group of 40: not tracked, and training goes on.
    callback = _callback(
        track_train_batches=1, group_size=40, n_train_probe=40, n_val_probe=0, evaluate=False
    )
    trainer = _trainer(tmp_path, [callback], max_steps=2, val_check_interval=None, limit_val_batches=0)
    trainer.fit(_model(), _datamodule())
    assert "train_batch" not in load_history(Path(trainer.log_dir) / "history").split
