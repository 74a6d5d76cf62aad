"""``nn.MultiheadAttention`` unrolled for the capture: the same function as the module's own forward, and
exact per-sample gradients through the linear rule in every configuration it covers (self- and
cross-attention, either layout, masks, attention weights), the module's own forward otherwise."""

from __future__ import annotations

import itertools

import pytest
import torch
from ecosystem_models import Functional
from torch import Tensor, nn
from toy_models import naive_layer_norms

from fimcb import per_sample_layer_norms
from fimcb.engine.capture import describe_routes
from fimcb.engine.rules import Parts, unrolled_for

B, L, S, E = 5, 4, 3, 6


def _masks(kind: str, heads: int, x: Tensor, source: int) -> dict[str, Tensor]:
    """Attention and key-padding masks of one kind over ``source`` keys, each sample's from its own ``x``
    (so that they are the same alone and in a batch); the first key is never masked."""
    if kind == "none":
        return {}
    if kind == "bool":  # causal where source = L
        padding = x[:, -source:, 0] > 0.5
        padding[:, 0] = False
        return {"attn_mask": torch.ones(L, source, dtype=torch.bool).triu(1), "key_padding_mask": padding}
    return {  # float, one per sample and head
        "attn_mask": torch.sin(x[:, :L, :source]).repeat_interleave(heads, 0),
        "key_padding_mask": torch.cos(x[:, -source:, 1]),
    }


def _attention_model(batch_first: bool, inputs: str, masks: str, weights: str, bias: bool) -> Functional:
    """Attention of ``x``'s first ``L`` steps to itself (``self``), to its last ``S`` steps as key and value
    (``memory``), or to different key and value steps (``distinct``), with masks and weights as asked."""
    attention = nn.MultiheadAttention(E, 2, bias=bias, batch_first=batch_first).double()
    source = L if inputs == "self" else S
    options = {"need_weights": weights != "none", "average_attn_weights": weights == "mean"}

    def log_likelihood(m: Functional, x: Tensor) -> Tensor:
        query = x[:, :L]
        key = value = query if inputs == "self" else x[:, -S:]
        if inputs == "distinct":
            value = x[:, 1 : S + 1].flip(1)
        if not batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, w = m.a(query, key, value, **options, **_masks(masks, 2, x, source))
        out = out if batch_first else out.transpose(0, 1)
        extra = 0 if w is None else w.flatten(1).pow(2).sum(1)
        return -out.tanh().pow(2).sum((1, 2)) + extra

    return Functional(log_likelihood, a=attention)


CONFIGS = [
    dict(batch_first=bf, inputs=i, masks=m, weights=w, bias=b)
    for bf, i, m, w, b in itertools.product(
        (True, False),
        ("self", "memory", "distinct"),
        ("none", "bool", "float"),
        ("none", "mean", "heads"),
        (True, False),
    )
]


def _inputs(config: dict) -> Tensor:
    return torch.randn(B, L if config["inputs"] == "self" else L + S, E, dtype=torch.float64)


def _ids(config: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in config.items())


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_the_unrolled_forward_computes_what_the_module_does(config: dict) -> None:
    torch.manual_seed(0)
    model = _attention_model(**config).eval()
    x = _inputs(config)
    want = model.log_likelihood(x)
    unrolled = unrolled_for(model.a)
    assert unrolled is not None
    original = model.a.forward
    model.a.forward = lambda *a, **k: unrolled.forward(Parts(model.a), *a, **k)  # type: ignore[method-assign]
    try:
        torch.testing.assert_close(model.log_likelihood(x), want)
    finally:
        model.a.forward = original  # type: ignore[method-assign]


@pytest.mark.parametrize("config", CONFIGS[::5], ids=_ids)
def test_per_sample_norms_are_exact_through_the_linear_rule(config: dict) -> None:
    torch.manual_seed(0)
    model = _attention_model(**config).eval()
    x = _inputs(config)
    want, _ = naive_layer_norms(model, x)
    for _ in range(3):  # checked, lighter, streamed
        got = per_sample_layer_norms(model, x, engine="hooks").values
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    n = 2 if config["bias"] else 1
    assert describe_routes(model) == f"rule: MultiheadAttention({n}), NonDynamicallyQuantizableLinear({n})"


def test_transformer_layers_with_cross_attention_are_served_by_rules() -> None:
    """A decoder layer (self- and cross-attention, masks) over an encoder layer: no fallback."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoderLayer(E, 2, 8, dropout=0.0, batch_first=True)
    decoder = nn.TransformerDecoderLayer(E, 2, 8, dropout=0.0, batch_first=True, norm_first=True)

    def log_likelihood(m: Functional, x: Tensor) -> Tensor:
        memory = m.e(x[:, L:])
        causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=x.dtype)
        return -m.d(x[:, :L], memory, tgt_mask=causal, tgt_is_causal=True).pow(2).sum((1, 2))

    model = Functional(log_likelihood, e=encoder, d=decoder).double().eval()
    x = torch.randn(B, L + S, E, dtype=torch.float64)
    want, _ = naive_layer_norms(model, x)
    for _ in range(3):
        torch.testing.assert_close(per_sample_layer_norms(model, x, engine="hooks").values, want)
    routes = describe_routes(model)
    assert "torch.func" not in routes and "fallback" not in routes and "op rule" not in routes, routes


@pytest.mark.parametrize("variant", ["kdim", "bias_kv", "zero_attn"])
def test_configurations_it_does_not_cover_run_the_modules_forward_and_stay_exact(variant: str) -> None:
    torch.manual_seed(0)
    options = {
        "kdim": {"kdim": 3, "vdim": 2},
        "bias_kv": {"add_bias_kv": True},
        "zero_attn": {"add_zero_attn": True},
    }
    attention = nn.MultiheadAttention(E, 2, batch_first=True, **options[variant]).double()

    def log_likelihood(m: Functional, x: Tensor) -> Tensor:
        query = x[:, :, :E]
        key, value = (query, query) if variant != "kdim" else (x[:, :, E : E + 3], x[:, :, E + 3 : E + 5])
        return -m.a(query, key, value, need_weights=False)[0].tanh().pow(2).sum((1, 2))

    model = Functional(log_likelihood, a=attention).eval()
    x = torch.randn(B, L, E + 5 if variant == "kdim" else E, dtype=torch.float64)
    want, _ = naive_layer_norms(model, x)
    torch.testing.assert_close(per_sample_layer_norms(model, x, engine="hooks").values, want)
