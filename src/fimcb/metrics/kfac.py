"""K-FAC: Kronecker-factored Fisher blocks ``F_W ≈ A ⊗ G`` for every parameter the engine sees as a sum of
outer products.

K-FAC (Martens & Grosse 2015) approximates the Fisher block of a layer ``y_t = W a_t + b`` by the
Kronecker product of the second moments of its inputs ``a_t`` and of its output gradients
``g_t = ∂ log p(x)/∂ y_t``; convolutions follow KFC (Grosse & Martens 2016), with ``a_t`` the
unfolded input patch under output position ``t``. A per-sample weight gradient
``S = Σ_t g_t a_tᵀ`` (``[out, in·k]``) then has the whitened squared norm
``vec(S)ᵀ (A ⊗ G)⁻¹ vec(S) = tr(G⁻¹ S A⁻¹ Sᵀ) = ||G^{-1/2} S A^{-1/2}||_F²``.

The rows come from the gradient engine's layer rules (:mod:`fimcb.engine.rules`): whatever rule gives
a parameter an outer-product factor (``nn.Linear``, convolutions, transformers' ``Conv1D``, zuko's
masked layers, ``x @ W`` outside modules, a rule of your own) gives K-FAC its ``a_t`` and ``g_t``,
and the factor says which side holds the inputs. A bias is a layer whose input is fixed at 1: its
block is ``1 ⊗ G`` with ``G`` from its own output gradients.

Normalisation over positions (the "expand" convention of Eschenhagen et al. 2023): with ``R`` the
rows (positions of all calls of a parameter's layers, e.g. a sequence's tokens or a feature map's
pixels) per sample, ``A = E_x[(1/R) Σ_t a_t a_tᵀ]`` and ``G = E_x[Σ_t g_t g_tᵀ]``. With one
position and ``a`` independent of ``g``, ``A ⊗ G`` is the Fisher block exactly; with several, it
drops the cross-position terms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fimcb.core.checks import check_positive_float
from fimcb.core.distributed import agreed
from fimcb.core.metric import Identity, as_rows, check_pair, squared_row_norms
from fimcb.core.protocol import LogLikelihoodFn
from fimcb.engine import capture_factors
from fimcb.engine.factors import Factor, IndexSum, OuterSum, Sum
from fimcb.metrics.base import FittedMetric, layer_scales, reduced_means


def kronecker_rows(factor: Factor) -> OuterSum | None:
    """The outer-product form ``Σ_t u_t v_tᵀ`` of a parameter's per-sample gradients, if it has one: the
    parts of its layers with the first part's layout (a weight also used in other ways, such as a
    log-determinant, keeps the factors of its layers); ``None`` for a parameter that is also an
    embedding table, or that has no outer-product part."""
    parts = factor.parts if isinstance(factor, Sum) else (factor,)
    if any(isinstance(p, IndexSum) for p in parts):
        return None
    outers = [o for o in (p.outer() for p in parts) if o is not None]
    if not outers:
        return None
    same = [o for o in outers if o.same_layout(outers[0])]
    return Factor.combine(same) if len(same) > 1 else same[0]  # type: ignore[return-value]


def _inverse_sqrt(m: Tensor) -> Tensor:
    """``M^{-1/2}`` of a symmetric positive definite matrix."""
    eigenvalues, vectors = torch.linalg.eigh(m)
    return (vectors * eigenvalues.rsqrt()) @ vectors.T


def damped_inverse_roots(a: Tensor, g: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """``(A + π√δ I)^{-1/2}`` and ``(G + (√δ/π) I)^{-1/2}``, in float64, with Martens' π-correction
    ``π = sqrt((tr A / dim A) / (tr G / dim G))`` (π = 1 when a factor is zero: a layer that never
    sees a signal), which splits the damping δ of ``A ⊗ G`` between the factors by their scales."""
    a, g = a.double(), g.double()
    mean_a, mean_g = a.trace() / a.shape[0], g.trace() / g.shape[0]
    pi = math.sqrt(mean_a / mean_g) if mean_a > 0 and mean_g > 0 else 1.0
    root = math.sqrt(damping)
    eye_a = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    eye_g = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    return _inverse_sqrt(a + pi * root * eye_a), _inverse_sqrt(g + root / pi * eye_g)


@dataclass
class _Block:
    """One Kronecker-factored parameter: undamped ``A`` (inputs) and ``G`` (output gradients), which side of
    its ``[p, q]`` matrix view holds the inputs, and the damped inverse roots."""

    a: Tensor
    g: Tensor
    input_side: str
    a_root: Tensor
    g_root: Tensor

    def whiten(self, name: str, grads: Tensor) -> Tensor:
        """``G^{-1/2} S A^{-1/2}`` per sample (sides by ``input_side``), whose squared Frobenius norm is the
        metric's squared norm; a bias's ``[N, out]`` gradients are ``S`` with one column."""
        left, right = (self.g_root, self.a_root) if self.input_side == "v" else (self.a_root, self.g_root)
        left, right = left.to(grads.device, grads.dtype), right.to(grads.device, grads.dtype)
        expected = (left.shape[0], right.shape[0])
        if grads[0].numel() != expected[0] * expected[1]:
            raise ValueError(
                f"gradients of {name!r} have shape {list(grads.shape[1:])}, not a {list(expected)} matrix"
            )
        return left @ grads.reshape(grads.shape[0], *expected) @ right


class KFAC(FittedMetric):
    """K-FAC: ``A ⊗ G`` Fisher blocks for every parameter with outer-product per-sample gradients (weights
    of linear and convolution layers and of the layers of other libraries that have a rule, and their
    biases), damped with Martens' π-correction (see the module docstring for the conventions).

    Every other parameter tensor (norm layers, embeddings, layers without an outer-product rule,
    parameters whose gradient was zero in the fit) falls back to the paper's layer-scalar metric
    ``||s_l||² / λ_l`` with ``λ_l = E||s_l||² / d_l``, estimated in the same fit (as
    :class:`~fimcb.metrics.diagonal.LayerScalar` does, zero-gradient convention included).
    :attr:`kronecker_factored` and :attr:`layer_scalars` say which is which.

    Args:
        damping: δ > 0 added to ``A ⊗ G`` through the factors (they are often singular).
        fisher, n_samples, batch_size, seed: see :class:`~fimcb.metrics.base.FittedMetric`.
    """

    name = "kfac"

    def __init__(
        self,
        fisher: str = "empirical",
        damping: float = 1e-3,
        n_samples: int = 1000,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(fisher, n_samples, batch_size, seed)
        self.damping = check_positive_float("damping", damping)
        self._blocks: dict[str, _Block] = {}
        self._scales: dict[str, float] = {}  # λ_l of every other parameter

    def options(self) -> dict[str, Any]:
        return {**super().options(), "damping": self.damping}

    @property
    def kronecker_factored(self) -> tuple[str, ...]:
        """Names of the parameters with Kronecker factors."""
        return tuple(self._blocks)

    @property
    def layer_scalars(self) -> dict[str, float]:
        """``λ_l`` of the parameters that fall back to the layer-scalar metric."""
        return dict(self._scales)

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """The undamped ``(A, G)`` of a Kronecker-factored parameter."""
        self._known(name)
        if name not in self._blocks:
            raise KeyError(f"{name!r} is not Kronecker-factored; factored: {sorted(self._blocks)}")
        block = self._blocks[name]
        return block.a, block.g

    def fit(
        self,
        model: nn.Module,
        data: Iterable[Any] | None = None,
        log_likelihood: LogLikelihoodFn | None = None,
    ) -> KFAC:
        """Estimate the factors (and the fallback λ_l) over ``n_samples`` inputs from ``fisher``.

        Runs ``model`` in eval mode, where samples are independent: one batched backward gives every
        sample's own output gradients at each layer. Sums over batches are reduced over DDP ranks at
        the end, so that a fit split across ranks equals one on all the data.
        """
        params = self._parameters(model)
        device = next(iter(params.values())).device

        def accumulate() -> tuple[
            dict[str, Tensor], dict[str, dict[str, Tensor]], dict[str, str], set[str], int
        ]:
            identity = Identity()
            squares = {n: torch.zeros((), dtype=torch.float64, device=device) for n in params}
            sums: dict[str, dict[str, Tensor]] = {}
            sides: dict[str, str] = {}
            excluded: set[str] = set()
            count = 0
            for x in self._inputs(model, data):
                captured = capture_factors(model, x.to(device), log_likelihood=log_likelihood)
                for name, factor in captured.factors.items():
                    squares[name] += factor.squared_norms(name, identity, params[name].shape).double().sum()
                    outer = None if name in excluded else kronecker_rows(factor)
                    if outer is None or sides.setdefault(name, outer.input_side) != outer.input_side:
                        excluded.add(name)
                        continue
                    a_rows, g_rows = (outer.v, outer.u) if outer.input_side == "v" else (outer.u, outer.v)
                    a_rows, g_rows = a_rows.double(), g_rows.double()
                    a = (
                        torch.einsum("bti,btj->ij", a_rows, a_rows) / a_rows.shape[1]
                    )  # A averages over positions
                    g = torch.einsum("bti,btj->ij", g_rows, g_rows)
                    if name in sums:
                        sums[name]["a"] += a
                        sums[name]["g"] += g
                    else:
                        sums[name] = {"a": a, "g": g}
                count += len(x)
            return squares, sums, sides, excluded, count

        squares, sums, sides, excluded, count = agreed(
            accumulate
        )  # every rank reaches the reductions, or none
        mean_squares = reduced_means(squares, count)
        factored = [n for n in params if n in sums and n not in excluded]
        flat = {f"{n}/{k}": sums[n][k] for n in factored for k in ("a", "g")}
        means = reduced_means(flat, count) if flat else {}
        dims = {name: p.numel() for name, p in params.items()}
        blocks = {
            n: (means[f"{n}/a"].to(params[n].dtype), means[f"{n}/g"].to(params[n].dtype), sides[n])
            for n in factored
        }
        scales = layer_scales({n: m for n, m in mean_squares.items() if n not in blocks}, dims)
        self._set(blocks, scales)
        self.dims = dims
        return self

    def _set(self, blocks: dict[str, tuple[Tensor, Tensor, str]], scales: dict[str, float]) -> None:
        """Install a fitted or loaded state after checking it, and precompute the inverse roots."""
        bad = [n for n, (a, g, _) in blocks.items() if not (a.isfinite().all() and g.isfinite().all())]
        bad += [name for name, scale in scales.items() if not math.isfinite(scale)]
        if bad:
            raise ValueError(
                f"non-finite K-FAC statistics for {bad}: the model's activations or log-likelihood "
                "gradients are not finite on the Fisher samples"
            )
        self._blocks = {}
        for name, (a, g, side) in blocks.items():
            a_root, g_root = damped_inverse_roots(a, g, self.damping)
            self._blocks[name] = _Block(a, g, side, a_root.to(a.dtype), g_root.to(g.dtype))
        self._scales = scales

    def _known(self, name: str) -> None:
        """Clear errors before fit or for a parameter the metric was not fitted on."""
        self._lookup(self.dims or {}, name)

    def squared_norms(self, name: str, grads: Tensor) -> Tensor:
        self._known(name)
        if name in self._scales:
            return squared_row_norms(grads) / self._scales[name]
        return squared_row_norms(self._blocks[name].whiten(name, grads))

    def inner_products(self, name: str, a: Tensor, b: Tensor) -> Tensor:
        """``[A, B]`` products ``⟨G^{-1/2} S_a A^{-1/2}, G^{-1/2} S_b A^{-1/2}⟩`` of the whitened gradients;
        layer-scalar parameters through the base class's diagonal path."""
        self._known(name)
        if name in self._scales:
            return super().inner_products(name, a, b)
        a, b = check_pair(name, a, b)
        block = self._blocks[name]
        return as_rows(block.whiten(name, a)) @ as_rows(block.whiten(name, b)).T

    def inverse_diagonal(self, name: str) -> float | None:
        """``1/λ_l`` for layer-scalar parameters (engines then skip materialising them), else ``None``."""
        self._known(name)
        return 1.0 / self._scales[name] if name in self._scales else None

    def state_dict(self) -> dict[str, Any]:
        if not self.fitted:
            raise RuntimeError("the kfac metric is not fitted: there is no state to save")
        return {
            "options": self.options(),
            "dims": self.dims,
            "factors": {n: {"A": b.a, "G": b.g, "input_side": b.input_side} for n, b in self._blocks.items()},
            "scales": self._scales,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"options", "dims", "factors", "scales"} - set(state)
        if missing:
            raise ValueError(f"not a KFAC state: missing {sorted(missing)}")
        self._restore_options(state)
        blocks = {n: (f["A"], f["G"], f["input_side"]) for n, f in state["factors"].items()}
        self._set(blocks, dict(state["scales"]))
        self.dims = dict(state["dims"])
