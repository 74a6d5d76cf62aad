"""LightningCLI entry point: any fimcb model on any datamodule, with shapes linked from data to model."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fimcb.models import ImageLikelihoodModel


class FIMCLI(LightningCLI):
    """LightningCLI that passes the datamodule's ``image_shape`` and ``num_levels`` to the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for attribute in ("image_shape", "num_levels"):
            parser.link_arguments(f"data.{attribute}", f"model.init_args.{attribute}", apply_on="instantiate")


def main(args: Sequence[str] | None = None, default_config: str | Path | None = None) -> FIMCLI:
    """Run the CLI; with no arguments at all, ``fit`` the ``default_config``."""
    given = sys.argv[1:] if args is None else list(args)
    if not given and default_config is not None:
        args = ["fit", "--config", str(default_config)]
    # Denormal floats make early CPU training steps several times slower (METHOD.md §9).
    torch.set_flush_denormal(True)
    return FIMCLI(
        ImageLikelihoodModel,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )
