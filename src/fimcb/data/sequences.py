"""Token-sequence datamodules: modular arithmetic (grokking) and character-level text, with OOD sets.

Batches are ``(tokens int64 [B, T], target int64 [B], sample_id int64 [B])`` like the image
datamodule's: a sample's id is its position in its split, stable across passes and runs with the same
arguments. Each datamodule exposes ``vocab_size``, ``seq_len`` and ``prompt_len`` (linked to the model by
the CLI), ``decode(tokens) -> str``, the val/test loaders and ``ood_dataloaders()``, so
:class:`~fimcb.FIMNormCallback` works with them unchanged.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fimcb.data.datamodule import make_loader
from fimcb.data.ood import ood_generator
from fimcb.data.splits import num_val, subset_indices

#: Operations of :class:`ModularArithmeticDataModule`, by name: their symbol, in vocabulary order.
OPERATIONS: dict[str, str] = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
#: The operation ``other_operation`` OOD sets use instead of the trained one (same operator token).
OTHER_OPERATION: dict[str, str] = {"add": "sub", "sub": "add", "mul": "div", "div": "mul"}
MODULAR_OOD = ("wrong_answers", "other_operation", "random_tokens")
TEXT_OOD = ("shuffled", "reversed")
TEXT_FILE_PREFIX = "text:"


class TokenSplit(Dataset):
    """One split held whole; item ``i`` is ``(tokens int64 [T], target, i)``.

    ``source_index[i]`` traces the sample to its origin: the equation's index ``a * p + b`` for modular
    arithmetic, the character offset in the file for text (``-1`` for synthetic samples).
    """

    def __init__(self, tokens: Tensor, targets: Tensor, source_index: Tensor) -> None:
        if tokens.ndim != 2 or not len(tokens) == len(targets) == len(source_index):
            raise ValueError(
                f"need tokens [N, T] and N targets and source indices, got {list(tokens.shape)}, "
                f"{len(targets)}, {len(source_index)}"
            )
        self.tokens = tokens.to(torch.int64)
        self.targets = targets.to(torch.int64)
        self.source_index = source_index.to(torch.int64)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.tokens[i], self.targets[i], i


class SequenceDataModule(L.LightningDataModule, ABC):
    """Shared plumbing: loaders, the vocabulary and named OOD sets built lazily from the test split.

    Subclasses set ``vocabulary``, ``seq_len``, ``prompt_len`` and ``ood_names``, implement
    :meth:`_build_splits` and :meth:`_make_ood`.
    """

    vocabulary: list[str]
    seq_len: int
    prompt_len: int
    ood_names: list[str]
    #: Joins decoded tokens (a space between numbers and symbols, nothing between characters).
    separator: str = ""

    def __init__(
        self,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        split_seed: int,
        ood_size: int | None,
    ) -> None:
        super().__init__()
        sizes = [("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("ood_size", ood_size)]
        for name, value in sizes:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = num_workers
        self.split_seed = split_seed
        self.ood_size = ood_size
        self.train_set: TokenSplit | None = None
        self.val_set: TokenSplit | None = None
        self.test_set: TokenSplit | None = None
        self._ood_sets: dict[str, TokenSplit] = {}

    @property
    def vocab_size(self) -> int:
        """Number of token values, known before ``setup``."""
        return len(self.vocabulary)

    def decode(self, tokens: Tensor) -> str:
        """The text of one sequence of token ids ``[T]``."""
        return self.separator.join(self.vocabulary[t] for t in tokens.tolist())

    def setup(self, stage: str | None = None) -> None:
        """Build every split once (they are small and deterministic, whatever the stage)."""
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self._build_splits()

    @abstractmethod
    def _build_splits(self) -> tuple[TokenSplit, TokenSplit, TokenSplit]:
        """The train, validation and test splits."""

    @abstractmethod
    def _make_ood(self, name: str, test: TokenSplit, size: int, generator: torch.Generator) -> TokenSplit:
        """The OOD set ``name`` of at most ``size`` samples, drawing randomness from ``generator`` only."""

    @abstractmethod
    def _check_ood_name(self, name: str) -> str:
        """``name`` if it is a valid OOD set name, else a ``ValueError`` listing the valid ones."""

    def ood_dataset(self, name: str) -> TokenSplit:
        """The OOD set ``name``, built on first use from the test split (``ood_size`` samples at most)."""
        name = self._check_ood_name(name)
        if name not in self._ood_sets:
            self.setup()
            assert self.test_set is not None
            size = len(self.test_set) if self.ood_size is None else self.ood_size
            generator = ood_generator(name, self.split_seed)
            self._ood_sets[name] = self._make_ood(name, self.test_set, size, generator)
        return self._ood_sets[name]

    def _loader(self, dataset: TokenSplit | None, batch_size: int, shuffle: bool = False) -> DataLoader:
        assert dataset is not None
        return make_loader(dataset, batch_size, self.num_workers, shuffle)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (the order draws from the global torch RNG, which Lightning seeds)."""
        self.setup()
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        self.setup()
        return self._loader(self.val_set, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        self.setup()
        return self._loader(self.test_set, self.eval_batch_size)

    def ood_dataloaders(self) -> dict[str, DataLoader]:
        """One loader per OOD set in ``ood_names``, in a fixed order."""
        return {name: self._loader(self.ood_dataset(name), self.eval_batch_size) for name in self.ood_names}


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def modular_result(a: Tensor, b: Tensor, operation: str, p: int) -> Tensor:
    """``a op b mod p`` elementwise; ``div`` is ``a * b^(p-2)``, the inverse of ``b != 0`` for prime ``p``."""
    if operation == "add":
        return (a + b) % p
    if operation == "sub":
        return (a - b) % p
    if operation == "mul":
        return (a * b) % p
    if operation == "div":
        inverse = torch.ones_like(b)
        power, base = p - 2, b % p
        while power:  # square and multiply, exact in int64 for p < 2**31
            if power & 1:
                inverse = inverse * base % p
            base, power = base * base % p, power >> 1
        return a * inverse % p
    raise ValueError(f"operation must be one of {list(OPERATIONS)}, got {operation!r}")


class ModularArithmeticDataModule(SequenceDataModule):
    """Every equation ``a op b = c (mod p)`` as the sequence ``[a, op, b, =, c]``; only ``c`` is scored.

    The vocabulary is the numbers ``0 .. p-1`` (tokens ``0 .. p-1``), the four operator symbols ``+ - * /``
    (tokens ``p .. p+3``, so every operation shares one vocabulary) and ``=`` (token ``p+4``); the prompt is
    ``a op b =`` (``prompt_len = 4``). All ``p²`` equations (``p(p-1)`` for ``div``, where ``b != 0``) are
    split by one seeded permutation: a ``train_fraction`` goes to training and the rest is held out.
    With ``val_size=None`` the held-out equations are both the validation and the test set (the grokking
    convention: validation accuracy on every unseen equation); with a count or fraction, that many
    held-out equations validate and the others are a disjoint test set, so that OOD detectors fit on
    validation are evaluated on unseen in-distribution data. Targets are the correct answer ``c`` (for
    OOD sets too, where the last token may differ from it; ``-1`` for random tokens).

    Args:
        p: the modulus (prime for ``div``).
        operation: ``add``, ``sub``, ``mul`` or ``div``.
        train_fraction: fraction of the equations used for training.
        val_size: held-out equations used for validation (count or fraction); None: all, and also as test.
        ood: OOD set names, default all of ``wrong_answers`` (``c`` replaced by a uniformly drawn wrong
            value), ``other_operation`` (``c`` computed with the other operation of the pair add/sub or
            mul/div, keeping the operator token, on equations where the two answers differ) and
            ``random_tokens`` (every token uniform over the vocabulary).
        ood_size: cap on each OOD set (None: the size of the test set).
        batch_size: training batch size (at least the training set size for full-batch training).
        eval_batch_size: batch size of val/test/OOD loaders (None: ``batch_size``).
        num_workers: DataLoader worker processes.
        split_seed: seed of the split and of the OOD sets.
    """

    separator = " "
    prompt_len = 4

    def __init__(
        self,
        p: int = 97,
        operation: str = "add",
        train_fraction: float = 0.3,
        val_size: int | float | None = None,
        ood: list[str] | None = None,
        ood_size: int | None = None,
        batch_size: int = 512,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, split_seed, ood_size)
        self.save_hyperparameters()
        if operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {list(OPERATIONS)}, got {operation!r}")
        if not isinstance(p, int) or p < 2 or (operation == "div" and not _is_prime(p)):
            raise ValueError(f"p must be an int >= 2 (a prime for div), got {p!r}")
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
        self.p = p
        self.operation = operation
        self.train_fraction = train_fraction
        self.val_size = val_size
        self.seq_len = 5
        self.vocabulary = [str(n) for n in range(p)] + list(OPERATIONS.values()) + ["="]
        self.op_token = p + list(OPERATIONS).index(operation)
        self.eq_token = p + len(OPERATIONS)
        names = MODULAR_OOD if ood is None else ood
        self.ood_names = list(dict.fromkeys(self._check_ood_name(n) for n in names))

    def _check_ood_name(self, name: str) -> str:
        if name not in MODULAR_OOD:
            raise ValueError(
                f"unknown OOD set {name!r} for modular arithmetic; choose from {list(MODULAR_OOD)}"
            )
        return name

    def equations(self, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        """Token sequences ``[N, 5]`` of ``a op b = c`` with the datamodule's operator token."""
        op, eq = torch.full_like(a, self.op_token), torch.full_like(a, self.eq_token)
        return torch.stack([a, op, b, eq, c], dim=1)

    def _split(self, index: Tensor) -> TokenSplit:
        a, b = index // self.p, index % self.p
        c = modular_result(a, b, self.operation, self.p)
        return TokenSplit(self.equations(a, b, c), c, index)

    def _build_splits(self) -> tuple[TokenSplit, TokenSplit, TokenSplit]:
        index = torch.arange(self.p * self.p)
        if self.operation == "div":
            index = index[index % self.p != 0]
        index = index[torch.randperm(len(index), generator=torch.Generator().manual_seed(self.split_seed))]
        n_train = round(self.train_fraction * len(index))
        if not 0 < n_train < len(index):
            raise ValueError(
                f"train_fraction {self.train_fraction} of {len(index)} equations leaves a split empty"
            )
        train, held_out = index[:n_train].sort().values, index[n_train:]
        if self.val_size is None:
            val = test = held_out.sort().values
        else:
            n_val = num_val(len(held_out), self.val_size)
            val, test = held_out[:n_val].sort().values, held_out[n_val:].sort().values
        return self._split(train), self._split(val), self._split(test)

    def _make_ood(self, name: str, test: TokenSplit, size: int, generator: torch.Generator) -> TokenSplit:
        a, b, c = test.tokens[:, 0], test.tokens[:, 2], test.targets
        if name == "random_tokens":
            tokens = torch.randint(0, self.vocab_size, (size, self.seq_len), generator=generator)
            return TokenSplit(tokens, torch.full((size,), -1), torch.full((size,), -1))
        if name == "wrong_answers":
            wrong = (c + torch.randint(1, self.p, c.shape, generator=generator)) % self.p
        else:
            wrong = modular_result(a, b, OTHER_OPERATION[self.operation], self.p)
        keep = torch.nonzero(wrong != c).squeeze(1)
        if len(keep) == 0:
            raise ValueError(f"OOD set {name!r} is empty for p={self.p}, operation={self.operation}")
        keep = keep[torch.randperm(len(keep), generator=generator)[:size].sort().values]
        return TokenSplit(self.equations(a[keep], b[keep], wrong[keep]), c[keep], test.source_index[keep])


class CharTextDataModule(SequenceDataModule):
    """Character-level language modelling of one UTF-8 text file.

    The vocabulary is the sorted set of the file's characters. The text is cut into three contiguous
    chunks, train, validation and test (in that order), each into non-overlapping windows of
    ``seq_len`` characters (every character scored: ``prompt_len = 0``; targets are ``-1``).

    Args:
        path: the UTF-8 text file (required; the repository downloads nothing).
        seq_len: characters per sequence.
        val_fraction, test_fraction: fractions of the text in the validation and test chunks.
        ood: OOD set names, default ``shuffled`` (each test sequence's characters permuted) and
            ``reversed`` (each test sequence reversed); ``text:<path>`` adds windows of another text
            file, whose characters outside this file's vocabulary are dropped.
        ood_size: cap on each OOD set (None: the size of the test set).
        batch_size, eval_batch_size, num_workers: loader settings (``eval_batch_size`` None: ``batch_size``).
        split_seed: seed of the OOD sets (the splits themselves are contiguous, not random).
    """

    prompt_len = 0

    def __init__(
        self,
        path: str | None = None,
        seq_len: int = 128,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        ood: list[str] | None = None,
        ood_size: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, split_seed, ood_size)
        self.save_hyperparameters()
        if path is None:
            raise ValueError(
                "CharTextDataModule needs a UTF-8 text file: pass path= (--data.init_args.path FILE)"
            )
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        if val_fraction <= 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"need positive val/test fractions summing below 1, got {val_fraction}, {test_fraction}"
            )
        self.path = Path(path)
        self.text = self.path.read_text(encoding="utf-8")
        self.seq_len = seq_len
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.vocabulary = sorted(set(self.text))
        self._index = {char: i for i, char in enumerate(self.vocabulary)}
        names = TEXT_OOD if ood is None else ood
        self.ood_names = list(dict.fromkeys(self._check_ood_name(n) for n in names))

    def _check_ood_name(self, name: str) -> str:
        if name in TEXT_OOD:
            return name
        if name.startswith(TEXT_FILE_PREFIX) and Path(name[len(TEXT_FILE_PREFIX) :]).is_file():
            return name
        raise ValueError(
            f"unknown OOD set {name!r} for text; choose from {list(TEXT_OOD)} or "
            f"{TEXT_FILE_PREFIX}<path of an existing file>"
        )

    def encode(self, text: str) -> Tensor:
        """Token ids of ``text`` (int64); characters outside the vocabulary are dropped."""
        return torch.tensor([self._index[c] for c in text if c in self._index], dtype=torch.int64)

    def _windows(self, tokens: Tensor, offset: int) -> TokenSplit:
        n = len(tokens) // self.seq_len
        if n == 0:
            raise ValueError(
                f"{self.path}: a chunk of {len(tokens)} characters holds no sequence of {self.seq_len}; "
                "use a longer text, a shorter seq_len or larger fractions"
            )
        starts = torch.arange(n) * self.seq_len
        windows = tokens[: n * self.seq_len].reshape(n, self.seq_len)
        return TokenSplit(windows, torch.full((n,), -1), offset + starts)

    def _build_splits(self) -> tuple[TokenSplit, TokenSplit, TokenSplit]:
        tokens = self.encode(self.text)
        n_val, n_test = round(self.val_fraction * len(tokens)), round(self.test_fraction * len(tokens))
        n_train = len(tokens) - n_val - n_test
        return (
            self._windows(tokens[:n_train], 0),
            self._windows(tokens[n_train : n_train + n_val], n_train),
            self._windows(tokens[n_train + n_val :], n_train + n_val),
        )

    def _make_ood(self, name: str, test: TokenSplit, size: int, generator: torch.Generator) -> TokenSplit:
        if name.startswith(TEXT_FILE_PREFIX):
            path = Path(name[len(TEXT_FILE_PREFIX) :])
            windows = self._windows(self.encode(path.read_text(encoding="utf-8")), 0)
            keep = subset_indices(len(windows), size, self.split_seed)
            return TokenSplit(windows.tokens[keep], windows.targets[keep], windows.source_index[keep])
        keep = subset_indices(len(test), size, self.split_seed)
        tokens = test.tokens[keep]
        if name == "reversed":
            tokens = tokens.flip(1)
        else:
            order = torch.rand(tokens.shape, generator=generator).argsort(dim=1)
            tokens = tokens.gather(1, order)
        return TokenSplit(tokens, test.targets[keep], test.source_index[keep])


__all__ = [
    "OPERATIONS",
    "CharTextDataModule",
    "ModularArithmeticDataModule",
    "SequenceDataModule",
    "TokenSplit",
    "modular_result",
]
