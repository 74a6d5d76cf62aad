"""Agreement of each engine backend with a naive per-sample ``backward()`` loop, on the project's models.

    python benchmarks/engine_agreement.py [--data-root ../shared/data] [--batch 32]

Prints, per model and engine, the largest relative deviation of any per-sample layer norm
(|engine − naive| / naive) and of the log-likelihood, in float32 and float64.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
from engine import ConvAutoencoder
from torch import Tensor, nn

from fimcb import per_sample_layer_norms
from fimcb.data import ImageDataModule
from fimcb.models import Glow


def naive(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample ``backward()`` on a copy of the model, reading ``.grad`` of every parameter."""
    ref = copy.deepcopy(model).eval()
    params = [p for p in ref.parameters() if p.requires_grad]
    rows, lls = [], []
    for i in range(len(x)):
        ref.zero_grad(set_to_none=True)
        ll = ref.log_likelihood(x[i : i + 1]).sum()
        ll.backward()
        rows.append(torch.stack([p.grad.pow(2).sum() for p in params]))
        lls.append(ll.detach())
    return torch.stack(rows), torch.stack(lls)


def trained(model: Glow, x: Tensor, steps: int = 20) -> Glow:
    """A few Adam steps, so that gradients are those of a model that has started to fit."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        (-model.log_likelihood(x).mean()).backward()
        opt.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("FIMCB_DATA_ROOT", "../shared/data"))
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = []
    for name, dataset, kwargs in [
        ("glow-digits", "digits", dict(n_levels=2, n_steps=4, hidden_channels=32)),
        ("glow-fashionmnist", "fashionmnist", dict(n_levels=2, n_steps=8, hidden_channels=64)),
    ]:
        dm = ImageDataModule(dataset, root=args.data_root, batch_size=args.batch, val_size=args.batch)
        x = next(iter(dm.val_dataloader()))[0]
        model = Glow(image_shape=dm.image_shape, num_levels=dm.num_levels, **kwargs)
        cases.append((name, trained(model, next(iter(dm.train_dataloader()))[0]), x))
    cases.append(("conv-autoencoder", ConvAutoencoder().eval(), x))  # the benchmark's reference model
    print(f"{'model':<20}{'dtype':<9}{'engine':<8}{'max rel. err. norms':>22}{'max rel. err. LL':>19}")
    for name, model, x in cases:
        for dtype in (torch.float32, torch.float64):
            m, xx = copy.deepcopy(model).to(dtype), x.to(dtype)
            ref, ref_ll = naive(m, xx)
            for engine in ("hooks", "func", "loop"):
                norms = per_sample_layer_norms(m, xx, engine=engine)
                err = ((norms.values - ref).abs() / ref.abs().clamp_min(torch.finfo(dtype).tiny)).max()
                err_ll = ((norms.log_likelihood - ref_ll).abs() / ref_ll.abs()).max()
                print(f"{name:<20}{str(dtype)[6:]:<9}{engine:<8}{err.item():>22.2e}{err_ll.item():>19.2e}")


if __name__ == "__main__":
    main()
