"""Models fimcb did not write: tiny random-init configs of the field's libraries, and one small model for
each pattern that escapes module hooks. Shared by ``tests/test_ecosystem.py`` (exactness against a naive
loop) and ``benchmarks/ecosystem.py`` (the compatibility matrix), so both measure the same models.

Each :class:`Case` builds ``(model, x)``: a model with ``log_likelihood(x) -> [B]`` and a batch for it.
Third-party models import their library inside, so that a missing one skips only its models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _log_softmax_tokens(logits: Tensor, tokens: Tensor) -> Tensor:
    return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(1)


# ---- one small model per pattern ---------------------------------------------------------------------


class LearnedScaleVAE(nn.Module):
    """A Gaussian decoder with a learned global ``log_sigma`` (a 0-dim parameter) used in the likelihood."""

    def __init__(self, dim: int = 6, latent: int = 3, hidden: int = 5) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, dim))
        self.log_sigma = nn.Parameter(torch.tensor(-1.0))

    def log_likelihood(self, x: Tensor) -> Tensor:
        z = torch.tanh(self.encoder(x))
        sigma = self.log_sigma.exp()
        nll = 0.5 * ((x - self.decoder(z)) / sigma).pow(2) + self.log_sigma + 0.5 * math.log(2 * math.pi)
        return -nll.sum(1) - 0.5 * z.pow(2).sum(1)


class TiedTokenModel(nn.Module):
    """Tied embeddings as ``h @ emb.weight.T``, an output bias added to the logits, and a raw
    ``nn.Parameter`` position embedding sliced to the sequence length."""

    def __init__(self, vocab: int = 11, dim: int = 6, max_len: int = 12) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.1 * torch.randn(1, max_len, dim))
        self.mix = nn.Linear(dim, dim)
        self.out_bias = nn.Parameter(torch.zeros(vocab))

    def log_likelihood(self, tokens: Tensor) -> Tensor:
        h = self.emb(tokens[:, :-1]) + self.pos[:, : tokens.shape[1] - 1]
        h = torch.tanh(self.mix(h))
        return _log_softmax_tokens(h @ self.emb.weight.T + self.out_bias, tokens[:, 1:])


class SharedPositionModel(nn.Module):
    """A position embedding module called once on ``[1, T]`` positions, as Hugging Face models do."""

    def __init__(self, vocab: int = 9, dim: int = 5, max_len: int = 16) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def log_likelihood(self, tokens: Tensor) -> Tensor:
        inputs = tokens[:, :-1]
        positions = torch.arange(inputs.shape[1], device=tokens.device).unsqueeze(0)
        h = self.norm(self.tok(inputs) + self.pos(positions))
        return _log_softmax_tokens(self.head(h), tokens[:, 1:])


class ConditionedDensity(nn.Module):
    """A Gaussian whose mean and scale come from a conditioning MLP run once on a fixed code."""

    def __init__(self, dim: int = 4, code: int = 3, hidden: int = 8) -> None:
        super().__init__()
        self.register_buffer("code", torch.randn(code))
        self.condition = nn.Sequential(nn.Linear(code, hidden), nn.Tanh(), nn.Linear(hidden, 2 * dim))
        self.body = nn.Linear(dim, dim)

    def log_likelihood(self, x: Tensor) -> Tensor:
        mean, log_scale = self.condition(self.code).chunk(2)
        z = (self.body(x) - mean) * torch.exp(-log_scale)
        return -0.5 * z.pow(2).sum(1) - log_scale.sum() + torch.linalg.slogdet(self.body.weight)[1]


class ScaleStep(nn.Module):
    """A flow step whose log-determinant does not depend on the sample: ``log_scale.sum() * H * W``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(0.1 * torch.randn(channels, 1, 1))
        self.shift = nn.Parameter(torch.zeros(channels, 1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * self.log_scale.exp() + self.shift, self.log_scale.sum() * x.shape[2] * x.shape[3]


class BatchFreeLogDetFlow(nn.Module):
    """Flow steps with 0-dim log-determinants, added up in a Python float and in a ``zeros(B)`` buffer."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.steps = nn.ModuleList(ScaleStep(channels) for _ in range(2))
        self.mix = nn.Conv2d(channels, channels, 1)

    def log_likelihood(self, x: Tensor) -> Tensor:
        log_det = 0.0
        h, ld = self.steps[0](x)
        log_det = log_det + ld
        total = torch.zeros(x.shape[0], dtype=x.dtype)
        h, ld = self.steps[1](torch.tanh(self.mix(h)))
        total += ld
        return -0.5 * h.pow(2).flatten(1).sum(1) + log_det + total


class LearnedStateModel(nn.Module):
    """A learned initial state expanded to the batch (``h0.expand(B, -1)``), as recurrent models do."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.h0 = nn.Parameter(0.1 * torch.randn(1, dim))
        self.cell = nn.Linear(2 * dim, dim)

    def log_likelihood(self, x: Tensor) -> Tensor:
        h = self.h0.expand(x.shape[0], -1)
        total = torch.zeros(x.shape[0], dtype=x.dtype)
        for t in range(x.shape[1]):
            total = total - 0.5 * (x[:, t] - h).pow(2).sum(1)
            h = torch.tanh(self.cell(torch.cat([h, x[:, t]], 1)))
        return total


class TorchTransformer(nn.Module):
    """A causal token model of PyTorch's own ``nn.TransformerEncoder`` (its ``nn.MultiheadAttention``
    uses the projections' weights outside any module call), positions embedded on ``arange(T)``."""

    def __init__(
        self, vocab: int = 11, dim: int = 8, layers: int = 1, heads: int = 2, max_len: int = 16
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def log_likelihood(self, tokens: Tensor) -> Tensor:
        inputs = tokens[:, :-1]
        length = inputs.shape[1]
        h = self.tok(inputs) + self.pos(torch.arange(length, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device, dtype=h.dtype)
        return _log_softmax_tokens(self.head(self.encoder(h, mask=mask, is_causal=True)), tokens[:, 1:])


class SeparableConvModel(nn.Module):
    """Depthwise-separable convolutions (a depthwise ``groups=C`` 5x5, an instance norm, a pointwise 1x1),
    as in MobileNet and ConvNeXt blocks, in a Gaussian image model."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.depthwise = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.norm = nn.InstanceNorm2d(channels, affine=True)
        self.pointwise = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, 1, 3, padding=1)

    def log_likelihood(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        h = h + self.pointwise(F.gelu(self.norm(self.depthwise(h))))
        return -0.5 * (x - self.out(h)).pow(2).flatten(1).sum(1)


class RecurrentDensity(nn.Module):
    """An LSTM over a sequence predicting each next step's mean (``nn.LSTM`` has no rule, ``vmap`` cannot
    batch it, and its final state goes unused)."""

    def __init__(self, dim: int = 3, hidden: int = 5) -> None:
        super().__init__()
        self.rnn = nn.LSTM(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, dim)

    def log_likelihood(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x[:, :-1])
        return -0.5 * (x[:, 1:] - self.head(h)).pow(2).sum((1, 2))


# ---- third-party libraries ------------------------------------------------------------------------------


class GPT2(nn.Module):
    """Hugging Face GPT-2 (random init): tied ``lm_head``, ``Conv1D``, positions embedded on ``[1, T]``."""

    def __init__(
        self, vocab: int = 40, layers: int = 2, width: int = 16, heads: int = 2, positions: int = 16
    ) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=vocab,
            n_positions=positions,
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.net = GPT2LMHeadModel(config)

    def log_likelihood(self, tokens: Tensor) -> Tensor:
        return _log_softmax_tokens(self.net(input_ids=tokens[:, :-1]).logits, tokens[:, 1:])


class UNet(nn.Module):
    """diffusers ``UNet2DModel`` (random init, attention blocks) as a denoising score at one timestep, the
    noise a fixed function of the sample, and the timestep a Python int (diffusers expands it)."""

    def __init__(self, channels: tuple[int, int] = (8, 16), size: int = 8) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        self.net = UNet2DModel(
            sample_size=size,
            in_channels=1,
            out_channels=1,
            block_out_channels=channels,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            norm_num_groups=4,
            attention_head_dim=4,
        )

    def log_likelihood(self, x: Tensor) -> Tensor:
        noise = torch.sin(7.0 * x + 1.0)  # deterministic per sample
        eps = self.net(0.9 * x + 0.4 * noise, 10).sample
        return -(eps - noise).pow(2).flatten(1).sum(1)


class ZukoFlow(nn.Module):
    """zuko MAF or NSF (masked linear layers of the autoregressive hyper-networks) or RealNVP (zuko's
    linear layers in the coupling hyper-networks)."""

    def __init__(
        self, kind: str = "MAF", features: int = 4, hidden: tuple[int, ...] = (16, 16), transforms: int = 2
    ) -> None:
        super().__init__()
        import zuko

        self.flow = getattr(zuko.flows, kind)(
            features=features, transforms=transforms, hidden_features=hidden
        )

    def log_likelihood(self, x: Tensor) -> Tensor:
        return self.flow().log_prob(x)


class NormflowsRealNVP(nn.Module):
    """normflows: affine coupling with MLPs, ActNorm (batch-free log-determinant) and a trainable Gaussian
    base used through ``log_prob`` (outside any module call)."""

    def __init__(self, dim: int = 4, hidden: int = 8, blocks: int = 2) -> None:
        super().__init__()
        import normflows as nf

        flows = []
        for _ in range(blocks):
            net = nf.nets.MLP([dim // 2, hidden, dim], init_zeros=False)
            flows += [nf.flows.AffineCouplingBlock(net), nf.flows.Permute(dim, mode="swap")]
            flows.append(nf.flows.ActNorm(dim))
        self.flow = nf.NormalizingFlow(nf.distributions.DiagGaussian(dim), flows)

    def log_likelihood(self, x: Tensor) -> Tensor:
        return self.flow.log_prob(x)


def _tokens(vocab: int, length: int, batch: int = 6) -> Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def _normal(*shape: int, dtype: torch.dtype) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


@dataclass(frozen=True)
class Case:
    """A model and a batch for it, at test size (tiny: float64 exactness checks) and at benchmark size
    (a small model of realistic shapes: time and memory ratios); ``library`` is what it needs installed."""

    make: Callable[[], nn.Module]
    inputs: Callable[[torch.dtype], Tensor]
    bench_make: Callable[[], nn.Module]
    bench_inputs: Callable[[torch.dtype], Tensor]
    library: str | None = None
    warm_up: bool = False  # one forward first, where the model initialises itself from data (normflows)

    def build(self, dtype: torch.dtype, bench: bool = False) -> tuple[nn.Module, Tensor]:
        """The model made under seed 0 in ``dtype`` and eval mode, and its batch."""
        torch.manual_seed(0)
        model = (self.bench_make if bench else self.make)().to(dtype).eval()
        x = (self.bench_inputs if bench else self.inputs)(dtype)
        if self.warm_up:
            with torch.no_grad():
                model.log_likelihood(x)
        return model, x


PATTERNS: dict[str, Case] = {
    "learned_scale_vae": Case(
        LearnedScaleVAE,
        lambda dt: _normal(6, 6, dtype=dt),
        lambda: LearnedScaleVAE(784, 32, 256),
        lambda dt: _normal(64, 784, dtype=dt),
    ),
    "tied_tokens": Case(
        TiedTokenModel,
        lambda dt: _tokens(11, 9),
        lambda: TiedTokenModel(256, 128, 64),
        lambda dt: _tokens(256, 64, 32),
    ),
    "shared_position": Case(
        SharedPositionModel,
        lambda dt: _tokens(9, 8),
        lambda: SharedPositionModel(256, 128, 64),
        lambda dt: _tokens(256, 64, 32),
    ),
    "conditioned_density": Case(
        ConditionedDensity,
        lambda dt: _normal(6, 4, dtype=dt),
        lambda: ConditionedDensity(256, 32, 256),
        lambda dt: _normal(128, 256, dtype=dt),
    ),
    "batch_free_logdet": Case(
        BatchFreeLogDetFlow,
        lambda dt: _normal(6, 2, 3, 3, dtype=dt),
        lambda: BatchFreeLogDetFlow(8),
        lambda dt: _normal(64, 8, 28, 28, dtype=dt),
    ),
    "learned_state": Case(
        LearnedStateModel,
        lambda dt: _normal(6, 3, 4, dtype=dt),
        lambda: LearnedStateModel(64),
        lambda dt: _normal(64, 32, 64, dtype=dt),
    ),
    "torch_transformer": Case(
        TorchTransformer,
        lambda dt: _tokens(11, 8),
        lambda: TorchTransformer(256, 128, 2, 4, 128),
        lambda dt: _tokens(256, 65, 32),
    ),
    "separable_conv": Case(
        SeparableConvModel,
        lambda dt: _normal(6, 1, 6, 6, dtype=dt),
        lambda: SeparableConvModel(32),
        lambda dt: _normal(64, 1, 28, 28, dtype=dt),
    ),
    "recurrent_density": Case(
        RecurrentDensity,
        lambda dt: _normal(6, 5, 3, dtype=dt),
        lambda: RecurrentDensity(8, 32),
        lambda dt: _normal(64, 16, 8, dtype=dt),
    ),
}
LIBRARIES: dict[str, Case] = {
    "transformers_gpt2": Case(
        GPT2,
        lambda dt: _tokens(40, 10),
        lambda: GPT2(vocab=512, layers=2, width=64, heads=4, positions=64),
        lambda dt: _tokens(512, 32, 32),
        library="transformers",
    ),
    "diffusers_unet2d": Case(
        UNet,
        lambda dt: _normal(4, 1, 8, 8, dtype=dt),
        lambda: UNet((16, 32), 16),
        lambda dt: _normal(16, 1, 16, 16, dtype=dt),
        library="diffusers",
    ),
    "zuko_maf": Case(
        lambda: ZukoFlow("MAF"),
        lambda dt: _normal(6, 4, dtype=dt),
        lambda: ZukoFlow("MAF", 16, (64, 64), 3),
        lambda dt: _normal(64, 16, dtype=dt),
        library="zuko",
    ),
    "zuko_nsf": Case(
        lambda: ZukoFlow("NSF"),
        lambda dt: _normal(6, 4, dtype=dt),
        lambda: ZukoFlow("NSF", 16, (64, 64), 3),
        lambda dt: _normal(64, 16, dtype=dt),
        library="zuko",
    ),
    "zuko_realnvp": Case(
        lambda: ZukoFlow("RealNVP"),
        lambda dt: _normal(6, 4, dtype=dt),
        lambda: ZukoFlow("RealNVP", 16, (64, 64), 3),
        lambda dt: _normal(64, 16, dtype=dt),
        library="zuko",
    ),
    "normflows_realnvp": Case(
        NormflowsRealNVP,
        lambda dt: _normal(6, 4, dtype=dt),
        lambda: NormflowsRealNVP(16, 64, 4),
        lambda dt: _normal(64, 16, dtype=dt),
        library="normflows",
        warm_up=True,
    ),
}


# ---- more layers and idioms, exactness only (tests/test_ecosystem.py) ----------------------------------


class Functional(nn.Module):
    """``log_likelihood(x) = f(self, x)`` over the given submodules and parameters: a one-line model."""

    def __init__(self, f: Callable[[nn.Module, Tensor], Tensor], **parts: nn.Module | nn.Parameter) -> None:
        super().__init__()
        self.f = f
        for name, part in parts.items():
            setattr(self, name, part)

    def log_likelihood(self, x: Tensor) -> Tensor:
        return self.f(self, x)


def _p(*shape: int) -> nn.Parameter:
    return nn.Parameter(0.3 * torch.randn(*shape))


def idioms() -> dict[str, tuple[nn.Module, Tensor]]:
    """More layers (some served by rules, such as attention and 3-d convolutions, others without one) and
    parameters used through torch functions, with a batch each."""
    torch.manual_seed(0)
    sequence, vector = torch.randn(5, 3, 4), torch.randn(5, 4)
    encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    return {
        "multihead_attention": (
            Functional(
                lambda m, x: -m.a(x, x, x, need_weights=False)[0].pow(2).sum((1, 2)),
                a=nn.MultiheadAttention(4, 2, batch_first=True),
            ),
            sequence,
        ),
        "transformer_encoder_layer": (
            Functional(lambda m, x: -m.e(x).pow(2).sum((1, 2)), e=encoder),
            torch.randn(5, 3, 8),
        ),
        "gru": (Functional(lambda m, x: m.r(x)[0].sum((1, 2)), r=nn.GRU(4, 3, batch_first=True)), sequence),
        "weight_norm": (
            Functional(
                lambda m, x: m.l(x).tanh().sum(1), l=nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))
            ),
            vector,
        ),
        "einsum": (
            Functional(lambda m, x: torch.einsum("bi,ij->bj", x, m.w).sin().sum(1), w=_p(4, 3)),
            vector,
        ),
        "distributions_normal": (
            Functional(
                lambda m, x: torch.distributions.Normal(m.loc, F.softplus(m.s)).log_prob(x).sum(1),
                loc=_p(4),
                s=_p(4),
            ),
            vector,
        ),
        "functional_layer_norm": (
            Functional(lambda m, x: F.layer_norm(x, (4,), m.g, m.b).pow(3).sum(1), g=_p(4), b=_p(4)),
            vector,
        ),
        "indexed_table": (
            Functional(lambda m, x: m.t[x].sum((1, 2)), t=_p(7, 3)),
            torch.randint(0, 7, (5, 6)),
        ),
        "bmm_expanded": (
            Functional(
                lambda m, x: torch.bmm(x, m.w.expand(x.shape[0], -1, -1)).tanh().sum((1, 2)), w=_p(4, 3)
            ),
            sequence,
        ),
        "functional_conv": (
            Functional(
                lambda m, x: F.conv2d(x, m.w, m.b, padding=1).tanh().sum((1, 2, 3)), w=_p(3, 2, 3, 3), b=_p(3)
            ),
            torch.randn(5, 2, 5, 5),
        ),
        "temperature": (
            Functional(
                lambda m, x: torch.log_softmax(m.l(x) / m.t.exp(), -1)[:, 0],
                l=nn.Linear(4, 3),
                t=nn.Parameter(torch.tensor(0.2)),
            ),
            vector,
        ),
        "prelu_embedding_bag": (
            Functional(lambda m, x: m.p(m.e(x)).sum(1), e=nn.EmbeddingBag(7, 3, mode="mean"), p=nn.PReLU(3)),
            torch.randint(0, 7, (5, 4)),
        ),
        "conv_transpose_conv3d": (
            Functional(
                lambda m, x: m.c3(m.ct(x).unsqueeze(2).expand(-1, -1, 2, -1, -1)).sin().sum((1, 2, 3, 4)),
                ct=nn.ConvTranspose2d(2, 3, 3, stride=2),
                c3=nn.Conv3d(3, 2, 2),
            ),
            torch.randn(5, 2, 3, 3),
        ),
        "where_and_cumsum": (
            Functional(
                lambda m, x: (torch.where(x > 0, x * m.a, m.b).cumsum(1) * m.a).logsumexp(1), a=_p(4), b=_p(4)
            ),
            vector,
        ),
    }
