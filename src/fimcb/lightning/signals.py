"""The training signals researchers already watch, logged beside the FIM-norms for a fair comparison.

A study of training dynamics (grokking, novelty over training) should ask whether the FIM-norm tells
more than what is cheaper to watch and needs no held-out data: the total weight norm, the weight norm
of the output layer and the norm of the batch gradient. ``TrainingSignals`` logs those (the training
loss is the model's own ``train/nll``) at the trainer's logging cadence, before each optimiser step,
so that each value belongs to the same weights as the loss logged at that step.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as L
from torch import Tensor, nn
from torch.nn.utils import get_total_norm
from torch.optim import Optimizer

PREFIX = "signals"


def l2_norm(tensors: Sequence[Tensor]) -> float:
    """The Euclidean norm of several tensors taken as one vector (0.0 for none)."""
    return float(get_total_norm([t.detach() for t in tensors]))


def last_layer(model: nn.Module) -> str:
    """The name of the last registered module that owns trainable parameters directly: the output
    layer of models built in reading order (``head``, ``lm_head``, the last ``Linear``)."""
    owners = [
        name
        for name, module in model.named_modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    ]
    if not owners:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to watch")
    return owners[-1]


class TrainingSignals(L.Callback):
    """Logs ``signals/weight_norm`` (all trainable parameters), ``signals/weight_norm/<layer>`` (the
    output layer's) and ``signals/grad_norm`` (the batch gradient, before clipping), each step the
    trainer logs (``log_every_n_steps``).

    Args:
        layer: the module whose weight norm is logged on its own; default the last registered module
            with trainable parameters (see ``last_layer``).
    """

    def __init__(self, layer: str | None = None) -> None:
        self.layer = layer
        self._name = ""  # the layer watched in this run (``layer`` or the model's last one)
        self._layer_params: list[Tensor] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        name = self.layer if self.layer is not None else last_layer(pl_module)
        modules = dict(pl_module.named_modules())
        if name not in modules:
            raise ValueError(
                f"TrainingSignals(layer={name!r}): {type(pl_module).__name__} has no such module; "
                f"name one of {[n for n in modules if n][:8]}..."
            )
        self._name = name
        self._layer_params = [p for p in modules[name].parameters() if p.requires_grad]

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer
    ) -> None:
        if not trainer._logger_connector.should_update_logs:  # the step Lightning would not log
            return
        params = [p for p in pl_module.parameters() if p.requires_grad]
        grads = [p.grad for p in params if p.grad is not None]
        values = {
            f"{PREFIX}/weight_norm": l2_norm(params),
            f"{PREFIX}/weight_norm/{self._name}": l2_norm(self._layer_params),
            f"{PREFIX}/grad_norm": l2_norm(grads),
        }
        pl_module.log_dict(values, on_step=True, on_epoch=False)
