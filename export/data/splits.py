"""Records shared by every data task: a source/target pair and the three splits built from pairs.

Every task (generated dates and numbers, user TSV corpora) returns a `Splits`. The helpers here are the
rules all tasks follow: a source string never appears in two splits, and generated tasks never give one
source string two different targets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.runtime.normalization import Normalization


@dataclass(frozen=True, slots=True)
class Pair:
    """One training example: the text to translate and its reference translation."""

    source: str
    target: str


@dataclass(slots=True)
class Splits:
    """Train, validation and test pairs of one task, plus a JSON-serialisable description of how they were made.

    `description` always has `kind` (the task), `source_languages`, `target_language`, `seed` and `counts`;
    tasks add what reproduces or explains the data (ranges, formats, library versions, ...).
    `source_normalization` and `target_normalization` are the normalisations the task was made for (a generated
    task tells sources apart by their normalised form); None leaves the choice to the tokenizer kind.
    """

    train: list[Pair]
    valid: list[Pair]
    test: list[Pair]
    description: dict[str, Any] = field(default_factory=dict)
    source_normalization: Normalization | None = None
    target_normalization: Normalization | None = None

    def counts(self) -> dict[str, int]:
        """Number of pairs in each split, keyed 'train', 'valid', 'test'."""
        return {"train": len(self.train), "valid": len(self.valid), "test": len(self.test)}

    def all_pairs(self) -> list[Pair]:
        """Every pair, train first, then valid, then test."""
        return [*self.train, *self.valid, *self.test]


def describe(splits: Splits) -> dict[str, Any]:
    """A JSON-serialisable summary of `splits`: its description plus counts and length statistics.

    Lengths are in Unicode code points (characters), the unit a character model sees before tokenization.
    """
    summary = dict(splits.description)
    summary["counts"] = splits.counts()
    pairs = splits.all_pairs()
    if pairs:
        source_lengths = [len(pair.source) for pair in pairs]
        target_lengths = [len(pair.target) for pair in pairs]
        summary["source_chars"] = {
            "max": max(source_lengths),
            "mean": round(sum(source_lengths) / len(source_lengths), 2),
        }
        summary["target_chars"] = {
            "max": max(target_lengths),
            "mean": round(sum(target_lengths) / len(target_lengths), 2),
        }
    return summary


def ambiguous_sources(pairs: Iterable[Pair]) -> set[str]:
    """Source strings that occur with more than one distinct target."""
    first_target: dict[str, str] = {}
    ambiguous: set[str] = set()
    for pair in pairs:
        seen = first_target.setdefault(pair.source, pair.target)
        if seen != pair.target:
            ambiguous.add(pair.source)
    return ambiguous


def shared_sources(splits: Splits) -> set[str]:
    """Source strings that appear in more than one split (empty for a well-formed `Splits`)."""
    train = {pair.source for pair in splits.train}
    valid = {pair.source for pair in splits.valid}
    test = {pair.source for pair in splits.test}
    return (train & valid) | (train & test) | (valid & test)


def stable_fraction(key: str, seed: int) -> float:
    """A number in [0, 1) that depends only on `key` and `seed`, uniform over keys.

    Used to assign a split by hashing, so that adding lines to a corpus moves no existing source to
    another split, and Python's per-process string hash randomisation plays no part.
    """
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def check_fractions(valid_fraction: float, test_fraction: float) -> None:
    """Raise ValueError unless both fractions are in [0, 1) and leave some data for training."""
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if valid_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"valid_fraction + test_fraction must be < 1 to leave pairs for training, "
            f"got {valid_fraction!r} + {test_fraction!r}"
        )


def sorted_counts(counter: dict[str, int]) -> dict[str, int]:
    """`counter` as a plain dict with keys in sorted order, so descriptions are byte-identical across runs."""
    return {key: counter[key] for key in sorted(counter)}


def take_splits(pairs: Sequence[Pair], n_train: int, n_valid: int, n_test: int) -> tuple[list[Pair], ...]:
    """Cut `pairs` (already shuffled, unique sources) into consecutive train, valid and test slices."""
    if n_train + n_valid + n_test > len(pairs):
        raise ValueError(f"asked for {n_train + n_valid + n_test} pairs but only {len(pairs)} are available")
    train = list(pairs[:n_train])
    valid = list(pairs[n_train : n_train + n_valid])
    test = list(pairs[n_train + n_valid : n_train + n_valid + n_test])
    return train, valid, test
