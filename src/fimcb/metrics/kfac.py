"""K-FAC: Kronecker-factored Fisher blocks ``F_W ≈ A ⊗ G`` for Linear and convolution layers.

K-FAC (Martens & Grosse 2015) approximates the Fisher block of a layer ``y_t = W a_t + b`` by the
Kronecker product of the second moments of its inputs ``a_t`` and of its output gradients
``g_t = ∂ log p(x)/∂ y_t``; convolutions follow KFC (Grosse & Martens 2016), with ``a_t`` the
unfolded input patch under output position ``t``. A per-sample weight gradient
``S = Σ_t g_t a_tᵀ`` (``[out, in·k]``) then has the whitened squared norm
``vec(S)ᵀ (A ⊗ G)⁻¹ vec(S) = tr(G⁻¹ S A⁻¹ Sᵀ) = ||G^{-1/2} S A^{-1/2}||_F²``.

Normalisation over positions (the "expand" convention of Eschenhagen et al. 2023): with ``R`` the
rows (positions of all calls of the layer's modules, e.g. a sequence's tokens or a feature map's
pixels) per sample, ``A = E_x[(1/R) Σ_t a_t a_tᵀ]`` and ``G = E_x[Σ_t g_t g_tᵀ]``. With one
position and ``a`` independent of ``g``, ``A ⊗ G`` is the Fisher block exactly; with several, it
drops the cross-position terms. A bias (an input fixed at 1) gets the block ``1 ⊗ G = G``: its
norm is ``bᵀ G⁻¹ b``, with the damping of its layer's ``G``.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fimcb.core.checks import check_positive_float
from fimcb.core.metric import as_rows, check_pair, squared_row_norms
from fimcb.core.modes import eval_mode, grad_enabled
from fimcb.core.protocol import LogLikelihoodFn, check_log_likelihood_output, resolve_log_likelihood
from fimcb.engine import per_sample_layer_norms
from fimcb.metrics.base import FittedMetric, layer_scales, reduced_means

log = logging.getLogger("fimcb")

KRONECKER_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d)

Layer = str  # names of the modules whose calls make up one pair of factors, joined by ","


def is_kronecker_module(module: nn.Module) -> bool:
    """Whether K-FAC factors ``module``'s weight and bias: a Linear, or a Conv1d/Conv2d with groups=1."""
    return isinstance(module, KRONECKER_MODULES) and getattr(module, "groups", 1) == 1


def kronecker_owners(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, Layer]:
    """For each parameter of ``params`` that K-FAC factors, the names of the modules holding it.

    A parameter is factored when every module holding it is a Kronecker module holding it as its
    ``weight`` or ``bias``; a weight shared by several such modules gets factors summed over all of
    them. Anything else (tied to an Embedding, reparametrised, norm layers, ...) is not factored.
    """
    holders: dict[int, list[tuple[str, nn.Module, str]]] = defaultdict(list)
    for module_name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            holders[id(p)].append((module_name, module, local))
    return {
        name: ",".join(module_name for module_name, _, _ in holders[id(p)])
        for name, p in params.items()
        if holders[id(p)]
        and all(is_kronecker_module(m) and local in ("weight", "bias") for _, m, local in holders[id(p)])
    }


def _input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """``[R, in·k]`` the input vectors ``a_t`` of every output position of a call (patches for convs)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    spatial = module.weight.ndim - 2
    x = x.reshape(-1, *x.shape[-(spatial + 1) :])  # an unbatched input gets a batch dimension
    # The padding the module applies itself (zeros, reflect, circular; 'same' may be asymmetric).
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    ones = (1,) * (2 - spatial)  # a Conv1d is a Conv2d over a height of 1
    patches = F.unfold(
        x.reshape(x.shape[0], x.shape[1], *ones, x.shape[-1]) if spatial == 1 else x,
        (*ones, *module.kernel_size),
        dilation=(*ones, *module.dilation),
        stride=(*ones, *module.stride),
    )  # [B, C·k, T], channel-major like weight.reshape(out, -1)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _output_rows(module: nn.Module, y: Tensor) -> Tensor:
    """``[R, out]`` the output vectors of every position of a call, rows matching :func:`_input_rows`."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, module.out_features)
    spatial = module.weight.ndim - 2
    return y.movedim(-(spatial + 1), -1).reshape(-1, y.shape[-(spatial + 1)])


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


