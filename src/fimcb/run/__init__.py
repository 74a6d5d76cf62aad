"""A run folder: per-sample histories, summaries for loggers, and the artefacts of an evaluation,
read and written in one place."""

from fimcb.run.history import History, HistoryWriter, load_history
from fimcb.run.summaries import summarize

__all__ = ["History", "HistoryWriter", "load_history", "summarize"]
