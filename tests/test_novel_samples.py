"""Picking the most and least novel samples of an evaluation and fetching them back from their loaders."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fimcb.evaluation import OODResult
from fimcb.novel_samples import collect_novel_samples, fetch_rows, novelty_method


class _Tokens(nn.Module):
    """A categorical over 5 tokens per position: integer inputs, no saliency."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.randn(3, 5))

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.log_softmax(-1).gather(1, x.T).T.sum(1)


def _result(scores: dict[str, torch.Tensor]) -> OODResult:
    return OODResult(
        metrics={}, scores={n: {"likelihood": -s, "fim_gaussian": s} for n, s in scores.items()}, detectors={}
    )


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
    assert test["most"]["index"].tolist() == [2, 1]  # NaN counts as most novel
    assert test["least"]["index"].tolist() == [4, 0]
    torch.testing.assert_close(test["most"]["input"], x["test"][[4, 2]])  # a group's first sample
    assert test["most"]["text"][1] == "-".join(map(str, x["test"][2].tolist()))
    assert "saliency" not in test["most"]  # token inputs have none
    assert samples["sets"]["odd"]["most"]["score"].tolist() == [5.0, 4.0]
