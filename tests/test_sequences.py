"""Token-sequence datamodules: modular-arithmetic splits and OOD sets, character-text windows and OOD sets."""

from __future__ import annotations

import codecs
import inspect
import itertools
import json
import pathlib
import this
from pathlib import Path

import pytest
import torch

from fimcb.data.sequences import CharTextDataModule, ModularArithmeticDataModule, modular_result


def write_text(path: Path, repeat: int = 3) -> Path:
    """A small offline UTF-8 text: the Zen of Python and some stdlib docstrings (a few thousand chars)."""
    parts = [codecs.decode(this.s, "rot13")] + [inspect.getdoc(m) or "" for m in (json, pathlib, itertools)]
    path.write_text("\n\n".join(parts * repeat) + "\nnaïve café — ünïcödé\n", encoding="utf-8")
    return path


def _reference_result(a: int, b: int, operation: str, p: int) -> int:
    """Independent reference: Python integers and ``pow(b, -1, p)``."""
    return {"add": a + b, "sub": a - b, "mul": a * b, "div": a * pow(b, -1, p) if b else 0}[operation] % p


@pytest.mark.parametrize("operation", ["add", "sub", "mul", "div"])
def test_every_equation_is_correct_and_splits_are_disjoint(operation: str) -> None:
    p = 11
    dm = ModularArithmeticDataModule(p=p, operation=operation, train_fraction=0.3, val_size=0.5)
    dm.setup("fit")
    n_total = p * p - (p if operation == "div" else 0)
    splits = [dm.train_set, dm.val_set, dm.test_set]
    assert sum(len(s) for s in splits) == n_total
    assert len(dm.train_set) == round(0.3 * n_total)
    seen = [set(s.source_index.tolist()) for s in splits]
    assert all(not (x & y) for x, y in itertools.combinations(seen, 2))
    for split in splits:
        rows = zip(split.tokens.tolist(), split.targets.tolist(), split.source_index.tolist(), strict=True)
        for row, target, source in rows:
            a, op, b, eq, c = row
            assert (a, b) == divmod(source, p)
            assert op == dm.op_token and eq == dm.eq_token and dm.vocabulary[op] in "+-*/"
            assert c == target == _reference_result(a, b, operation, p)
            if operation == "div":
                assert b != 0
    assert dm.decode(dm.train_set.tokens[0]).count(" ") == 4


def test_modular_result_matches_python() -> None:
    a, b = torch.meshgrid(torch.arange(13), torch.arange(1, 13), indexing="ij")
    for operation in ["add", "sub", "mul", "div"]:
        pairs = zip(a.flatten().tolist(), b.flatten().tolist(), strict=True)
        expected = [_reference_result(x, y, operation, 13) for x, y in pairs]
        assert modular_result(a.flatten(), b.flatten(), operation, 13).tolist() == expected


def test_held_out_equations_are_val_and_test_by_default() -> None:
    dm = ModularArithmeticDataModule(p=7, train_fraction=0.5)
    dm.setup()
    assert torch.equal(dm.val_set.tokens, dm.test_set.tokens)
    assert len(dm.train_set) + len(dm.val_set) == 49
    assert dm.vocab_size == 7 + 4 + 1 and dm.seq_len == 5 and dm.prompt_len == 4


def test_splits_and_ood_sets_are_deterministic_and_ids_stable() -> None:
    first, second = (ModularArithmeticDataModule(p=7, split_seed=3, val_size=10) for _ in range(2))
    for name in ["wrong_answers", "other_operation", "random_tokens"]:
        assert torch.equal(first.ood_dataset(name).tokens, second.ood_dataset(name).tokens)
    assert torch.equal(first.train_set.tokens, second.train_set.tokens)
    batches = list(first.val_dataloader())
    assert torch.cat([ids for _, _, ids in batches]).tolist() == list(range(len(first.val_set)))
    assert torch.cat([x for x, _, _ in batches]).dtype == torch.int64
    other = ModularArithmeticDataModule(p=7, split_seed=4, val_size=10)
    other.setup()
    assert not torch.equal(first.train_set.tokens, other.train_set.tokens)


