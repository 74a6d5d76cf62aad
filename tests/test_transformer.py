"""The decoder-only transformer: an exact, normalised, causal likelihood; exact per-sample gradients;
training on modular arithmetic; Lightning with the FIM-norm callback; the CLI configs at tiny size."""

from __future__ import annotations

import csv
import itertools
import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_runs import run_config
from lightning.pytorch.loggers import CSVLogger
from test_sequences import write_text
from torch import Tensor

from fimcb import FIMNormCallback, load_history, per_sample_layer_norms
from fimcb.data.sequences import CharTextDataModule, ModularArithmeticDataModule
from fimcb.detectors import DEFAULT_METHODS
from fimcb.lightning.options import Evaluation, Tracking
from fimcb.models.transformer import Transformer

METHODS = set(DEFAULT_METHODS)


def tiny(vocab_size: int = 3, seq_len: int = 4, prompt_len: int = 0, **overrides: object) -> Transformer:
    """A tiny float64 transformer whose parameters are moved far from initialisation, in eval mode."""
    options = dict(d_model=16, n_layers=2, n_heads=2)
    model = Transformer(vocab_size, seq_len, prompt_len, **{**options, **overrides}).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def every_sequence(vocab_size: int, length: int) -> Tensor:
    return torch.tensor(list(itertools.product(range(vocab_size), repeat=length)))


def test_probabilities_of_every_sequence_sum_to_one() -> None:
    model = tiny()
    total = model.log_likelihood(every_sequence(3, 4)).exp().sum()
    torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64))


def test_conditional_probabilities_sum_to_one_for_every_prompt() -> None:
    model = tiny(prompt_len=2)
    ll = model.log_likelihood(every_sequence(3, 4)).reshape(9, 9)  # [prompt, completion]
    torch.testing.assert_close(ll.exp().sum(1), torch.ones(9, dtype=torch.float64))


def test_log_likelihood_is_the_chain_rule_over_prefixes() -> None:
    """Independent reference: each token's probability from a forward pass over its prefix alone."""
    model = tiny(vocab_size=5, seq_len=6, prompt_len=2)
    x = torch.randint(0, 5, (7, 6))
    reference = sum(
        torch.log_softmax(model.logits(x[:, : t + 1], t)[:, 0], -1).gather(1, x[:, t : t + 1]).squeeze(1)
        for t in range(2, 6)
    )
    torch.testing.assert_close(model.log_likelihood(x), reference)


def test_causality_later_tokens_do_not_change_earlier_terms() -> None:
    model = tiny(vocab_size=5, seq_len=6)
    x = torch.randint(0, 5, (4, 6))
    for t in range(6):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1) % 5
        before, after = model.token_log_probs(x), model.token_log_probs(changed)
        torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=0)
        assert (before[:, t] != after[:, t]).all()


def test_eval_log_likelihood_is_deterministic_and_batch_independent() -> None:
    model = tiny(vocab_size=7, seq_len=5, dropout=0.5)  # dropout must not act in eval mode
    x = torch.randint(0, 7, (6, 5))
    state = torch.random.get_rng_state()
    batch = model.log_likelihood(x)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(model.log_likelihood(x), batch, rtol=0, atol=0)
    alone = torch.cat([model.log_likelihood(x[i : i + 1]) for i in range(6)])
    mixed = model.log_likelihood(torch.cat([x[:3], torch.randint(0, 7, (5, 5))]))[:3]
    torch.testing.assert_close(alone, batch)
    torch.testing.assert_close(mixed, batch[:3])
    assert not torch.equal(model.train().log_likelihood(x), batch)  # dropout in training mode


