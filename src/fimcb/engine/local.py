"""Local ``torch.func``: per-sample gradients of a few tensors through one piece of the model.

The fallback of the hooks backend for a module without a rule (module-local) and for a torch function
without an op rule (op-local): the piece is run again for each sample under ``vmap`` and
differentiated with respect to its own parameters, weighted by the per-sample gradients its outputs
received in the batched backward; a piece that ``vmap`` cannot batch (an RNN writing into a state it
creates) is run one sample at a time instead, still only that piece. Exact wherever the piece treats
samples independently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap
from torch.utils._pytree import tree_flatten

log = logging.getLogger("fimcb")

#: What ``vmap`` raises on code it cannot batch (data-dependent control flow, in-place writes into fresh
#: tensors, ``.item()``): the cue to run one sample at a time instead.
VMAP_ERRORS = (RuntimeError, NotImplementedError, ValueError, TypeError)
# Pieces that vmap could not batch, by module type or torch function: not tried again.
_SAMPLE_BY_SAMPLE: set[object] = set()


class LocalError(RuntimeError):
    """The piece cannot be run one sample at a time (its outputs do not split by sample)."""


def sample_view(t: Tensor, batch: int) -> Tensor:
    """``[B·m, ...] -> [B, m, ...]``: a batched tensor's rows grouped by sample (sample-major)."""
    return t.reshape(batch, t.shape[0] // batch, *t.shape[1:])


def per_sample_vjp(
    piece: Callable[[dict[str, Tensor], list[Any]], Any],
    params: dict[str, Tensor],
    inputs: Sequence[Any],
    batched: Sequence[bool],
    output_grads: Sequence[tuple[int, Tensor, bool]],
    batch: int,
    key: object = None,
) -> dict[str, Tensor]:
    """``{name: [B, *shape]}``: sample b's gradient of ``Σ_i <out_i, g_i[b]>`` with respect to ``params``.

    Args:
        piece: ``piece(params, inputs)`` recomputes the piece's output (any pytree).
        params: the tensors to differentiate, shared by all samples.
        inputs: the piece's inputs; those flagged in ``batched`` have ``B·m`` rows, sample-major, and are
            cut into each sample's ``m`` rows; the others are shared.
        output_grads: ``(position in the flattened output, gradient, batched)``: a batched output's
            gradient has the output's ``B·m`` rows; a shared output's is ``[B, *output.shape]``.
        key: what the piece is (a module type, a torch function): once ``vmap`` fails on it, it runs
            sample by sample without trying again.
    """
    inputs = [sample_view(x, batch) if b else x for x, b in zip(inputs, batched, strict=True)]
    in_dims = [0 if b else None for b in batched]
    grads = [sample_view(g, batch) if is_batched else g for _, g, is_batched in output_grads]

    def contribution(p: dict[str, Tensor], sample_inputs: list[Any], sample_grads: list[Tensor]) -> Tensor:
        flat = tree_flatten(piece(p, sample_inputs))[0]
        total = torch.zeros((), dtype=next(iter(p.values())).dtype, device=next(iter(p.values())).device)
        for (position, _, _), g in zip(output_grads, sample_grads, strict=True):
            out = flat[position]
            if out.shape != g.shape:
                raise LocalError(
                    f"output {position} has shape {list(out.shape)} for one sample, but its gradient has "
                    f"{list(g.shape)}: the piece does not treat samples independently"
                )
            total = total + (out * g).sum()
        return total

    run = grad(contribution)
    if key is None or key not in _SAMPLE_BY_SAMPLE:
        try:
            return vmap(run, in_dims=(None, in_dims, 0))(params, inputs, grads)
        except LocalError:
            raise
        except VMAP_ERRORS as err:  # an RNN writing into a fresh state, say: sample by sample
            if key is not None:
                _SAMPLE_BY_SAMPLE.add(key)
            log.info("fimcb: vmap cannot batch %s (%s); it runs one sample at a time", key, str(err)[:200])

    def sample(b: int) -> list[Any]:
        return [x[b] if d == 0 else x for x, d in zip(inputs, in_dims, strict=True)]

    rows = [run(params, sample(b), [g[b] for g in grads]) for b in range(batch)]
    return {n: torch.stack([row[n] for row in rows]) for n in params}
