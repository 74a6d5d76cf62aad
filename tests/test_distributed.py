"""Distributed scoring on CPU with the gloo backend and 2 processes: sharded work, gathered by sample id,
equal to the single-process result; and a Lightning DDP run whose evaluation equals a single-process one."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset
from toy_models import ConvEnergy

from fimcb import FIMNormCallback, per_sample_layer_norms
from fimcb.core.distributed import agreed, shard_units
from fimcb.data import ImageDataModule
from fimcb.evaluation.ood import evaluate_ood
from fimcb.evaluation.scoring import ScoringOptions, layer_norms_over
from fimcb.lightning.options import Tracking
from fimcb.metrics import KFAC, FittedDiagonal, LowRank
from fimcb.models import Glow
from fimcb.run.history import load_history

WORLD = 2
N_SAMPLES = 37  # odd: the ranks get different numbers of real samples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup() -> tuple[ConvEnergy, TensorDataset]:
    torch.manual_seed(0)
    model = ConvEnergy()
    ids = 1000 + torch.arange(N_SAMPLES)
    data = TensorDataset(torch.rand(N_SAMPLES, 1, 8, 8), torch.zeros(N_SAMPLES), ids)
    return model, data


def _score(group_size: int, with_ids: bool, max_samples: int | None) -> object:
    model, data = _setup()
    if not with_ids:
        data = TensorDataset(data.tensors[0])
    options = ScoringOptions(group_size=group_size, engine="hooks", max_samples=max_samples)
    return layer_norms_over(model, DataLoader(data, batch_size=8), options)


CASES = [(1, True, None), (5, True, None), (3, False, 20)]


def _fitted_metrics(rank: int, world: int) -> dict[str, dict]:
    """States of metrics fitted on this rank's share (every ``world``-th sample) of a fixed data set."""
    model, data = _setup()
    x = data.tensors[0][rank::world]
    states = {}
    for metric in (FittedDiagonal(n_samples=100), KFAC(n_samples=100), LowRank(n_reference=100)):
        metric.fit(model, DataLoader(TensorDataset(x), batch_size=5))
        states[metric.name] = metric.state_dict()
    return states


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = [_score(*case) for case in CASES]
        torch.save((results, _fitted_metrics(rank, WORLD), _failure_seen(rank)), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _failure_seen(rank: int) -> tuple[str, float]:
    """What each rank sees when work fails on rank 1 only, and a collective call made after it."""
    try:
        agreed(lambda: 1 / 0 if rank == 1 else rank)
        seen = "nothing"
    except Exception as err:
        seen = type(err).__name__
    after = torch.ones(1)
    dist.all_reduce(after)
    return seen, float(after)


@pytest.mark.parametrize(("n", "world"), [(7, 2), (8, 2), (5, 3), (1, 2)])
def test_shards_cover_every_unit_with_equal_sizes(n: int, world: int) -> None:
    shards = [shard_units(n, rank, world) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank makes the same collective calls
    assert sorted({u for s in shards for u in s}) == list(range(n))


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workers' results: one spawn of WORLD gloo processes for all tests of this module."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


def test_sharded_scoring_equals_single_process(spawned: Path) -> None:
    tmp_path = spawned
    for case in CASES:
        expected = _score(*case)
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)[0][CASES.index(case)]
            assert got.names == expected.names
            assert torch.equal(got.ids, expected.ids), case
            torch.testing.assert_close(got.values, expected.values, rtol=1e-5, atol=0)
            torch.testing.assert_close(got.log_likelihood, expected.log_likelihood)


def test_a_failure_on_one_rank_is_raised_on_every_rank(spawned: Path) -> None:
    seen = [torch.load(spawned / f"rank{r}.pt", weights_only=False)[2] for r in range(WORLD)]
    assert seen == [("FailedOnAnotherRank", WORLD), ("ZeroDivisionError", WORLD)]  # and none left waiting


def test_metrics_fitted_in_parallel_equal_one_fit_on_all_data(spawned: Path) -> None:
    single = _fitted_metrics(0, 1)
    ranks = [torch.load(spawned / f"rank{r}.pt", weights_only=False)[1] for r in range(WORLD)]
    model, _ = _setup()
    x = torch.rand(6, 1, 8, 8)
    for name, cls in (("diagonal", FittedDiagonal), ("kfac", KFAC)):  # reduced statistics: equal
        expected = cls()
        expected.load_state_dict(single[name])
        for state in ranks:
            metric = cls()
            metric.load_state_dict(state[name])
            torch.testing.assert_close(
                per_sample_layer_norms(model, x, metric=metric, engine="loop").values,
                per_sample_layer_norms(model, x, metric=expected, engine="loop").values,
                rtol=1e-5,
                atol=0,
            )
    low_rank = [LowRank(), LowRank()]
    for metric, state in zip(low_rank, ranks, strict=True):
        metric.load_state_dict(state["low_rank"])
    torch.testing.assert_close(  # every rank scores with rank zero's references
        per_sample_layer_norms(model, x, metric=low_rank[0], engine="loop").values,
        per_sample_layer_norms(model, x, metric=low_rank[1], engine="loop").values,
    )


def test_lightning_ddp_evaluation_equals_single_process(tmp_path: Path) -> None:
    def datamodule() -> ImageDataModule:
        return ImageDataModule(
            "digits", ood=["vflip", "noise"], val_size=33, train_size=64, test_size=31, batch_size=16
        )

    model = Glow(image_shape=(1, 8, 8), num_levels=17, n_levels=2, n_steps=1, hidden_channels=8, n_samples=0)
    callback = FIMNormCallback(
        Tracking(every_n_train_steps=2, n_train_probe=9, n_val_probe=7, track_train_batches=1), progress=False
    )
    trainer = L.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=WORLD,
        max_steps=3,
        callbacks=[callback],
        default_root_dir=tmp_path,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule())
    run_dir = tmp_path / "run" / "version_0"
    written = json.loads((run_dir / "ood_metrics.json").read_text())
    detectors = torch.load(run_dir / "fim_detectors.pt", weights_only=False)
    # ddp_spawn hands the trained weights back to this process: score them here in one process.
    dm = datamodule()
    dm.setup("fit")
    dm.setup("test")
    result = evaluate_ood(
        model,
        dm.val_dataloader(),
        dm.test_dataloader(),
        dm.ood_dataloaders(),
        options=ScoringOptions(max_samples=1000),
    )
    assert written.keys() == result.measures.keys()
    for ood, by_method in result.measures.items():
        for method, values in by_method.items():
            for metric, value in values.items():
                assert written[ood][method][metric] == pytest.approx(value, abs=1e-6), (ood, method, metric)
    for name, detector in result.detectors.items():
        for key, value in detector.state_dict().items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(detectors[name][key], value, rtol=1e-5, atol=1e-7)
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    column = header.index("fim/train_probe/log_norm_mean")
    logged_steps = [r.split(",")[header.index("step")] for r in rows[1:] if r.split(",")[column]]
    assert logged_steps == ["0", "2"]  # once per event: rank zero logs, no duplicates
    # Each rank holds its own training batch: rank zero's rows are its own samples, scored on its own.
    batch = load_history(run_dir / "history").select("train_batch")
    assert sorted(set(batch.step.tolist())) == [1, 2, 3]
    last = batch.step == 3  # after the last optimizer step: scored with the final weights
    x = torch.stack([dm.train_dataloader().dataset[int(i)][0] for i in batch.id[last]])
    torch.testing.assert_close(batch.total[last], per_sample_layer_norms(model, x).total, rtol=1e-4, atol=0)
