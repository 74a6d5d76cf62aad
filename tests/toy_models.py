"""Small likelihood models covering the layer types the engine must handle, for exactness tests."""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn


class LinearFlow(nn.Module):
    """Affine flow z = (W x + b)·exp(s) with a standard normal base: an exact density."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.log_scale = nn.Parameter(0.1 * torch.randn(dim))

    def log_likelihood(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        z = self.linear(x) * self.log_scale.exp()
        logdet = torch.linalg.slogdet(self.linear.weight)[1] + self.log_scale.sum()
        return -0.5 * z.pow(2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) + logdet


class ConvEnergy(nn.Module):
    """Conv2d, GroupNorm, ConvTranspose2d and Linear; an unnormalised log-density (fine for gradients)."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)
        self.head = nn.Linear(3, 1)

    def log_likelihood(self, x: Tensor) -> Tensor:
        h = torch.relu(self.norm(self.conv(x)))
        h = torch.tanh(self.up(h)).mean(dim=(2, 3))
        return -self.head(h).squeeze(1).pow(2) - 0.5 * x.flatten(1).pow(2).sum(1)


class TokenBigram(nn.Module):
    """Embedding + Linear bigram language model: exact log-likelihood of integer token sequences."""

    def __init__(self, vocab: int = 7, dim: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def log_likelihood(self, tokens: Tensor) -> Tensor:
        logits = self.out(self.embed(tokens[:, :-1]))
        logp = torch.log_softmax(logits, dim=-1)
        return logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1).sum(1)


class TiedModel(nn.Module):
    """One weight shared by two modules and applied twice, plus a frozen parameter."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.first = nn.Linear(dim, dim)
        self.second = nn.Linear(dim, dim)
        self.second.weight = self.first.weight
        self.frozen = nn.Parameter(torch.randn(dim), requires_grad=False)

    def log_likelihood(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        h = self.second(torch.tanh(self.first(x))) + self.frozen
        return -0.5 * (x - h).pow(2).sum(1)


class ControlFlowModel(nn.Module):
    """Python control flow on tensor values: vmap cannot trace it, so ``auto`` must fall back to the loop."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def log_likelihood(self, x: Tensor) -> Tensor:
        out = []
        for row in x.flatten(1):
            h = self.linear(row)
            out.append(-h.pow(2).sum() if float(h.detach().sum()) > 0 else -h.abs().sum())
        return torch.stack(out)


class NoLikelihood(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


class MLPEnergy(nn.Module):
    """A random MLP energy with a chosen depth, width and activation (for property-based tests)."""

    def __init__(self, dim: int, widths: list[int], activation: str, bias: bool) -> None:
        super().__init__()
        sizes = [dim, *widths, 1]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in itertools.pairwise(sizes))
        self.activation = {"tanh": torch.tanh, "relu": torch.relu, "gelu": nn.functional.gelu}[activation]

    def log_likelihood(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        for layer in self.layers[:-1]:
            h = self.activation(layer(h))
        return self.layers[-1](h).squeeze(1) - 0.5 * x.flatten(1).pow(2).sum(1)


def naive_layer_norms(model: nn.Module, x: Tensor, group_size: int = 1) -> tuple[Tensor, Tensor]:
    """Reference: for each group, ``backward()`` on a copy of the model and read ``.grad`` per parameter."""
    import copy

    ref = copy.deepcopy(model).eval()
    params = [p for p in ref.parameters() if p.requires_grad]
    rows, lls = [], []
    for start in range(0, x.shape[0] // group_size * group_size, group_size):
        for p in params:
            p.grad = None
        ll = ref.log_likelihood(x[start : start + group_size]).sum()
        ll.backward()
        rows.append(
            torch.stack([p.grad.pow(2).sum() if p.grad is not None else torch.tensor(0.0) for p in params])
        )
        lls.append(ll.detach())
    return torch.stack(rows), torch.stack(lls)


class SequenceZoo(nn.Module):
    """Embedding (with padding row), Conv1d, BatchNorm1d (running stats), LayerNorm and a Linear over
    a sequence: the layer types of autoregressive and audio models."""

    def __init__(self, vocab: int = 6, dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.conv = nn.Conv1d(dim, dim, 3, padding=2, dilation=2)
        self.bn = nn.BatchNorm1d(dim)
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.bn.running_var.uniform_(0.5, 2.0)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab)

    def log_likelihood(self, tokens: Tensor) -> Tensor:
        h = self.bn(self.conv(self.embed(tokens).transpose(1, 2))).transpose(1, 2)
        logp = torch.log_softmax(self.out(self.norm(torch.tanh(h))), dim=-1)
        return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(1)


class OutsideForward(nn.Module):
    """Uses a Linear's weight outside the Linear's forward, which hooks cannot see."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def log_likelihood(self, x: Tensor) -> Tensor:
        return -(self.lin(x) + x @ self.lin.weight).pow(2).sum(1)


class BatchStatsNorm(nn.Module):
    """BatchNorm without running statistics: samples interact even in eval mode."""

    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, track_running_stats=False)

    def log_likelihood(self, x: Tensor) -> Tensor:
        return -self.bn(x).pow(2).sum(1)


class RandomConvNet(nn.Module):
    """A random stack of Conv2d / ConvTranspose2d / GroupNorm layers and a Linear head (property tests)."""

    def __init__(self, layers: list[tuple[str, int, int, int, int, int]], channels: int, bias: bool) -> None:
        super().__init__()
        self.body = nn.ModuleList()
        c = channels
        for kind, out, kernel, stride, padding, dilation in layers:
            if kind == "conv":
                self.body.append(nn.Conv2d(c, out, kernel, stride, padding, dilation, bias=bias))
            elif kind == "convT":
                self.body.append(
                    nn.ConvTranspose2d(c, out, kernel, stride, min(padding, kernel - 1), bias=bias)
                )
            else:
                out = c
                self.body.append(nn.GroupNorm(1, c))
            c = out
        self.head = nn.LazyLinear(1, bias=bias)

    def log_likelihood(self, x: Tensor) -> Tensor:
        h = x
        for layer in self.body:
            h = torch.tanh(layer(h))
        return self.head(h.flatten(1)).squeeze(1) - 0.5 * x.flatten(1).pow(2).sum(1)


class Gate(nn.Module):
    """A custom layer without a rule, returning a tuple: its parameters are served by op rules where used."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.log_gain = nn.Parameter(0.1 * torch.randn(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = torch.sigmoid(x * self.log_gain.exp() + self.shift) * x
        return y, self.log_gain.sum().expand(x.shape[0])


class CustomLayerModel(nn.Module):
    """Linear → Gate (no rule) → Linear, the gate used twice."""

    def __init__(self, dim: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.gate = Gate(dim)
        self.out = nn.Linear(dim, dim)

    def log_likelihood(self, x: Tensor) -> Tensor:
        h, extra = self.gate(self.inp(x))
        h, extra2 = self.gate(h)
        return -0.5 * (self.out(h) - x).pow(2).sum(1) + extra + extra2


class InPlaceReLU(nn.Module):
    """Conv → ReLU(inplace=True) → Linear: a layer's output is overwritten after its hook saw it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(1))

    def log_likelihood(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(1) - 0.5 * x.flatten(1).pow(2).sum(1)
