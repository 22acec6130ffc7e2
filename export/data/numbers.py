"""Number words between languages: German and French -> English (`vierundachtzig` -> `eighty-four`).

All words come from num2words. The alignment is not monotonic: German says the units before the tens
(`vier-und-achtzig`, four-and-eighty) and French builds 97 as 4*20 + 10 + 7 (`quatre-vingt-dix-sept`),
while English says tens then units. Targets are exactly what `num2words(n, lang='en')` writes
(`one hundred and five`, `seven thousand, seven hundred and seventy-seven`).

The split is by *number*: the German and French forms of one number always share a split, so every
test number is unseen in training, in both languages.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from export.data.splits import Pair, Splits, ambiguous_sources, check_fractions

DEFAULT_SOURCE_LANGUAGES: tuple[str, ...] = ("de", "fr")


def number_words(number: int, language: str) -> str:
    """`number` written out in `language` (a num2words language code), as the task uses it."""
    from num2words import num2words  # training-only dependency, imported on first use

    return str(num2words(number, lang=language))


def make_numbers(
    seed: int = 13,
    *,
    min_number: int = 0,
    max_number: int = 9999,
    source_languages: Sequence[str] = DEFAULT_SOURCE_LANGUAGES,
    target_language: str = "en",
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    split_by: str = "number",
) -> Splits:
    """Generate the numbers task: every number in [min_number, max_number] in every source language.

    With `split_by="number"` the numbers are shuffled with `random.Random(seed)`; the first
    `round(count * valid_fraction)` go to valid, the next `round(count * test_fraction)` to test, the rest
    to train, and each number contributes one pair per source language to its split: test numbers are
    unseen in training, which measures how the model generalises.
    With `split_by="none"` (a model meant to know the whole range) every pair is in train, and valid and
    test are the same pairs: they measure what the model claims, every number of the range; the fractions
    are ignored. Same arguments -> identical splits. A source string that two numbers share (none with
    the default languages) is dropped.
    """
    if split_by not in ("number", "none"):
        raise ValueError(f"split_by must be 'number' or 'none', got {split_by!r}")
    if split_by == "none":
        valid_fraction = test_fraction = 0.0
    check_fractions(valid_fraction, test_fraction)
    if not 0 <= min_number <= max_number:
        raise ValueError(f"need 0 <= min_number <= max_number, got {min_number}..{max_number}")
    if not source_languages or len(set(source_languages)) != len(source_languages):
        raise ValueError(f"source_languages must be distinct and non-empty, got {list(source_languages)}")
    if target_language in source_languages:
        raise ValueError(f"target_language {target_language!r} is also a source language")

    numbers = list(range(min_number, max_number + 1))
    rng = random.Random(seed)
    rng.shuffle(numbers)
    n_valid = round(len(numbers) * valid_fraction)
    n_test = round(len(numbers) * test_fraction)
    if len(numbers) - n_valid - n_test <= 0:
        raise ValueError(f"{len(numbers)} numbers are too few to leave any for training")
    number_splits = {
        "valid": numbers[:n_valid],
        "test": numbers[n_valid : n_valid + n_test],
        "train": numbers[n_valid + n_test :],
    }

    pairs_by_split: dict[str, list[Pair]] = {}
    for split, split_numbers in number_splits.items():
        pairs: list[Pair] = []
        for number in split_numbers:
            target = number_words(number, target_language)
            pairs.extend(Pair(number_words(number, language), target) for language in source_languages)
        rng.shuffle(pairs)
        pairs_by_split[split] = pairs

    # The same source string in two splits would also be an ambiguous source, since splits hold distinct numbers.
    ambiguous = ambiguous_sources(pair for pairs in pairs_by_split.values() for pair in pairs)
    for split, pairs in pairs_by_split.items():
        pairs_by_split[split] = _unique_sources([pair for pair in pairs if pair.source not in ambiguous])

    train, valid, test = pairs_by_split["train"], pairs_by_split["valid"], pairs_by_split["test"]
    if split_by == "none":
        valid, test = list(train), list(train)
    description: dict[str, Any] = {
        "kind": "numbers",
        "description": "Number words (num2words) from German and French to English.",
        "source_languages": list(source_languages),
        "target_language": target_language,
        "seed": seed,
        "counts": {"train": len(train), "valid": len(valid), "test": len(test)},
        "numbers": [min_number, max_number],
        "split_by": split_by,
        "numbers_per_split": {split: len(values) for split, values in number_splits.items()},
        "dropped_ambiguous_sources": len(ambiguous),
        "num2words_version": _num2words_version(),
    }
    return Splits(train=train, valid=valid, test=test, description=description)


def _unique_sources(pairs: list[Pair]) -> list[Pair]:
    """Keep the first pair of each source (two languages writing a number identically would repeat it)."""
    seen: set[str] = set()
    unique = []
    for pair in pairs:
        if pair.source not in seen:
            seen.add(pair.source)
            unique.append(pair)
    return unique


def _num2words_version() -> str:
    try:
        return version("num2words")
    except PackageNotFoundError:
        return "unknown"
