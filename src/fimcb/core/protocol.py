"""The model protocol: what fimcb needs from a generative model, and clear errors when it is missing.

A model is usable when it exposes ``log_likelihood(x) -> Tensor[B]``: the per-sample
log-likelihood in nats (or its ELBO), deterministic in ``eval()`` mode. Batches are either a
tensor ``x`` or a sequence ``(x, target, sample_id, ...)`` as yielded by fimcb's datamodules.

A model whose log-likelihood is a stochastic bound (a VAE's ELBO) may also expose a settable integer
``noise_stream``: the stream its eval-mode noise is drawn from (0 by default), so that scores can be
averaged over independent draws (:func:`noise_streams`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from fimcb.core.checks import check_int

LogLikelihoodFn = Callable[[Tensor], Tensor]


@runtime_checkable
class LikelihoodModel(Protocol):
    """Structural type of a model fimcb can score."""

    def log_likelihood(self, x: Tensor) -> Tensor:
        """Per-sample log-likelihood in nats, shape ``[B]``."""
        ...


class ModelProtocolError(TypeError):
    """The model does not provide what fimcb needs (see the message for what to add)."""


def resolve_log_likelihood(
    model: nn.Module, log_likelihood: LogLikelihoodFn | None = None
) -> LogLikelihoodFn:
    """Return the function that computes per-sample log-likelihoods of ``model``.

    ``log_likelihood`` overrides the model's own method; it must compute through ``model``
    (for example ``lambda x: -model.nll(x)``) so that gradients reach its parameters.
    """
    if log_likelihood is not None:
        if not callable(log_likelihood):
            raise ModelProtocolError(f"log_likelihood must be callable, got {type(log_likelihood).__name__}")
        return log_likelihood
    method = getattr(model, "log_likelihood", None)
    if not callable(method):
        raise ModelProtocolError(
            f"{type(model).__name__} has no method `log_likelihood(x) -> Tensor[B]`. Add one that returns "
            "the per-sample log-likelihood in nats (or the ELBO) of a batch x, deterministic in eval() "
            "mode, or pass `log_likelihood=` (a function of x that calls the model) to fimcb."
        )
    return method


def check_log_likelihood_output(ll: Any, batch_size: int) -> Tensor:
    """Raise a clear error unless ``ll`` is a floating tensor of shape ``[batch_size]``."""
    if not isinstance(ll, Tensor):
        raise ModelProtocolError(f"log_likelihood must return a Tensor of shape [B], got {type(ll).__name__}")
    if tuple(ll.shape) != (batch_size,):
        raise ModelProtocolError(
            f"log_likelihood must return one value per sample, shape [{batch_size}], got {list(ll.shape)}; "
            "do not reduce over the batch (no .mean()/.sum()), and sum over all other dimensions."
        )
    if not torch.is_floating_point(ll):
        raise ModelProtocolError(f"log_likelihood must return a floating tensor, got {ll.dtype}")
    return ll


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """Split a batch into inputs and sample ids (``None`` when the batch carries none).

    Accepts a tensor, a sequence ``(x, target, ids, ...)`` or a mapping with keys ``x`` and ``id``.
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, dict):
        return batch["x"], batch.get("id")
    if isinstance(batch, Sequence) and len(batch) > 0 and isinstance(batch[0], Tensor):
        ids = batch[2] if len(batch) >= 3 and isinstance(batch[2], Tensor) else None
        return batch[0], ids
    raise TypeError(
        "cannot find the inputs in a batch of type "
        f"{type(batch).__name__}: yield a tensor, a tuple (x, target, sample_id) or a dict with key 'x'"
    )


def check_noise_streams(model: nn.Module, draws: int) -> None:
    """Refuse ``draws`` > 1 for a model without a settable integer ``noise_stream`` (what to do instead)."""
    check_int("noise draws", draws)
    if draws > 1 and not isinstance(getattr(model, "noise_stream", None), int):
        raise ModelProtocolError(
            f"averaging over {draws} noise draws needs a model whose eval-mode log-likelihood draws its "
            f"noise from a settable integer `noise_stream` (fimcb's VAE has one); {type(model).__name__} "
            "has none: use one draw (scoring.noise_draws: 1), or add the attribute to the model"
        )


@contextlib.contextmanager
def noise_streams(model: nn.Module, draws: int) -> Iterator[range]:
    """Yields the streams ``0 .. draws-1`` to set as ``model.noise_stream`` in turn, restoring the model's
    own stream afterwards; refuses a model without noise streams when more than one draw is asked."""
    check_noise_streams(model, draws)
    own = getattr(model, "noise_stream", None)
    try:
        yield range(draws)
    finally:
        if own is not None:
            setattr(model, "noise_stream", own)  # noqa: B010  # an attribute nn.Module does not declare
