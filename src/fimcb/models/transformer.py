"""A decoder-only autoregressive transformer over token sequences, with an exact log-likelihood.

``log_likelihood(tokens)`` is ``Σ_t log p(token_t | tokens_<t)`` over the scored positions, in nats: exact,
deterministic (no noise at all; dropout only acts in training mode), batch-independent and
``torch.func``-friendly. A start token (index ``vocab_size``) is prepended so that every position,
the first included, is predicted. The first ``prompt_len`` tokens are conditioning only and not
scored: for modular arithmetic ``a + b =`` is the prompt and only the answer ``c`` counts, as in the
grokking literature (Power et al., 2022).

Every parameter lives in a standard layer (``nn.Embedding`` for tokens and positions, ``nn.Linear``
for attention and MLP, ``nn.LayerNorm``) and the output head is untied, so fimcb's hooks engine
computes exact per-sample gradients with its built-in rules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fimcb.core.protocol import unpack_batch
from fimcb.lightning.dashboards import log_text
from fimcb.models.base import LikelihoodModule


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position ``t`` sees positions ``<= t`` only."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, first: int = 0) -> Tensor:
        """Outputs ``[B, T - first, D]`` of the query positions ``first .. T - 1`` of ``x`` ``[B, T, D]``."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        # Explicit attention rather than F.scaled_dot_product_attention, which torch.func.vmap only runs
        # through a slow per-sample fallback.
        scores = (q[:, :, first:] @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        future = torch.ones(t - first, t, dtype=torch.bool, device=x.device).triu(first + 1)
        weights = torch.softmax(scores.masked_fill(future, -math.inf), dim=-1)
        weights = F.dropout(weights, self.dropout, self.training)
        return self.out((weights @ v).transpose(1, 2).reshape(b, t - first, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` (4x GELU MLP)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, first: int = 0) -> Tensor:
        """Outputs ``[B, T - first, D]`` of positions ``first ..`` (earlier ones are still attended to)."""
        x = x[:, first:] + self.drop(self.attn(self.ln_attn(x), first))
        return x + self.mlp(self.ln_mlp(x))


class Transformer(LikelihoodModule):
    """Decoder-only transformer language model of fixed-length token sequences.

    Args:
        vocab_size: number of token values ``0 .. vocab_size - 1`` (linked from the datamodule).
        seq_len: tokens per sequence (linked from the datamodule).
        prompt_len: leading tokens that condition but are not scored (linked from the datamodule).
        d_model: width of the residual stream.
        n_layers: number of transformer blocks.
        n_heads: attention heads per block (must divide ``d_model``).
        dropout: dropout rate in training mode (eval mode never drops).
        lr, warmup_steps, weight_decay, n_samples: see :class:`~fimcb.models.base.LikelihoodModule`.
    """

    unit = "nats_per_token"
    positions: Tensor  # buffer

    def __init__(
        self,
        vocab_size: int | None = None,
        seq_len: int | None = None,
        prompt_len: int | None = 0,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        dropout: float = 0.0,
        lr: float = 1e-3,
        warmup_steps: int = 10,
        weight_decay: float = 1.0,
        n_samples: int = 16,
    ) -> None:
        super().__init__(lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay, n_samples=n_samples)
        self.save_hyperparameters()
        prompt_len = 0 if prompt_len is None else prompt_len
        if vocab_size is None or seq_len is None or vocab_size < 1 or seq_len < 1:
            raise ValueError(
                f"vocab_size and seq_len must be positive ints, got {vocab_size} and {seq_len} (train.py "
                "takes them from the datamodule: use a sequence datamodule such as "
                "fimcb.data.sequences.ModularArithmeticDataModule)"
            )
        if not 0 <= prompt_len < seq_len:
            raise ValueError(f"prompt_len must be in [0, seq_len={seq_len}), got {prompt_len}")
        if n_layers < 1 or n_heads < 1 or d_model % n_heads:
            raise ValueError(f"need n_layers >= 1 and n_heads dividing d_model, got {n_layers=}, {n_heads=}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.vocab_size = int(vocab_size)
        self.seq_len = int(seq_len)
        self.prompt_len = int(prompt_len)
        self.token_embedding = nn.Embedding(self.vocab_size + 1, d_model)  # + the start token
        self.position_embedding = nn.Embedding(self.seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_final = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, self.vocab_size)  # untied: hooks see each parameter in one module
        self.register_buffer("positions", torch.arange(self.seq_len), persistent=False)
        self.apply(_init_weights)

    @property
    def start_token(self) -> int:
        """Index of the start token prepended to every sequence (not a data token)."""
        return self.vocab_size

    def check_tokens(self, tokens: Tensor) -> None:
        """Raise a clear error unless ``tokens`` is int64 ``[B, seq_len]`` with values in ``[0, vocab_size)``.

        The value check is skipped under ``torch.func`` transforms (``vmap`` cannot branch on data)."""
        if not isinstance(tokens, Tensor) or tokens.dtype != torch.int64:
            raise TypeError(f"tokens must be an int64 tensor, got {getattr(tokens, 'dtype', type(tokens))}")
        if tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(f"tokens must have shape [B, {self.seq_len}], got {list(tokens.shape)}")
        if not torch._C._functorch.is_functorch_wrapped_tensor(tokens) and bool(
            ((tokens < 0) | (tokens >= self.vocab_size)).any()
        ):
            raise ValueError(
                f"tokens must lie in [0, {self.vocab_size}), got values in "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )

    def logits(self, tokens: Tensor, first: int = 0) -> Tensor:
        """Next-token logits ``[B, T - first, vocab_size]`` for positions ``first .. T - 1`` of ``tokens``
        ``[B, T]`` (``T <= seq_len``): row ``t`` predicts ``tokens[:, t]`` from ``tokens[:, :t]``."""
        start = torch.full_like(tokens[:, :1], self.start_token)
        inputs = torch.cat([start, tokens[:, :-1]], dim=1)
        # Indexed per sample, so that the hooks engine sees the embedding called on the whole batch.
        positions = self.position_embedding(self.positions[: tokens.shape[1]].expand_as(tokens))
        h = self.drop(self.token_embedding(inputs) + positions)
        for block in self.blocks[:-1]:
            h = block(h)
        # Only the predicted positions leave the last block: a prompt costs attention keys, nothing more.
        return self.head(self.ln_final(self.blocks[-1](h, first)))

    def _scored(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``log p(token_t | tokens_<t)`` ``[B, T - prompt_len]`` of the scored positions, and the logits."""
        self.check_tokens(tokens)
        logits = self.logits(tokens, self.prompt_len)
        scored = tokens[:, self.prompt_len :].unsqueeze(-1)
        return torch.log_softmax(logits, dim=-1).gather(-1, scored).squeeze(-1), logits

    def token_log_probs(self, tokens: Tensor) -> Tensor:
        """Per-token ``log p(token_t | tokens_<t)`` of the scored positions ``t >= prompt_len``."""
        return self._scored(tokens)[0]

    def log_likelihood(self, x: Tensor) -> Tensor:
        """Exact log-probability in nats of the scored tokens of each sequence ``x`` (int64 ``[B, T]``)."""
        return self.token_log_probs(x).sum(1)

    def per_dim(self, log_likelihood: Tensor) -> Tensor:
        return -log_likelihood / (self.seq_len - self.prompt_len)

    @torch.no_grad()
    def sample(self, n: int, prompt: Tensor | None = None) -> Tensor:
        """``n`` sequences ``[n, seq_len]`` drawn token by token; the first ``prompt.shape[1]`` tokens are
        ``prompt`` (``[n, P]``) when given, else sampled too. Draws from the global RNG."""
        tokens = torch.zeros(n, 0, dtype=torch.int64, device=self.device)
        if prompt is not None:
            tokens = prompt.to(self.device, torch.int64)
        while tokens.shape[1] < self.seq_len:
            padded = torch.cat([tokens, tokens.new_zeros(n, 1)], dim=1)  # the slot to predict
            probs = torch.softmax(self.logits(padded, padded.shape[1] - 1)[:, -1], dim=-1)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1)], dim=1)
        return tokens

    # ---- Lightning ---------------------------------------------------------------------------------

    def likelihood_and_metrics(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The log-likelihood and ``acc``: the fraction of sequences whose scored tokens all equal the
        argmax prediction (the accuracy of grokking studies), from one forward pass."""
        log_probs, logits = self._scored(x)
        correct = (logits.detach().argmax(-1) == x[:, self.prompt_len :]).all(1).float()
        return log_probs.sum(1), {"acc": correct.mean()}

    def _sample_prompts(self, n: int) -> Tensor | None:
        """``n`` random prompts from the validation data (``None`` without a prompt or validation data)."""
        loaders = self.trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        dataset = getattr(loader, "dataset", None)
        if self.prompt_len == 0 or dataset is None or len(dataset) == 0:
            return None
        index = torch.randint(len(dataset), (n,)).tolist()
        return torch.stack([unpack_batch(dataset[i])[0][: self.prompt_len] for i in index])

    def log_samples(self) -> None:
        tokens = self.sample(self.n_samples, self._sample_prompts(self.n_samples)).cpu()
        # Trainer.datamodule is set at runtime by Lightning's data connector, absent from its annotations
        decode = getattr(self.trainer.datamodule, "decode", None)  # type: ignore[attr-defined]
        texts = [decode(row) if decode is not None else " ".join(map(str, row.tolist())) for row in tokens]
        log_text(self.trainer, "samples", texts, step=self.global_step)


def _init_weights(module: nn.Module) -> None:
    """GPT-2 style initialisation: N(0, 0.02) weights, zero biases."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


__all__ = ["Block", "CausalSelfAttention", "Transformer"]
