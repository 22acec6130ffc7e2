"""User corpora as tab-separated text, e.g. Tatoeba or Anki sentence-pair exports.

Format accepted by `load_tsv`:

- UTF-8 (a leading byte-order mark is ignored), one pair per line, `source<TAB>target`; `\\n` or `\\r\\n`.
- Lines with more than two columns are accepted and the extra columns ignored: Tatoeba/Anki exports
  append attribution and ids after the two sentences.
- Blank lines (nothing but whitespace) are skipped. Source and target are stripped of surrounding
  whitespace and NFC-normalised, which is what the tokenizers do too.
- Anything else is an error, reported as `CorpusError` with the file, the 1-based line number and the
  problem: no tab, an empty source or target, bytes that are not UTF-8.

The same source may appear with several targets (several reference translations); exact duplicate pairs
are kept once. Each source goes to valid, test or train by a hash of (seed, source): adding lines to a
file never moves an existing source to another split, and all pairs of one source share a split.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from export.data.splits import Pair, Splits, check_fractions, describe, stable_fraction


class CorpusError(ValueError):
    """A corpus file that cannot be used; the message names the file and, for a bad line, its number."""


def load_tsv(
    path: Path | str,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 13,
    max_pairs: int | None = None,
    *,
    source_language: str | None = None,
    target_language: str | None = None,
) -> Splits:
    """Read a `source<TAB>target` corpus and split it into train, valid and test (see module docstring).

    `max_pairs` keeps only the first that many distinct pairs in file order; lines after them are not read
    or checked. Raises CorpusError for a malformed line, an empty file, or a corpus too small to give
    every split with a positive fraction at least one pair; ValueError for bad fractions or max_pairs.
    `source_language` and `target_language` (e.g. 'fr', 'en') only go into the description.
    """
    check_fractions(valid_fraction, test_fraction)
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1 or None, got {max_pairs}")
    path = Path(path)

    pairs, duplicates = _read_pairs(path, max_pairs)
    if not pairs:
        raise CorpusError(f"{path}: no source<TAB>target pairs (the file is empty or blank)")

    splits: dict[str, list[Pair]] = {"train": [], "valid": [], "test": []}
    for pair in pairs:
        fraction = stable_fraction(pair.source, seed)
        if fraction < valid_fraction:
            splits["valid"].append(pair)
        elif fraction < valid_fraction + test_fraction:
            splits["test"].append(pair)
        else:
            splits["train"].append(pair)

    wanted = {"train": 1.0 - valid_fraction - test_fraction, "valid": valid_fraction, "test": test_fraction}
    for split, fraction in wanted.items():
        if fraction > 0 and not splits[split]:
            raise CorpusError(
                f"{path}: {len(pairs)} pairs are too few to split: the {split} split "
                f"({fraction:.1%} of the sources) came out empty; add pairs or change the fractions"
            )

    targets_per_source = Counter(pair.source for pair in pairs)
    description: dict[str, Any] = {
        "kind": "tsv",
        "description": f"User corpus {path.name}: source<TAB>target pairs.",
        "source_languages": [source_language] if source_language else [],
        "target_language": target_language or "",
        "file": path.name,
        "seed": seed,
        "counts": {split: len(split_pairs) for split, split_pairs in splits.items()},
        "fractions": {"valid": valid_fraction, "test": test_fraction},
        "split_by": "hash of source",
        "max_pairs": max_pairs,
        "duplicate_pairs_skipped": duplicates,
        "distinct_sources": len(targets_per_source),
        "sources_with_several_targets": sum(1 for count in targets_per_source.values() if count > 1),
    }
    return Splits(train=splits["train"], valid=splits["valid"], test=splits["test"], description=description)


def write_tsv(pairs: Iterable[Pair], path: Path | str) -> None:
    """Write pairs as UTF-8 `source<TAB>target` lines, readable by `load_tsv`.

    Raises ValueError (before writing anything) if a source or target contains a tab or a line break,
    or is empty after stripping whitespace, since it could not be read back as the same pair.
    """
    lines = []
    for number, pair in enumerate(pairs, start=1):
        for side, text in (("source", pair.source), ("target", pair.target)):
            if "\t" in text or any(char in text for char in "\n\r"):
                raise ValueError(f"pair {number}: {side} {text!r} contains a tab or a line break")
            if not text.strip():
                raise ValueError(f"pair {number}: {side} is empty")
        lines.append(f"{pair.source}\t{pair.target}\n")
    Path(path).write_text("".join(lines), encoding="utf-8", newline="\n")


def write_splits(splits: Splits, directory: Path | str) -> None:
    """Write train.tsv, valid.tsv, test.tsv and description.json (see `describe`) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split, pairs in (("train", splits.train), ("valid", splits.valid), ("test", splits.test)):
        write_tsv(pairs, directory / f"{split}.tsv")
    text = json.dumps(describe(splits), ensure_ascii=False, indent=2) + "\n"
    (directory / "description.json").write_text(text, encoding="utf-8")


def _read_pairs(path: Path, max_pairs: int | None) -> tuple[list[Pair], int]:
    """Distinct pairs in file order, and how many duplicate lines were skipped."""
    try:
        handle = path.open("rb")
    except OSError as error:
        raise CorpusError(f"{path}: cannot open: {error.strerror or error}") from error
    pairs: list[Pair] = []
    seen: set[Pair] = set()
    duplicates = 0
    with handle:
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            pair = _parse_line(path, line_number, raw)
            if pair is None:
                continue
            if pair in seen:
                duplicates += 1
                continue
            seen.add(pair)
            pairs.append(pair)
            if max_pairs is not None and len(pairs) >= max_pairs:
                break
    return pairs, duplicates


def _parse_line(path: Path, line_number: int, raw: bytes) -> Pair | None:
    """The pair on one line, None for a blank line; CorpusError for anything malformed."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorpusError(
            f"{path}:{line_number}: not valid UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1})"
        ) from error
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    columns = line.split("\t")
    if len(columns) < 2:
        raise CorpusError(f"{path}:{line_number}: no tab: expected source<TAB>target, got {_preview(line)}")
    source = unicodedata.normalize("NFC", columns[0].strip())
    target = unicodedata.normalize("NFC", columns[1].strip())
    if not source:
        raise CorpusError(f"{path}:{line_number}: empty source (first column) in {_preview(line)}")
    if not target:
        raise CorpusError(f"{path}:{line_number}: empty target (second column) in {_preview(line)}")
    return Pair(source, target)


def _preview(line: str, limit: int = 60) -> str:
    return repr(line if len(line) <= limit else line[:limit] + "...")
