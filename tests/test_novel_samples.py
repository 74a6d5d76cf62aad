"""Picking the most and least novel samples of an evaluation and fetching them back from their loaders."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fimcb.engine import LayerNorms
from fimcb.evaluation.ood import OODResult
from fimcb.viz.novel_samples import collect_novel_samples, fetch_rows, novelty_method


class _Tokens(nn.Module):
    """A categorical over 5 tokens per position: integer inputs, no saliency."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.randn(3, 5))

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.log_softmax(-1).gather(1, x.T).T.sum(1)


def _result(scores: dict[str, torch.Tensor]) -> OODResult:
    scored = {n: {"likelihood": -s, "fim_gaussian": s} for n, s in scores.items()}
    return OODResult(measures={}, scores=scored, detectors={})


def test_fetch_rows_walks_batches_in_order() -> None:
    x = torch.arange(23.0)[:, None]
    loader = DataLoader(TensorDataset(x), batch_size=5)
    torch.testing.assert_close(fetch_rows(loader, torch.tensor([22, 0, 7, 7])), x[[22, 0, 7, 7]])
    with pytest.raises(IndexError, match="23 samples"):
        fetch_rows(loader, torch.tensor([23]))


def test_novelty_method_prefers_a_fim_detector() -> None:
    result = _result({"test": torch.zeros(3)})
    assert novelty_method(result) == "fim_gaussian"
    assert novelty_method(result, "likelihood") == "likelihood"
    with pytest.raises(ValueError, match="was not evaluated"):
        novelty_method(result, "typicality")


def test_most_and_least_novel_with_groups_and_text() -> None:
    torch.manual_seed(0)
    model = _Tokens()
    x = {"test": torch.randint(0, 5, (12, 3)), "odd": torch.randint(0, 5, (12, 3))}
    scores = {"test": torch.tensor([0.0, 5.0, float("nan"), 1.0, -2.0, 3.0]), "odd": torch.arange(6.0)}
    loaders = {n: DataLoader(TensorDataset(v), batch_size=5) for n, v in x.items()}
    samples = collect_novel_samples(
        model, _result(scores), loaders, k=2, group_size=2, decode=lambda t: "-".join(map(str, t.tolist()))
    )
    test = samples["sets"]["test"]
    assert test["most"]["index"].tolist() == [4, 2]  # rows 2 (NaN counts as most novel) and 1, as positions
    assert test["least"]["index"].tolist() == [8, 0]
    torch.testing.assert_close(test["most"]["input"], x["test"][[4, 2]])  # a group's first sample
    assert test["most"]["text"][1] == "-".join(map(str, x["test"][2].tolist()))
    assert "saliency" not in test["most"]  # token inputs have none
    assert samples["sets"]["odd"]["most"]["score"].tolist() == [5.0, 4.0]


class _Vectors(nn.Module):
    """A Gaussian over 3-vectors: float inputs that are not images."""

    def __init__(self) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(3))

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        return -0.5 * (x - self.mu).pow(2).sum(1)


class _Pixels(nn.Module):
    """A Gaussian over 1 x 2 x 2 images."""

    def __init__(self) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.full((1, 2, 2), 0.5))

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        return -0.5 * (x - self.mu).pow(2).flatten(1).sum(1)


def test_ids_from_the_norms_nan_scores_and_inputs_without_pictures() -> None:
    torch.manual_seed(0)
    x = torch.rand(6, 1, 2, 2)
    scores = torch.tensor([1.0, float("nan"), 3.0, 0.0, 2.0, -1.0])
    result = _result({"test": scores})
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    result.norms = {"test": LayerNorms(torch.ones(6, 1), ("mu",), torch.zeros(6), ids=ids)}
    loaders = {"test": DataLoader(TensorDataset(x), batch_size=4)}
    samples = collect_novel_samples(_Pixels(), result, loaders, k=3, train_inputs=torch.rand(5, 1, 2, 2))
    most = samples["sets"]["test"]["most"]
    assert most["index"].tolist() == [11, 12, 14]  # sample ids, not score rows
    assert torch.isnan(most["saliency"][0]).all()  # NaN score: no heat map
    expected = 2 * (x[[2, 4]] - 0.5).abs().squeeze(1)  # ∇_x ||x - μ||² = 2 (x - μ) for an identity metric
    torch.testing.assert_close(most["saliency"][1:], expected)
    queries = samples["influence"]["queries"]
    assert [q["index"] for q in queries] == [12, 14]  # the NaN-scored sample is no query

    vectors = collect_novel_samples(
        _Vectors(),
        _result({"test": torch.arange(4.0)}),
        {"test": DataLoader(TensorDataset(torch.rand(4, 3)), batch_size=2)},
        k=2,
    )
    assert "saliency" not in vectors["sets"]["test"]["most"]  # float inputs that are not images
