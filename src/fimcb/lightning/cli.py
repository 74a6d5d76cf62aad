"""LightningCLI entry point: any fimcb model on any datamodule, with shapes linked from data to model."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fimcb.models import LikelihoodModule

#: Attributes a datamodule passes to the model's argument of the same name, where the model has one.
LINKED_ATTRIBUTES = ("image_shape", "num_levels", "vocab_size", "seq_len", "prompt_len")


def _data_attribute(name: str) -> Callable[[LightningDataModule], Any]:
    """The link's value: the datamodule's attribute, or None where it has none (jsonargparse drops links to
    arguments the model lacks; a model that needs the value then rejects the None with a clear error)."""
    return lambda datamodule: getattr(datamodule, name, None)


class FIMCLI(LightningCLI):
    """LightningCLI that passes the datamodule's data shape (``image_shape`` and ``num_levels`` of images,
    ``vocab_size`` and ``seq_len`` of token sequences) to the model arguments that take it."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in LINKED_ATTRIBUTES:
            target = f"model.init_args.{name}"
            parser.link_arguments("data", target, _data_attribute(name), apply_on="instantiate")


def main(args: Sequence[str] | None = None, default_config: str | Path | None = None) -> FIMCLI:
    """Run the CLI; with no arguments at all, ``fit`` the ``default_config``."""
    given = sys.argv[1:] if args is None else list(args)
    if not given and default_config is not None:
        args = ["fit", "--config", str(default_config)]
    # Denormal floats make early CPU training steps several times slower (METHOD.md §9).
    torch.set_flush_denormal(True)
    return FIMCLI(
        LikelihoodModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )
