"""Number words between languages: German and French -> English (`vierundachtzig` -> `eighty-four`).

All words come from num2words. The alignment is not monotonic: German says the units before the tens
(`vier-und-achtzig`, four-and-eighty) and French builds 97 as 4*20 + 10 + 7 (`quatre-vingt-dix-sept`),
while English says tens then units. Targets are exactly what `num2words(n, lang='en')` writes
(`one hundred and five`, `seven thousand, seven hundred and seventy-seven`).

The split is by *number*: the German and French forms of one number always share a split, so every
test number is unseen in training, in both languages.

Sources are drawn as people write them (`write_number`): each spelling of a number (`number_spellings`:
num2words' own; German `hundert...` besides `einhundert...`; French traditional and 1990 spellings, the
1990 rules hyphenating every compound: `deux-cent-vingt-et-un`), most with a few of the changes people
make: a capital first letter, upper case, words spaced apart (`vier und achtzig`, `quatre vingt quatre`) or
hyphenated, extra or other spaces, other dashes, invisible characters (export/data/written.py). The model's
normalisation (`NUMBERS_NORMALIZATION`: NFKC, ignorables dropped, case folded, dashes and whitespace
dropped) removes all of those changes and the difference between the two French spellings; the German
`hundert`/`einhundert` spellings are learnt.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from export.data.splits import Pair, Splits, check_fractions, sorted_counts
from export.data.written import (
    Writer,
    Written,
    case_writer,
    extra_spaces,
    invisibles,
    missing_spaces,
    other_dashes,
    unicode_spaces,
    write,
)
from service.runtime.normalization import LEGACY, Normalization

DEFAULT_SOURCE_LANGUAGES: tuple[str, ...] = ("de", "fr")

#: The numbers model's source normalisation: what its tokenizer declares and applies to every input. Word
#: boundaries carry no meaning in number words (German writes them as one word), so spaces and hyphens go.
NUMBERS_NORMALIZATION = Normalization(unicode="NFKC", ignorables="drop", case="fold", dashes="drop", whitespace="drop")
#: Its target normalisation: the English words are written exactly as num2words writes them.
NUMBERS_TARGET_NORMALIZATION = LEGACY

#: The name of num2words' own spelling in `number_spellings`.
STANDARD_SPELLING = "standard"

#: Share of draws left exactly as spelt; the others get one to three changes.
AS_SPELT_SHARE = 1 / 6

# German number words are compounds of these (longest first, so that 'achtzehn' is not 'acht' + 'zehn').
_GERMAN_PARTS = sorted(
    "null eins ein zwei drei vier fünf sechs sieben acht neun zehn elf zwölf dreizehn vierzehn fünfzehn sechzehn "
    "siebzehn achtzehn neunzehn zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig hundert "
    "tausend und".split(),
    key=lambda part: (-len(part), part),
)


def number_words(number: int, language: str) -> str:
    """`number` written out in `language` (a num2words language code), as the task uses it."""
    from num2words import num2words  # training-only dependency, imported on first use

    return str(num2words(number, lang=language))


def german_parts(words: str) -> list[str]:
    """The parts a German number word is compounded of ('vierundachtzig' -> ['vier', 'und', 'achtzig'])."""
    parts: list[str] = []
    position = 0
    while position < len(words):
        part = next((part for part in _GERMAN_PARTS if words.startswith(part, position)), None)
        if part is None:
            raise ValueError(f"{words!r} is not a German number word this module knows")
        parts.append(part)
        position += len(part)
    return parts


def number_spellings(number: int, language: str) -> dict[str, str]:
    """Every correct spelling of `number` in `language` the task draws from, by name; STANDARD_SPELLING is
    num2words' own. German: 'hundert' for num2words' 'einhundert' (100-199; both are correct). French: the
    traditional spelling (num2words') and the 1990 one, which hyphenates every compound ('deux-cent-un',
    'vingt-et-un')."""
    standard = number_words(number, language)
    spellings = {STANDARD_SPELLING: standard}
    if language == "de" and standard.startswith("einhundert"):
        spellings["hundert"] = standard.removeprefix("ein")
    if language == "fr":
        spellings["1990"] = "-".join(re.split(r"[ -]", standard))
    return spellings


def number_writers(language: str) -> dict[str, Writer]:
    """The changes people make to number words in `language`, in the order they are applied."""

    def pieces(text: str) -> list[str]:
        # Words and the separators between them; German words further cut into the parts they compound.
        split = re.split(r"([ -])", text)
        if language != "de":
            return [piece for piece in split if piece]
        return [part for piece in split if piece for part in ([piece] if piece in " -" else german_parts(piece))]

    def joined(text: str, rng: random.Random, separator: str) -> str:
        # Some or all boundaries between words (and German parts) written with `separator`.
        parts = pieces(text)
        out = [parts[0]]
        for previous, part in zip(parts, parts[1:], strict=False):
            if part in " -" or previous in " -":
                out.append(separator if rng.random() < 0.7 else part) if part in " -" else out.append(part)
            else:
                out.append((separator if rng.random() < 0.7 else "") + part)
        return "".join(out)

    return {
        "spaced words": lambda text, rng: joined(text, rng, " ") if language_word(text) else text,
        "hyphenated words": lambda text, rng: joined(text, rng, "-") if language_word(text) else text,
        "case": case_writer(language),
        "missing spaces": missing_spaces,
        "extra spaces": extra_spaces,
        "other spaces": unicode_spaces,
        "other dashes": other_dashes,
        "invisible characters": invisibles,
    }


def language_word(text: str) -> bool:
    """True for number words the spacing writers can work on: lower-case letters, spaces and hyphens."""
    return bool(text) and all((char.isalpha() and char.islower()) or char in " -" for char in text)


def write_number(text: str, language: str, rng: random.Random, *, changed: bool | None = None) -> Written:
    """Number words as people write them: `text` (a spelling), and unless `changed` is False one to three
    of `number_writers` (`changed` None: left as spelt with probability AS_SPELT_SHARE)."""
    if changed is None:
        changed = rng.random() >= AS_SPELT_SHARE
    if not changed:
        return Written(text, ())
    return write(text, number_writers(language), rng, counts=(1, 1, 2, 2, 3))


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
    written: bool = True,
) -> Splits:
    """Generate the numbers task: every number in [min_number, max_number] in every source language.

    With `split_by="number"` the numbers are shuffled with `random.Random(seed)`; the first
    `round(count * valid_fraction)` go to valid, the next `round(count * test_fraction)` to test, the rest
    to train, and each number contributes one pair per source language and spelling to its split: test
    numbers are unseen in training, which measures how the model generalises.
    With `split_by="none"` (a model meant to know the whole range) every pair is in train, and valid and
    test are the same pairs: they measure what the model claims, every number of the range; the fractions
    are ignored. With `written` each source is drawn as people write it (`write_number`), else it is the
    spelling itself. Sources that normalise alike (NUMBERS_NORMALIZATION) count as one: the first is kept,
    and one that two numbers share (none with the default languages) is dropped. Same arguments -> identical
    splits.
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

    writing = random.Random(f"{seed}/written")
    drawn_by_split: dict[str, list[tuple[Pair, Written, str]]] = {}
    for split, split_numbers in number_splits.items():
        drawn: list[tuple[Pair, Written, str]] = []
        for number in split_numbers:
            target = number_words(number, target_language)
            for language in source_languages:
                for spelling, text in number_spellings(number, language).items():
                    source = write_number(text, language, writing) if written else Written(text, ())
                    drawn.append((Pair(source.text, target), source, spelling))
        rng.shuffle(drawn)
        drawn_by_split[split] = drawn

    # The same normalised source in two splits would also be an ambiguous source, since splits hold distinct
    # numbers.
    targets_of: dict[str, set[str]] = {}
    for drawn in drawn_by_split.values():
        for pair, _, _ in drawn:
            targets_of.setdefault(NUMBERS_NORMALIZATION(pair.source), set()).add(pair.target)
    ambiguous = {key for key, targets in targets_of.items() if len(targets) > 1}
    pairs_by_split: dict[str, list[Pair]] = {}
    spellings: Counter[str] = Counter()
    changes: Counter[str] = Counter()
    for split, drawn in drawn_by_split.items():
        kept = _unique_sources([item for item in drawn if NUMBERS_NORMALIZATION(item[0].source) not in ambiguous])
        pairs_by_split[split] = [pair for pair, _, _ in kept]
        spellings.update(spelling for _, _, spelling in kept)
        changes.update(kind for _, source, _ in kept for kind in source.kinds)

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
        "spellings": sorted_counts(spellings),
        "written": (
            {
                "description": "each spelling as people write it: most with one to three changes "
                "(export/data/written.py); sources that normalise alike are kept once",
                "changes": sorted_counts(changes),
            }
            if written
            else "as spelt"
        ),
        "normalization": NUMBERS_NORMALIZATION.to_document(),
        "dropped_ambiguous_sources": len(ambiguous),
        "num2words_version": _num2words_version(),
    }
    return Splits(
        train=train,
        valid=valid,
        test=test,
        description=description,
        source_normalization=NUMBERS_NORMALIZATION,
        target_normalization=NUMBERS_TARGET_NORMALIZATION,
    )


def _unique_sources(drawn: list[tuple[Pair, Written, str]]) -> list[tuple[Pair, Written, str]]:
    """Keep the first draw of each normalised source (the two French spellings, written alike by two
    languages, ...)."""
    seen: set[str] = set()
    unique = []
    for item in drawn:
        key = NUMBERS_NORMALIZATION(item[0].source)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique


def _num2words_version() -> str:
    try:
        return version("num2words")
    except PackageNotFoundError:
        return "unknown"
