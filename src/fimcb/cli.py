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

    def _parse_ckpt_path(self) -> None:
        """As LightningCLI does for ``--ckpt_path``, the model's hyperparameters read back from the
        checkpoint, but without the datamodule's linked attributes: they come from the data again, and a
        model without such an argument would reject the ``None`` the checkpoint holds for it."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = dict(
            torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        )
        for name in ("_instantiator", *LINKED_ATTRIBUTES):
            hparams.pop(name, None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)


def main(args: Sequence[str] | None = None, default_config: str | Path | None = None) -> FIMCLI:
    """Run the CLI; with no arguments at all, ``fit`` the ``default_config``."""
    given = sys.argv[1:] if args is None else list(args)
    if not given and default_config is not None:
        given = ["fit", "--config", str(default_config)]
    # Denormal floats make early CPU training steps several times slower (docs/method.md §9).
    torch.set_flush_denormal(True)
    return FIMCLI(
        LikelihoodModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=given,
        save_config_kwargs={"overwrite": True},
    )
