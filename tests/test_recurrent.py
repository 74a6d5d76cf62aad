"""Recurrent layers unrolled for the capture: the same function as PyTorch's fused kernel, and exact
per-sample gradients by their linear parts in every configuration (no per-sample loop, no tracker
after the first batch), by the tracker where a part runs on an unbatched input."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from toy_models import naive_layer_norms

from fimcb import per_sample_layer_norms
from fimcb.engine.capture import _PLANS, Tracking, describe_routes
from fimcb.engine.rules import Parts, recurrent, unrolled_for

CONFIGS = [
    dict(mode=mode, batch_first=bf, bidirectional=bi, num_layers=layers, bias=bias, proj=proj)
    for mode, bf, bi, layers, bias, proj in itertools.product(
        ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"), (True, False), (False, True), (1, 2), (True, False), (0, 2)
    )
    if not (proj and mode != "LSTM")
]


def _rnn(
    mode: str, batch_first: bool, bidirectional: bool, num_layers: int, bias: bool, proj: int
) -> nn.RNNBase:
    options = dict(batch_first=batch_first, bidirectional=bidirectional, num_layers=num_layers, bias=bias)
    if mode == "LSTM":
        return nn.LSTM(3, 4, proj_size=proj, **options)
    if mode == "GRU":
        return nn.GRU(3, 4, **options)
    return nn.RNN(3, 4, nonlinearity=mode.removeprefix("RNN_").lower(), **options)


def _initial(rnn: nn.RNNBase, batch: tuple[int, ...]) -> Tensor | tuple[Tensor, Tensor]:
    layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
    h = torch.randn(layers, *batch, rnn.proj_size or rnn.hidden_size, dtype=torch.float64)
    if rnn.mode == "LSTM":
        return h, torch.randn(layers, *batch, rnn.hidden_size, dtype=torch.float64)
    return h


@pytest.fixture(params=["kernel", "unrolled"])
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where it can, a layer runs as PyTorch's kernel fed its input part, else unrolled step by step."""
    monkeypatch.setattr(recurrent, "FUSED_MAX_WORK", 1 << 40 if request.param == "kernel" else -1)
    return str(request.param)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_the_unrolled_forward_computes_what_the_module_does(config: dict, route: str) -> None:
    torch.manual_seed(0)
    rnn = _rnn(**config).double().eval()
    unrolled = unrolled_for(rnn)
    assert unrolled is not None
    batched = torch.randn(*((2, 5) if config["batch_first"] else (5, 2)), 3, dtype=torch.float64)
    for x, hx in [
        (batched, None),
        (batched, _initial(rnn, (2,))),
        (batched[0] if config["batch_first"] else batched[:, 0], _initial(rnn, ())),  # unbatched
    ]:
        want = rnn(x, hx)
        got = unrolled.forward(Parts(rnn), x, hx)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


