"""Run a shipped config through train.py's CLI at test size, writing into a temporary directory."""

from __future__ import annotations

from pathlib import Path

from fimcb.cli import FIMCLI, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false"]
NO_PICTURES = ["--trainer.callbacks.init_args.pictures.enabled", "false"]  # matplotlib: seconds per run


def run_config(tmp_path: Path, config: str, *extra: str) -> FIMCLI:
    """``train.py fit --config configs/<config>`` with logs under ``tmp_path``, no progress bar,
    checkpoints or pictures, and ``extra`` options (which shrink the model and data) last."""
    args = ["fit", "--config", str(CONFIGS / config), "--trainer.default_root_dir", str(tmp_path)]
    return main([*args, "--trainer.logger.init_args.save_dir", str(tmp_path), *QUIET, *NO_PICTURES, *extra])