class _Batch:
    """Forward hooks summing, for one batch, each module's ``Σ_t a_t a_tᵀ`` and row count, and keeping
    its outputs; :meth:`backward` then adds ``Σ_t g_t g_tᵀ`` from one batched ``autograd.grad``."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.a: dict[str, Tensor] = {}
        self.g: dict[str, Tensor] = {}
        self.rows: dict[str, int] = defaultdict(int)
        self.outputs: list[tuple[str, Tensor]] = []

    def hook(self, name: str) -> Callable[..., Tensor]:
        def record(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor
        ) -> Tensor:
            x = args[0] if args else kwargs["input"]
            with torch.no_grad():
                a = _input_rows(module, x.detach())
                _add(self.a, name, (a.T @ a).double())
            self.rows[name] += a.shape[0]
            if not output.requires_grad:
                return output
            self.outputs.append((name, output))
            return output.clone()  # later in-place ops (ReLU(inplace=True)) change the copy, not this

        return record

    @staticmethod
    def run(model: nn.Module, modules: dict[str, nn.Module], ll_fn: LogLikelihoodFn, x: Tensor) -> _Batch:
        """The sums of batch ``x``: one hooked forward and one backward, in eval mode."""
        batch = _Batch(modules)
        handles = [m.register_forward_hook(batch.hook(n), with_kwargs=True) for n, m in modules.items()]
        try:
            with eval_mode(model), grad_enabled():
                batch.backward(check_log_likelihood_output(ll_fn(x), x.shape[0]))
        finally:
            for handle in handles:
                handle.remove()
        return batch

    def backward(self, ll: Tensor) -> None:
        if not self.outputs:  # no Kronecker module ran (or none is trainable): nothing to add
            return
        grads = torch.autograd.grad(ll.sum(), [y for _, y in self.outputs], allow_unused=True)
        for (name, _), grad in zip(self.outputs, grads, strict=True):
            if grad is not None:  # an output the log-likelihood does not use adds nothing
                g = _output_rows(self.modules[name], grad.detach())
                _add(self.g, name, (g.T @ g).double())


def _add(sums: dict[str, Tensor], key: str, value: Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value


class KFAC(FittedMetric):
    """K-FAC: ``A ⊗ G`` Fisher blocks for the weights of ``nn.Linear`` (any number of sequence dims)
    and ``nn.Conv1d``/``nn.Conv2d`` (groups=1) layers, ``G`` alone for their biases, damped with
    Martens' π-correction (see the module docstring for the conventions).

    Every other parameter tensor (norm layers, embeddings, custom layers such as Glow's, weights
    shared with such modules, Kronecker modules whose forward never ran in the fit) falls back to the
    paper's layer-scalar metric ``||s_l||² / λ_l`` with ``λ_l = E||s_l||² / d_l``, estimated in the
    same fit (as :class:`~fimcb.metrics.diagonal.LayerScalar` does, zero-gradient convention included).
    :attr:`kronecker_factored` and :attr:`layer_scalars` say which is which. A weight also used
    outside its module's forward (``x @ linear.weight``) keeps the factors of the forward calls only.

    Args:
        damping: δ > 0 added to ``A ⊗ G`` through the factors (they are often singular).
        fisher, n_samples, batch_size, seed: see :class:`~fimcb.metrics.diagonal.FittedMetric`.
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
        self._factors: dict[Layer, tuple[Tensor, Tensor]] = {}  # undamped (A, G)
        self._owners: dict[str, Layer] = {}  # Kronecker-factored parameter -> its layer
        self._scales: dict[str, float] = {}  # λ_l of every other parameter
        self._roots: dict[Layer, tuple[Tensor, Tensor]] = {}  # damped inverse square roots

    def options(self) -> dict[str, Any]:
        return {**super().options(), "damping": self.damping}

    @property
    def kronecker_factored(self) -> tuple[str, ...]:
        """Names of the parameters with Kronecker factors (weights with ``A ⊗ G``, biases with ``G``)."""
        return tuple(self._owners)

    @property
    def layer_scalars(self) -> dict[str, float]:
        """``λ_l`` of the parameters that fall back to the layer-scalar metric."""
        return dict(self._scales)

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """The undamped ``(A, G)`` of a Kronecker-factored parameter (its layer's, for a bias)."""
        self._known(name)
        if name not in self._owners:
            raise KeyError(f"{name!r} is not Kronecker-factored; factored: {sorted(self._owners)}")
        return self._factors[self._owners[name]]

    def fit(
        self,
        model: nn.Module,
        data: Iterable[Any] | None = None,
        log_likelihood: LogLikelihoodFn | None = None,
    ) -> KFAC:
        """Estimate the factors (and the fallback λ_l) over ``n_samples`` inputs from ``fisher``.

        Runs ``model`` in eval mode, where samples are independent: one batched backward to the
        hooked layers' outputs gives every sample's own output gradients. Sums over batches are
        reduced over DDP ranks at the end, so a fit split across ranks equals one on all the data.
        """
        inputs = self._inputs(model, data)
        ll_fn = resolve_log_likelihood(model, log_likelihood)
        params = self._parameters(model)
        owners = kronecker_owners(model, params)
        layers = list(dict.fromkeys(owners.values()))
        hooked = {name for layer in layers for name in layer.split(",")}
        modules = {name: m for name, m in model.named_modules() if name in hooked}
        weights = {layer: modules[layer.split(",")[0]].weight for layer in layers}  # [out, in, *kernel]
        device = next(iter(params.values())).device
        zeros = {"dtype": torch.float64, "device": device}
        a_sums = {layer: torch.zeros(2 * [w.shape[1:].numel()], **zeros) for layer, w in weights.items()}
        g_sums = {layer: torch.zeros(2 * [w.shape[0]], **zeros) for layer, w in weights.items()}
        rows = {layer: torch.zeros((), **zeros) for layer in layers}
        squares = torch.zeros(len(params), **zeros)
        count = 0
        for x in inputs:
            x = x.to(device)
            batch = _Batch.run(model, modules, ll_fn, x)
            for layer in layers:
                names = layer.split(",")
                n_rows = sum(batch.rows[m] for m in names)
                rows[layer] += n_rows
                for m in names:  # expand convention: A averages over the rows of a sample
                    if m in batch.a:
                        a_sums[layer] += batch.a[m] * (x.shape[0] / n_rows)
                    if m in batch.g:
                        g_sums[layer] += batch.g[m]
            norms = per_sample_layer_norms(model, x, metric="identity", log_likelihood=ll_fn)
            squares += norms.values.double().sum(0)
            count += x.shape[0]

        mean_squares = reduced_means(dict(zip(params, squares, strict=True)), count)
        a_means, g_means, row_means = (
            reduced_means(sums, count) if layers else {} for sums in (a_sums, g_sums, rows)
        )
        unused = [layer for layer in layers if row_means[layer] == 0]
        if unused:
            log.warning(
                "fimcb kfac: modules %s never ran in the fit; they get the layer-scalar metric", unused
            )
        kept = {name: layer for name, layer in owners.items() if layer not in unused}
        factors = {  # kept in the parameters' dtype, like the gradients they will whiten
            layer: (a_means[layer].to(weights[layer].dtype), g_means[layer].to(weights[layer].dtype))
            for layer in dict.fromkeys(kept.values())
        }
        dims = {name: p.numel() for name, p in params.items()}
        scales = layer_scales({n: m for n, m in mean_squares.items() if n not in kept}, dims)
        self._set(factors, kept, scales)
        self.dims = dims
        return self

    def _set(
        self, factors: dict[Layer, tuple[Tensor, Tensor]], owners: dict[str, Layer], scales: dict[str, float]
    ) -> None:
        """Install a fitted or loaded state after checking it, and precompute the inverse roots."""
        bad = [layer for layer, (a, g) in factors.items() if not (a.isfinite().all() and g.isfinite().all())]
        bad += [name for name, scale in scales.items() if not math.isfinite(scale)]
        if bad:
            raise ValueError(
                f"non-finite K-FAC statistics for {bad}: the model's activations or log-likelihood "
                "gradients are not finite on the Fisher samples"
            )
        if not set(owners.values()) <= set(factors):
            raise ValueError("a K-FAC state names layers without factors")
        self._roots = {}
        for layer, (a, g) in factors.items():
            a_root, g_root = damped_inverse_roots(a, g, self.damping)
            self._roots[layer] = a_root.to(a.dtype), g_root.to(g.dtype)
        self._factors, self._owners, self._scales = factors, owners, scales

    def _known(self, name: str) -> None:
        """Clear errors before fit or for a parameter the metric was not fitted on."""
        self._lookup(self.dims or {}, name)

    def squared_norms(self, name: str, grads: Tensor) -> Tensor:
        self._known(name)
        if name in self._scales:
            return squared_row_norms(grads) / self._scales[name]
        return squared_row_norms(self._whiten(name, grads))

    def inner_products(self, name: str, a: Tensor, b: Tensor) -> Tensor:
        """``[A, B]`` products ``⟨G^{-1/2} S_a A^{-1/2}, G^{-1/2} S_b A^{-1/2}⟩`` of the whitened gradients
        (``b_aᵀ G⁻¹ b_b`` for a bias); layer-scalar parameters through the base class's diagonal path."""
        self._known(name)
        if name in self._scales:
            return super().inner_products(name, a, b)
        a, b = check_pair(name, a, b)
        return as_rows(self._whiten(name, a)) @ as_rows(self._whiten(name, b)).T

    def _whiten(self, name: str, grads: Tensor) -> Tensor:
        """``G^{-1/2} S A^{-1/2}`` per sample for a factored weight (``b G^{-1/2}`` for a bias), whose
        squared Frobenius norm is the metric's squared norm."""
        a_root, g_root = (r.to(grads.device, grads.dtype) for r in self._roots[self._owners[name]])
        if grads.ndim == 2:  # a bias: bᵀ G⁻¹ b
            if grads.shape[1] != g_root.shape[0]:
                raise ValueError(
                    f"gradients of {name!r} have shape {list(grads.shape[1:])}, not [{g_root.shape[0]}]"
                )
            return grads @ g_root
        s = grads.reshape(grads.shape[0], grads.shape[1], -1)
        if s.shape[1:] != (g_root.shape[0], a_root.shape[0]):
            raise ValueError(
                f"gradients of {name!r} have shape {list(grads.shape[1:])}, not a "
                f"[{g_root.shape[0]}, {a_root.shape[0]}] weight"
            )
        return g_root @ s @ a_root

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
            "factors": {layer: {"A": a, "G": g} for layer, (a, g) in self._factors.items()},
            "owners": self._owners,
            "scales": self._scales,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"options", "dims", "factors", "owners", "scales"} - set(state)
        if missing:
            raise ValueError(f"not a KFAC state: missing {sorted(missing)}")
        self._restore_options(state)
        factors = {layer: (f["A"], f["G"]) for layer, f in state["factors"].items()}
        self._set(factors, dict(state["owners"]), dict(state["scales"]))
        self.dims = dict(state["dims"])