def test_hooks_engine_accepts_the_model_and_matches_the_loop() -> None:
    model = tiny(vocab_size=6, seq_len=5, prompt_len=1)
    x = torch.randint(0, 6, (8, 5))
    hooks = per_sample_layer_norms(model, x, engine="hooks")
    loop = per_sample_layer_norms(model, x, engine="loop")
    func = per_sample_layer_norms(model, x, engine="func")
    assert hooks.names == loop.names and len(hooks.names) == len(list(model.parameters()))
    torch.testing.assert_close(hooks.values, loop.values, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(func.values, loop.values, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(hooks.log_likelihood, model.log_likelihood(x).detach())
    assert (hooks.values > 0).all()  # every parameter tensor, positions included, gets a gradient


def test_inputs_are_validated() -> None:
    model = tiny()
    with pytest.raises(TypeError, match="int64"):
        model.log_likelihood(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="shape"):
        model.log_likelihood(torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="lie in"):
        model.log_likelihood(torch.tensor([[0, 1, 2, 3]]))  # 3 is the start token, not data
    with pytest.raises(ValueError, match="lie in"):
        model.log_likelihood(torch.tensor([[0, -1, 2, 1]]))
    with pytest.raises(ValueError, match="datamodule"):
        Transformer(vocab_size=None, seq_len=4)
    with pytest.raises(ValueError, match="prompt_len"):
        Transformer(vocab_size=3, seq_len=4, prompt_len=4)


def test_sample_keeps_the_prompt_and_stays_in_the_vocabulary() -> None:
    model = tiny(vocab_size=5, seq_len=6, prompt_len=2)
    prompt = torch.randint(0, 5, (10, 2))
    samples = model.sample(10, prompt)
    assert samples.shape == (10, 6) and samples.dtype == torch.int64
    assert torch.equal(samples[:, :2], prompt) and samples.min() >= 0 and samples.max() < 5
    assert model.sample(3).shape == (3, 6)


def test_fits_tiny_modular_addition_far_better_than_at_initialisation() -> None:
    dm = ModularArithmeticDataModule(p=7, train_fraction=0.9)
    dm.setup()
    x = dm.train_set.tokens
    model = Transformer(dm.vocab_size, dm.seq_len, dm.prompt_len, d_model=32, n_layers=1, n_heads=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    initial = -model.log_likelihood(x).mean().item()
    for _ in range(120):
        loss = -model.log_likelihood(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = -model.eval().log_likelihood(x).mean().item()
    assert initial > 2.0 and final < 0.2 * initial
    assert (model.logits(x, 4)[:, 0].argmax(-1) == x[:, 4]).float().mean() > 0.8


def _fit(tmp_path: Path, dm: L.LightningDataModule, **model_options: object) -> L.Trainer:
    L.seed_everything(0)
    model = Transformer(
        dm.vocab_size,
        dm.seq_len,
        dm.prompt_len,
        d_model=16,
        n_layers=1,
        n_heads=2,
        n_samples=3,
        **model_options,
    )
    callback = FIMNormCallback(
        Tracking(every_n_train_steps=2, n_train_probe=8, n_val_probe=8),
        evaluation=Evaluation(max_samples=24),
        progress=False,
    )
    trainer = L.Trainer(
        max_steps=3,
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=3,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    trainer.fit(model, dm)
    metrics = json.loads((Path(trainer.log_dir) / "ood_metrics.json").read_text())
    assert list(metrics) == dm.ood_names and all(set(m) == METHODS for m in metrics.values())
    with open(Path(trainer.log_dir) / "metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    assert {"train/acc_step", "val/acc", "val/nats_per_token", "fim/train_probe/log_norm_mean"} <= columns
    return trainer


def test_lightning_fit_with_callback_on_modular_arithmetic(tmp_path: Path) -> None:
    dm = ModularArithmeticDataModule(p=7, train_fraction=0.5, val_size=0.5, batch_size=8)
    trainer = _fit(tmp_path, dm)
    lines = (Path(trainer.log_dir) / "samples" / "samples_step0000003.txt").read_text().splitlines()
    assert len(lines) == 3 and all(len(line.split(" ")) == 5 and line.split(" ")[3] == "=" for line in lines)


def test_lightning_fit_with_callback_on_text(tmp_path: Path) -> None:
    dm = CharTextDataModule(str(write_text(tmp_path / "text.txt")), seq_len=16, batch_size=8, ood_size=24)
    trainer = _fit(tmp_path, dm, dropout=0.1)
    text = (Path(trainer.log_dir) / "samples" / "samples_step0000003.txt").read_text(encoding="utf-8")
    assert len(text) >= 3 * 16


@pytest.fixture
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])


TINY_CLI = [
    "--model.init_args.d_model", "16",
    "--model.init_args.n_heads", "2",
    "--model.init_args.n_layers", "1",
    "--model.init_args.n_samples", "2",
    "--trainer.max_steps", "4",
    "--trainer.callbacks.init_args.evaluation.max_samples", "32",
]  # fmt: skip


def _cli(tmp_path: Path, config: str, *extra: str) -> Path:
    cli = run_config(tmp_path, config, *TINY_CLI, *extra)
    assert cli.model.vocab_size == cli.datamodule.vocab_size and cli.model.seq_len == cli.datamodule.seq_len
    assert cli.model.prompt_len == cli.datamodule.prompt_len
    return Path(cli.trainer.log_dir)


@pytest.mark.usefixtures("_no_pytest_argv")
def test_modadd_config_end_to_end(tmp_path: Path) -> None:
    run_dir = _cli(
        tmp_path,
        "transformer_modadd.yaml",
        "--data.init_args.p",
        "11",
        "--data.init_args.batch_size",
        "16",
        "--trainer.check_val_every_n_epoch",
        "1",
    )
    metrics = json.loads((run_dir / "ood_metrics.json").read_text())
    assert list(metrics) == ["wrong_answers", "other_operation", "random_tokens"]
    assert all(set(m) == METHODS for m in metrics.values())


@pytest.mark.usefixtures("_no_pytest_argv")
def test_grokking_config_tracks_densely_and_draws_text_pictures(tmp_path: Path) -> None:
    run_dir = _cli(
        tmp_path,
        "grokking_modadd.yaml",
        "--data.init_args.p",
        "11",
        "--data.init_args.batch_size",
        "16",
        "--trainer.val_check_interval",
        "2",
        "--trainer.callbacks.init_args.tracking.every_n_train_steps",
        "2",
        "--trainer.callbacks.init_args.pictures.influence_samples",
        "8",
        "--trainer.log_every_n_steps",
        "2",
        "--trainer.callbacks.init_args.pictures.enabled",
        "true",
    )
    history = load_history(run_dir / "history")
    assert sorted(set(history.select("train_probe").step.tolist())) == [0, 2, 4]
    assert sorted(set(history.select("val").step.tolist())) == [2, 4]
    assert history.names[0] == "token_embedding.weight" and history.names[-1] == "head.bias"
    samples = torch.load(run_dir / "novel_samples.pt", weights_only=True)
    datamodule = ModularArithmeticDataModule(p=11)
    most = samples["sets"]["wrong_answers"]["most"]
    assert most["text"] == [datamodule.decode(x) for x in most["input"]]  # token inputs come back as text
    assert "saliency" not in most
    query = samples["influence"]["queries"][0]
    assert query["top"]["text"][0] == datamodule.decode(query["top"]["input"][0])
    figures = {p.stem for p in (run_dir / "figures").glob("*.png")}
    assert {"training_dynamics", "layer_heatmap_val", "novel_samples_most", "influence"} <= figures
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"signals/weight_norm", "signals/weight_norm/head", "signals/grad_norm"} <= set(header)


@pytest.mark.usefixtures("_no_pytest_argv")
def test_chars_config_end_to_end(tmp_path: Path) -> None:
    path = write_text(tmp_path / "text.txt")
    run_dir = _cli(
        tmp_path,
        "transformer_chars.yaml",
        "--data.init_args.path",
        str(path),
        "--data.init_args.seq_len",
        "16",
        "--trainer.val_check_interval",
        "2",
    )
    metrics = json.loads((run_dir / "ood_metrics.json").read_text())
    assert list(metrics) == ["shuffled", "reversed"]
