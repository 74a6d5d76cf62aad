"""train.py's CLI end to end: the default config and the Fashion-MNIST config, at tiny sizes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from cli_runs import CONFIGS, run_config
from lightning.pytorch import LightningDataModule

from fimcb.cli import FIMCLI, main
from fimcb.detectors import DEFAULT_DETECTOR, DEFAULT_METHODS
from fimcb.models import LikelihoodModule

TINY = [
    "--model.init_args.n_steps",
    "1",
    "--model.init_args.hidden_channels",
    "8",
    "--model.init_args.n_samples",
    "4",
]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])


def _run(tmp_path: Path, config: str, *extra: str):
    return run_config(tmp_path, config, *TINY, *extra)


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "ood_metrics.json").read_text())


def test_default_config_end_to_end(tmp_path: Path) -> None:
    cli = _run(
        tmp_path,
        "default.yaml",
        "--trainer.max_steps",
        "6",
        "--data.init_args.train_size",
        "128",
        "--data.init_args.val_size",
        "32",
        "--data.init_args.test_size",
        "32",
    )
    assert cli.model.image_shape == (1, 8, 8) and cli.model.num_levels == 17  # linked from the datamodule
    run_dir = Path(cli.trainer.log_dir)
    metrics = _metrics(run_dir)
    assert list(metrics) == ["sample_patches", "vflip", "noise"]
    assert list(metrics["noise"]) == list(DEFAULT_METHODS)  # the config evaluates the library default
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["callbacks"][0]["class_path"] == "fimcb.FIMNormCallback"
    assert "fim/train_probe/log_norm_mean" in (run_dir / "metrics.csv").read_text()


def test_fashionmnist_config_on_real_data(tmp_path: Path, data_root: Path) -> None:
    cli = _run(
        tmp_path,
        "glow_fashionmnist.yaml",
        "--trainer.max_steps",
        "2",
        "--data.init_args.root",
        str(data_root),
        "--data.init_args.train_size",
        "64",
        "--data.init_args.val_size",
        "48",
        "--data.init_args.test_size",
        "48",
        "--trainer.limit_val_batches",
        "1",
    )
    assert cli.model.image_shape == (1, 28, 28) and cli.model.num_levels == 256
    metrics = _metrics(Path(cli.trainer.log_dir))
    assert list(metrics) == ["mnist", "hflip", "vflip", "noise", "constant"]
    assert all(0 <= v <= 1 for m in metrics["mnist"].values() for v in m.values())


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_parses(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("fimcb.models.")
    callbacks = [c["class_path"] for c in printed["trainer"]["callbacks"]]
    assert callbacks[-1] == "fimcb.FIMNormCallback"  # last: command-line callback options go to it
    # every config evaluates the default detector beside the paper's
    methods = printed["trainer"]["callbacks"][-1]["init_args"]["evaluation"]["methods"] or DEFAULT_METHODS
    assert {DEFAULT_DETECTOR, "fim_gaussian"} <= set(methods)


def _instantiate(config: Path, root: Path) -> FIMCLI:
    args = ["--config", str(config), "--trainer.default_root_dir", str(root)]
    return FIMCLI(
        LikelihoodModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=False,
    )


def test_metric_and_detectors_by_name_from_yaml(tmp_path: Path) -> None:
    config = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    callback = config["trainer"]["callbacks"][0]["init_args"]
    low_rank = {"n_reference": 8, "fisher": "true"}
    callback["scoring"] = {"metric": {"class_path": "fimcb.metrics.LowRank", "init_args": low_rank}}
    callback["evaluation"] = {"methods": ["fim_gaussian_full", "chi_square", "fisher_method", "typicality"]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = _instantiate(path, tmp_path)
    (built,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "FIMNormCallback"]
    metric = built.scoring.metric
    assert type(metric).__name__ == "LowRank" and metric.options()["n_reference"] == 8
    assert metric.fisher == "true"
    assert built.evaluation.methods == ("fim_gaussian_full", "chi_square", "fisher_method", "typicality")
    assert built.tracking.every_n_train_steps == 50  # the config's other options are kept
    callback["scoring"] = {"metric": "kfac"}
    path.write_text(yaml.safe_dump(config))
    cli = _instantiate(path, tmp_path)
    (built,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "FIMNormCallback"]
    assert built.scoring.metric == "kfac"