def test_ood_sets_really_differ() -> None:
    p = 13
    dm = ModularArithmeticDataModule(p=p, train_fraction=0.3, ood_size=50)
    wrong = dm.ood_dataset("wrong_answers")
    other = dm.ood_dataset("other_operation")
    noise = dm.ood_dataset("random_tokens")
    assert len(wrong) == len(other) == len(noise) == 50
    for split in (wrong, other):
        a, b, c = split.tokens[:, 0], split.tokens[:, 2], split.tokens[:, 4]
        assert (c != (a + b) % p).all()  # never a correct equation
        assert torch.equal(split.targets, (a + b) % p)  # the target is still the correct answer
        assert (split.tokens[:, 1] == dm.op_token).all()
    assert torch.equal(other.tokens[:, 4], (other.tokens[:, 0] - other.tokens[:, 2]) % p)
    assert noise.tokens.max() < dm.vocab_size and len(noise.tokens.unique()) > p
    held_out = set(dm.test_set.source_index.tolist())
    assert set(wrong.source_index.tolist()) <= held_out and set(other.source_index.tolist()) <= held_out
    assert list(dm.ood_dataloaders()) == ["wrong_answers", "other_operation", "random_tokens"]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(p=1),
        dict(p=12, operation="div"),
        dict(operation="pow"),
        dict(train_fraction=1.0),
        dict(ood=["unknown"]),
    ],
)
def test_modular_arguments_are_checked(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ModularArithmeticDataModule(**kwargs)


def test_char_text_windows_vocabulary_and_decode(tmp_path: Path) -> None:
    path = write_text(tmp_path / "text.txt")
    text = path.read_text(encoding="utf-8")
    dm = CharTextDataModule(str(path), seq_len=32, val_fraction=0.1, test_fraction=0.1)
    dm.setup("fit")
    assert dm.vocabulary == sorted(set(text)) and "ï" in dm.vocabulary and dm.prompt_len == 0
    n_val = n_test = round(0.1 * len(text))
    n_train = len(text) - n_val - n_test
    assert len(dm.train_set) == n_train // 32 and len(dm.val_set) == n_val // 32
    for split in (dm.train_set, dm.val_set, dm.test_set):
        for tokens, start in zip(split.tokens, split.source_index.tolist(), strict=True):
            assert dm.decode(tokens) == text[start : start + 32]
    # contiguous chunks, in order: train before validation before test
    assert dm.train_set.source_index.max() + 32 <= n_train <= dm.val_set.source_index.min()
    assert dm.val_set.source_index.max() + 32 <= n_train + n_val <= dm.test_set.source_index.min()
    x, target, ids = next(iter(dm.test_dataloader()))
    assert x.dtype == torch.int64 and x.shape[1] == 32 and (target == -1).all()
    assert ids.tolist() == list(range(len(x)))


def test_char_text_ood_sets(tmp_path: Path) -> None:
    path = write_text(tmp_path / "text.txt")
    other = tmp_path / "other.txt"
    other.write_text("ΑΒΓ 0123456789 " * 40, encoding="utf-8")  # mostly outside the vocabulary
    dm = CharTextDataModule(str(path), seq_len=16, ood=["shuffled", "reversed", f"text:{other}"], ood_size=20)
    dm.setup()
    shuffled, reversed_ = dm.ood_dataset("shuffled"), dm.ood_dataset("reversed")
    assert len(shuffled) == len(reversed_) == 20
    source = dm.test_set.tokens[torch.searchsorted(dm.test_set.source_index, shuffled.source_index)]
    assert torch.equal(shuffled.tokens.sort(1).values, source.sort(1).values)  # the same characters
    assert (shuffled.tokens != source).any(1).all()  # in another order
    assert torch.equal(reversed_.source_index, shuffled.source_index)
    assert torch.equal(reversed_.tokens, source.flip(1))
    foreign = dm.ood_dataset(f"text:{other}")
    assert set(dm.decode(foreign.tokens.flatten())) <= set("0123456789 ")
    with pytest.raises(ValueError, match="text file"):
        CharTextDataModule(None)
    with pytest.raises(ValueError, match="unknown OOD"):
        CharTextDataModule(str(path), ood=["text:/does/not/exist"])