class Sequences(nn.Module):
    """A density over sequences through a recurrent layer, time-first, from an initial state computed
    from the first step (as a sequence VAE's decoder starts from its code), reading both the outputs
    and the final state."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn
        directions = 2 if rnn.bidirectional else 1
        self.layers = rnn.num_layers * directions
        out = rnn.proj_size or rnn.hidden_size
        self.init = nn.Linear(3, out)
        self.head = nn.Linear(directions * out, 3)

    def log_likelihood(self, x: Tensor) -> Tensor:
        seq = x.transpose(0, 1)  # [T, B, 3]
        h0 = torch.tanh(self.init(seq[0])).unsqueeze(0).expand(self.layers, -1, -1).contiguous()
        c0 = torch.zeros(self.layers, x.shape[0], self.rnn.hidden_size, dtype=x.dtype)
        out, state = self.rnn(seq[1:-1], (h0, c0) if self.rnn.mode == "LSTM" else h0)
        final = (state[0] if isinstance(state, tuple) else state)[-1]
        fit = -0.5 * (x[:, 2:] - self.head(out.transpose(0, 1))).pow(2).sum((1, 2))
        return fit - final.pow(2).sum(1)


@pytest.mark.parametrize(
    "rnn",
    [
        nn.LSTM(3, 4),
        nn.LSTM(3, 4, num_layers=2, bidirectional=True),
        nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2),
        nn.GRU(3, 4, num_layers=2, bidirectional=True),
        nn.RNN(3, 4, nonlinearity="relu", bias=False),
        nn.RNN(3, 4, bidirectional=True),
    ],
    ids=[
        "lstm",
        "lstm-2-layers-bidirectional",
        "lstm-2-layers-bidirectional-projected",
        "gru-2-layers-bidirectional",
        "rnn-relu-no-bias",
        "rnn-tanh-bidirectional",
    ],
)
def test_recurrent_layers_are_exact_by_their_linear_parts(
    rnn: nn.RNNBase, route: str, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(1)
    model = Sequences(rnn).double().eval()
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    want, want_ll = naive_layer_norms(model, x)
    with caplog.at_level(logging.INFO, logger="fimcb"):
        for _ in range(3):  # the first batch (tracked, checked), then the lighter plan it chooses
            norms = per_sample_layer_norms(model, x, engine="hooks")
            scale = want.abs().amax(1, keepdim=True)
            assert float(((norms.values - want).abs() / scale).max()) <= 1e-10
            torch.testing.assert_close(norms.log_likelihood, want_ll, rtol=1e-12, atol=1e-12)
    assert "fallback" not in caplog.text and "one sample at a time" not in caplog.text
    layers = sorted([f"{type(rnn).__name__}({len(list(rnn.parameters()))})", "Linear(2)"])
    assert describe_routes(model) == f"rule: {', '.join(layers)}"
    assert _PLANS[model].tracking is Tracking.NONE  # the parts need no tracker
    assert "forward" not in vars(model.rnn)  # its own forward is back


class SharedPrompt(nn.Module):
    """An LSTM run once on a learned unbatched prompt ``[T, in]`` (shared by all samples), its final state
    shifting the inputs of a per-sample GRU: the LSTM's maps are not per sample, so they are left to the
    tracker, which serves them where the shared state meets the samples (the pull-back)."""

    def __init__(self) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(4, 3))
        self.encoder = nn.LSTM(3, 3)
        self.decoder = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def log_likelihood(self, x: Tensor) -> Tensor:
        _, (h, _) = self.encoder(self.prompt)  # h: [1, 3], unbatched
        out, _ = self.decoder(x[:, :-1] + h)
        return -0.5 * (x[:, 1:] - self.head(out)).pow(2).sum((1, 2))


def test_a_recurrent_layer_on_an_unbatched_input_is_served_by_the_tracker() -> None:
    torch.manual_seed(3)
    model = SharedPrompt().double().eval()
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    want, _ = naive_layer_norms(model, x)
    for _ in range(3):
        norms = per_sample_layer_norms(model, x, engine="hooks")
        assert float(((norms.values - want).abs() / want.abs().amax(1, keepdim=True)).max()) <= 1e-10
    routes = describe_routes(model)
    assert routes.startswith("rule: GRU(4), Linear(2); batched pull-back: ")
    assert "encoder.weight_hh_l0" in routes


class Packed(nn.Module):
    """Sequences of different lengths through a packed LSTM: the fused kernel runs (no unrolling)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)

    def log_likelihood(self, x: Tensor) -> Tensor:
        lengths = torch.arange(x.shape[0]) % 3 + 2
        out, _ = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        padded, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return padded.tanh().sum((1, 2))


def test_a_packed_sequence_runs_the_fused_kernel_and_stays_exact() -> None:
    torch.manual_seed(2)
    model = Packed().double().eval()
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    want, _ = naive_layer_norms(model, x)
    norms = per_sample_layer_norms(model, x, engine="hooks")
    assert float(((norms.values - want).abs() / want.abs().amax(1, keepdim=True)).max()) <= 1e-10


class TiedInput(nn.Module):
    """An LSTM whose input weight is also used outside it (a penalty on part of it): light tracking wraps
    that weight, and the LSTM's own uses must still be left to its parts."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def log_likelihood(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x[:, :-1])
        fit = -0.5 * (x[:, 1:] - self.head(out)).pow(2).sum((1, 2))
        return fit + (x[:, 0] @ self.rnn.weight_ih_l0[:3]).sum(1)


def _frozen_input_map() -> nn.Module:
    model = Sequences(nn.LSTM(3, 4, num_layers=2))
    for name in ("weight_ih_l0", "bias_ih_l0"):
        getattr(model.rnn, name).requires_grad_(False)
    return model


@pytest.mark.parametrize(
    "make, tracking",
    [(TiedInput, Tracking.LIGHT), (_frozen_input_map, Tracking.NONE)],
    ids=["weight-also-used-outside", "frozen-input-map"],
)
def test_recurrent_parts_with_a_parameter_used_outside_or_frozen(
    make: type[nn.Module], tracking: Tracking, route: str
) -> None:
    torch.manual_seed(4)
    model = make().double().eval()
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    want, _ = naive_layer_norms(model, x)
    for _ in range(3):
        norms = per_sample_layer_norms(model, x, engine="hooks")
        assert float(((norms.values - want).abs() / want.abs().amax(1, keepdim=True)).max()) <= 1e-10
    assert _PLANS[model].tracking is tracking and not _PLANS[model].fallback


def test_a_first_batch_of_one_does_not_take_a_shared_input_for_a_sample() -> None:
    """At B = 1 an unbatched input has the batch's rows; the tracker knows it is weight-like."""
    torch.manual_seed(3)
    model = SharedPrompt().double().eval()
    for batch in (1, 5, 5):
        x = torch.randn(batch, 6, 3, dtype=torch.float64)
        want, _ = naive_layer_norms(model, x)
        norms = per_sample_layer_norms(model, x, engine="hooks")
        assert float(((norms.values - want).abs() / want.abs().amax(1, keepdim=True)).max()) <= 1e-10
    assert not _PLANS[model].fallback
