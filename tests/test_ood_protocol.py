"""The seeds-and-draws protocol of ``benchmarks/ood.py``: in-distribution shifts, disjoint draws, and the
choice of the default detector without OOD data, on inputs with known answers."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from fimcb import LayerNorms
from fimcb.data.datamodule import ImageSplit

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # ood.py imports its sibling finished_runs
spec = importlib.util.spec_from_file_location("ood_benchmark", BENCHMARKS / "ood.py")
assert spec is not None and spec.loader is not None
ood = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = ood
spec.loader.exec_module(ood)


def _images(n: int = 12, channels: int = 3, side: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, side, side), generator=generator, dtype=torch.uint8)


@pytest.mark.parametrize("name", list(ood.SHIFTS))
def test_every_shift_keeps_shape_and_levels_changes_images_and_is_deterministic(name: str) -> None:
    images = _images()
    out = ood.SHIFTS[name](images, torch.Generator().manual_seed(1))
    again = ood.SHIFTS[name](images, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, again)
    assert (out != images).flatten(1).any(dim=1).all()  # every image is changed


def test_pixelate_makes_two_by_two_blocks_of_their_mean() -> None:
    images = _images(side=6)
    out = ood.SHIFTS["pixelate"](images, torch.Generator())
    blocks = images.double().unfold(-2, 2, 2).unfold(-2, 2, 2).mean(dim=(-1, -2)).round()
    assert torch.equal(out[..., ::2, ::2].double(), blocks) and torch.equal(
        out[..., 1::2, 1::2].double(), blocks
    )


def test_tiles_moves_quadrants_and_keeps_every_pixel() -> None:
    images = _images(side=8)
    out = ood.SHIFTS["tiles"](images, torch.Generator())
    assert torch.equal(out[..., :4, 4:], images[..., :4, :4])  # top-left moved right
    assert torch.equal(out[..., :4, :4], images[..., 4:, :4])  # bottom-left moved up
    assert torch.equal(out.flatten(1).sort().values, images.flatten(1).sort().values)


def test_blend_is_the_mean_of_two_different_images_and_contrast_halves_the_spread() -> None:
    images = _images(n=20)
    blended = ood.SHIFTS["blend"](images, torch.Generator().manual_seed(0)).double()
    means = ((images.double()[:, None] + images.double()[None, :]) / 2).round()  # [a, b, C, H, W]
    for out in blended:
        pairs = (means == out).flatten(2).all(dim=2).nonzero().tolist()
        assert any(a != b for a, b in pairs)
    contrast = ood.SHIFTS["contrast"](images, torch.Generator()).double()
    ratio = contrast.flatten(1).std(dim=1) / images.double().flatten(1).std(dim=1)
    assert torch.allclose(ratio, torch.full_like(ratio, 0.5), atol=0.02)


def test_shift_sets_take_each_draws_images_from_that_draws_validation_rows_only() -> None:
    images = _images(n=40)
    val = ImageSplit(images, torch.arange(40), 256, torch.arange(40))
    # 40 validation images, of which the detectors see 2 draws of 10 rows (a cap of 20): 5 per shift draw
    loaders = ood.shift_loaders(val, rows=10, per_draw=5, draws=2, batch_size=7)
    assert set(loaders) == {ood.SHIFT_PREFIX + s for s in ood.SHIFTS}
    tiles = loaders[ood.SHIFT_PREFIX + "tiles"].dataset
    assert tiles.targets.tolist() == [*range(5), *range(10, 15)]  # draw 0: rows 0.., draw 1: rows 10..
    assert torch.equal(tiles.images, ood.SHIFTS["tiles"](images[tiles.targets], torch.Generator()))
    blend = loaders[ood.SHIFT_PREFIX + "blend"].dataset.images.double()
    means = ((images.double()[:, None] + images.double()[None, :]) / 2).round()
    for row, out in enumerate(blend):
        pairs = (means == out).flatten(2).all(dim=2).nonzero()
        own = range(0, 5) if row < 5 else range(10, 15)  # the images of the row's own draw
        assert any(int(a) in own and int(b) in own and a != b for a, b in pairs), row


def test_draws_are_disjoint_equal_and_cover_the_rows_in_order() -> None:
    norms = LayerNorms(torch.arange(1.0, 11.0)[:, None], ("a",), torch.zeros(10))
    parts = [ood.draw(norms, d, 3) for d in range(3)]
    assert [p.values[:, 0].tolist() for p in parts] == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def _result(selection: dict[str, float], shifts: tuple[str, ...] = ("blend", "tiles")) -> dict:
    """One draw of one run whose selection AUROC of detector d is ``selection[d]`` on every shift."""
    scores = {**selection, "likelihood": 0.5, "typicality": 0.5}
    return {"draws": [{"aurocs": {}, "selection": {s: scores for s in shifts}}]}


def test_selection_takes_the_best_identity_detector_averaged_over_models() -> None:
    results = {
        "runs/a/seed_0": {"identity": {1: _result({"fim_gaussian": 0.6, "total_norm": 0.9})}},
        "runs/a/seed_1": {"identity": {1: _result({"fim_gaussian": 0.6, "total_norm": 0.7})}},
        "runs/b/seed_0": {"identity": {1: _result({"fim_gaussian": 0.8, "total_norm": 0.6})}},
    }
    table, chosen = ood.selection(results, tolerance=0.0)
    # per model first: a: total_norm 0.8, fim 0.6; b: total_norm 0.6, fim 0.8; tie at 0.7 each
    assert "2 models" in table
    assert chosen == ("identity", "fim_gaussian")  # tied: the detector registered first


def test_selection_ties_go_to_the_first_registered_and_a_fitted_metric_must_win_clearly() -> None:
    plain = {"fim_gaussian": 0.700, "fim_gaussian_full": 0.703, "total_norm": 0.6}
    results = {
        "runs/a/seed_0": {
            "identity": {1: _result(plain)},
            "low_rank": {1: _result({"fim_gaussian": 0.703, "fim_gaussian_full": 0.9, "total_norm": 0.99})},
        },
        "runs/b/seed_0": {"identity": {1: _result(plain)}},
    }
    table, chosen = ood.selection(results, tolerance=0.005)
    assert chosen == ("identity", "fim_gaussian")  # within 0.005 of the best
    # only the chosen detector is compared across metrics: 0.703 is not 0.005 above 0.700
    assert "low_rank + fim_gaussian on a: 0.703, identity 0.700: does not replace identity" in table
    results["runs/a/seed_0"]["low_rank"] = {1: _result({"fim_gaussian": 0.72})}
    assert ood.selection(results, tolerance=0.005)[1] == ("low_rank", "fim_gaussian")


def test_no_selection_without_shift_data() -> None:
    results = {"runs/a/seed_0": {"identity": {1: {"draws": [{"aurocs": {}}]}}}}
    assert ood.selection(results, tolerance=0.005)[1] is None


def test_grid_is_mean_and_sd_over_seeds_and_draws_with_a_dash_where_a_metric_was_not_scored() -> None:
    def run(*aurocs: float) -> dict:
        return {"draws": [{"aurocs": {"noise": {"fim_gaussian": a, "typicality": 0.5}}} for a in aurocs]}

    results = {
        "runs/vae/seed_0": {"identity": {1: run(0.6, 0.8)}, "low_rank": {1: run(0.9, 0.9)}},
        "runs/vae/seed_1": {"identity": {1: run(0.7, 0.9)}},
        "runs/flow/seed_0": {"identity": {1: run(0.5, 0.5)}},
    }
    table = ood.grid(results, [("identity", "fim_gaussian"), ("low_rank", "fim_gaussian")], k=1)
    rows = table.splitlines()[2:]
    assert rows[0] == "| vae (2 seeds) | noise | 0.750 ± 0.129 | 0.900 ± 0.000 |"  # sd of 0.6, 0.8, 0.7, 0.9
    assert rows[1] == "| flow (1 seed) | noise | 0.500 ± 0.000 | – |"


def _cache(run_dir: Path, args: argparse.Namespace, tag: str, norms: LayerNorms, seconds: float) -> None:
    path = ood.cache_path(run_dir, args, "identity", 1, tag)
    path.parent.mkdir(exist_ok=True)
    torch.save(({"test": asdict(norms)}, seconds, 0.0), path)


def test_averaged_features_are_the_row_mean_of_the_passes_and_refuse_different_rows(tmp_path: Path) -> None:
    args = argparse.Namespace(max_samples=4, shifts=False, fisher="empirical", draws=1, average=["", "b"])
    names = ("a", "b")
    ids = torch.arange(4)
    one = LayerNorms(values=torch.rand(4, 2), names=names, log_likelihood=torch.randn(4), ids=ids)
    two = LayerNorms(values=torch.rand(4, 2), names=names, log_likelihood=torch.randn(4), ids=ids)
    _cache(tmp_path, args, "", one, 1.0)
    _cache(tmp_path, args, "b", two, 2.0)
    averaged, seconds, _ = ood.averaged_features(tmp_path, args, "identity", 1)
    torch.testing.assert_close(averaged["test"].values, (one.values + two.values) / 2)
    torch.testing.assert_close(averaged["test"].log_likelihood, (one.log_likelihood + two.log_likelihood) / 2)
    assert torch.equal(averaged["test"].ids, ids) and seconds == 3.0
    for other_ids in (ids.flip(0), None):  # other rows, or rows whose ids one pass did not keep
        _cache(tmp_path, args, "b", LayerNorms(two.values, names, two.log_likelihood, ids=other_ids), 2.0)
        with pytest.raises(SystemExit, match="did not score the same rows"):
            ood.averaged_features(tmp_path, args, "identity", 1)
    args.average = ["", "missing"]
    with pytest.raises(SystemExit, match="missing"):
        ood.averaged_features(tmp_path, args, "identity", 1)
