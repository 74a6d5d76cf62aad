"""Progress bars for the callback's scoring passes, drawn by the trainer's own progress bar: Lightning's
``Tqdm`` one line under the main bar, or a task of the ``RichProgressBar`` (Lightning's default where
``rich`` is installed); nothing when the trainer shows no bar, and only on rank zero."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class _RichTask:
    """The part of tqdm's interface that scoring uses, as a task of a Rich progress display."""

    def __init__(
        self, bar: RichProgressBar, total: int | None = None, desc: str = "", disable: bool = False, **_: Any
    ) -> None:
        self.progress = None if disable else bar.progress
        self.task = self.progress.add_task(desc, total=total) if self.progress is not None else None

    def update(self, n: int = 1) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, advance=n)

    def close(self) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.remove_task(self.task)


def progress_bar(trainer: L.Trainer, wanted: bool) -> Callable[..., Any] | None:
    """A factory with tqdm's signature for the bars of one scoring pass, or ``None`` for no bar."""
    bar = trainer.progress_bar_callback
    if not (wanted and trainer.is_global_zero and bar is not None and getattr(bar, "is_enabled", True)):
        return None
    if isinstance(bar, TQDMProgressBar):
        position = 2 * bar.process_position + 1
        return partial(
            Tqdm,
            position=position,
            dynamic_ncols=True,
            file=sys.stdout,
            bar_format=TQDMProgressBar.BAR_FORMAT,
        )
    if isinstance(bar, RichProgressBar) and bar.progress is not None:
        return partial(_RichTask, bar)
    return None
