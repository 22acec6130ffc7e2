"""Human-readable dates in many locales -> ISO 8601 (`samedi 21 novembre 2026` -> `2026-11-21`).

Sources are rendered from CLDR data with Babel: each locale's standard 'full', 'long', 'medium' and
'short' date formats, a few custom word patterns for locales that write the day before the month, and
a group of locale-independent numeric patterns. Babel writes Latin digits in every locale (including
ar and hi), so the digits of a source always match the digits of its target.

Rules that keep the task well-posed:

- Patterns with a two-digit year are never used: '26' could be 1926 or 2026 in the year range.
- Numeric-only patterns that share separators but differ in field order (d/M/y against M/d/y) are
  ambiguous for days <= 12; only the most common order of each separator layout is kept.
- Whatever slipped through is caught per string: a source rendered with two different targets is
  dropped, so every source maps to exactly one target.
- Invisible bidirectional marks (Babel puts U+200F into some Arabic patterns) are removed and every
  Unicode space becomes ' ', because people do not type them; text is NFC-normalised.
"""

from __future__ import annotations

import datetime
import functools
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from export.data.splits import Pair, Splits, sorted_counts, take_splits

#: Locales rendered by default: Latin, Cyrillic, Greek, CJK, Arabic, Devanagari, Hebrew and Thai scripts.
DEFAULT_LOCALES: tuple[str, ...] = (
    "en",
    "en_GB",
    "fr",
    "de",
    "es",
    "it",
    "pt",
    "nl",
    "pl",
    "cs",
    "tr",
    "sv",
    "fi",
    "hu",
    "ro",
    "vi",
    "id",
    "ru",
    "uk",
    "el",
    "ja",
    "zh",
    "ko",
    "ar",
    "hi",
    "he",
    "th",
)

#: CLDR standard formats tried in every locale (those with a two-digit year are skipped).
STANDARD_FORMATS: tuple[str, ...] = ("full", "long", "medium", "short")

#: Extra patterns for locales whose 'long' format writes day, then month, then year.
DAY_FIRST_WORD_PATTERNS: tuple[str, ...] = ("d MMMM y", "EEEE d MMMM y", "d MMM y")

#: Locale-independent numeric patterns, sampled as one group of their own.
NUMERIC_PATTERNS: tuple[str, ...] = ("dd.MM.y", "d.M.y", "dd/MM/y", "dd-MM-y", "y/MM/dd", "y.MM.dd")

#: Name of the sampling group that holds NUMERIC_PATTERNS (not a locale).
NUMERIC_GROUP = "numeric"

_BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SPACES = re.compile(r"\s+")
_NUMERIC_FIELDS = {"d", "M", "y"}
_TWO_DIGIT_YEAR_FIELDS = {"y", "Y", "u"}
_PROBE_DAYS = (datetime.date(2026, 11, 21), datetime.date(1987, 3, 4), datetime.date(1999, 12, 31))


@dataclass(frozen=True, slots=True)
class DateFormat:
    """One way of rendering a date: a CLDR pattern in a locale.

    `name` is the CLDR standard format name ('full', 'long', 'medium', 'short') or, for custom patterns,
    the pattern itself. `locale` is NUMERIC_GROUP for the locale-independent numeric patterns.
    """

    locale: str
    name: str
    pattern: str


@dataclass(frozen=True, slots=True)
class DroppedFormat:
    """A format left out of the task, and why (for the task description)."""

    format: DateFormat
    reason: str


def clean_date_text(text: str) -> str:
    """Babel output as a person would type it: no bidi marks, plain single spaces, NFC."""
    text = _BIDI_CONTROLS.sub("", text)
    text = _SPACES.sub(" ", text).strip()
    return unicodedata.normalize("NFC", text)


def render_date(day: datetime.date, fmt: DateFormat) -> str:
    """`day` written in `fmt`, cleaned as every dates source is (see clean_date_text)."""
    return clean_date_text(_compile(fmt.pattern).apply(day, _locale(fmt.locale)))


def select_date_formats(
    locales: Sequence[str] = DEFAULT_LOCALES,
) -> tuple[dict[str, list[DateFormat]], list[DroppedFormat]]:
    """The formats the dates task samples from, per group (each locale, then NUMERIC_GROUP), and those left out.

    A group can end up empty (then it is not sampled). Formats that render exactly the same strings as
    an earlier format of the same locale are left out silently: they would only skew sampling.
    """
    candidates = _candidate_formats(locales)
    dropped: list[DroppedFormat] = []
    kept: dict[str, list[DateFormat]] = {}
    for code, found in candidates.items():
        kept[code] = []
        renders_seen: set[tuple[str, ...]] = set()
        for fmt in found:
            if any(
                kind == "field" and value[0] in _TWO_DIGIT_YEAR_FIELDS and value[1] == 2
                for kind, value in _fields(fmt.pattern)
            ):
                dropped.append(DroppedFormat(fmt, "two-digit year"))
                continue
            renders = tuple(render_date(day, fmt) for day in _PROBE_DAYS)
            if renders not in renders_seen:
                renders_seen.add(renders)
                kept[code].append(fmt)

    # Numeric-only layouts: identical separators with a different day/month order collide (01/02 vs 02/01).
    orders_by_layout: dict[tuple[str, ...], Counter[tuple[str, ...]]] = {}
    for found in kept.values():
        for fmt in found:
            shape = _numeric_shape(fmt.pattern)
            if shape is not None:
                orders_by_layout.setdefault(shape[0], Counter())[shape[1]] += 1
    winning_order = {
        layout: min(orders, key=lambda order: (-orders[order], order)) for layout, orders in orders_by_layout.items()
    }
    for code, found in kept.items():
        survivors = []
        for fmt in found:
            shape = _numeric_shape(fmt.pattern)
            if shape is not None and shape[1] != winning_order[shape[0]]:
                dropped.append(DroppedFormat(fmt, "numeric day/month order conflicts with a more common format"))
            else:
                survivors.append(fmt)
        kept[code] = survivors
    return kept, dropped


def make_dates(
    seed: int = 13,
    n_train: int = 40_000,
    n_valid: int = 2_000,
    n_test: int = 2_000,
    *,
    locales: Sequence[str] = DEFAULT_LOCALES,
    first_year: int = 1900,
    last_year: int = 2099,
    max_source_chars: int = 60,
) -> Splits:
    """Generate the dates task: `n_train + n_valid + n_test` pairs with distinct source strings.

    A draw picks one of the kept formats of every locale (and of the numeric group) uniformly, so every
    locale x format combination the task claims is trained on equally, then a day uniformly in
    [first_year-01-01, last_year-12-31], so every year of the range (whose digits the model must copy)
    is as likely as any other. Sources longer than `max_source_chars` characters are skipped. Same arguments
    -> byte-identical splits; only `random.Random(seed)` is used.
    Raises ValueError for bad arguments or when the formats cannot yield that many distinct sources.
    """
    for name, count in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
        if count < 0:
            raise ValueError(f"{name} must be >= 0, got {count}")
    total = n_train + n_valid + n_test
    if total == 0:
        raise ValueError("n_train + n_valid + n_test must be > 0")
    if not 1000 <= first_year <= last_year <= 9999:
        raise ValueError(f"need 1000 <= first_year <= last_year <= 9999, got {first_year}..{last_year}")
    if not locales:
        raise ValueError("locales must not be empty")
    if len(set(locales)) != len(locales) or NUMERIC_GROUP in locales:
        raise ValueError(f"locales must be distinct CLDR locale ids, got {list(locales)}")

    formats, dropped = select_date_formats(locales)
    groups = [code for code in (*locales, NUMERIC_GROUP) if formats[code]]
    every_format = [fmt for code in groups for fmt in formats[code]]

    rng = random.Random(seed)
    first_day = datetime.date(first_year, 1, 1).toordinal()
    day_span = datetime.date(last_year, 12, 31).toordinal() - first_day + 1

    target_of: dict[str, str] = {}
    format_of: dict[str, DateFormat] = {}
    ambiguous: set[str] = set()
    too_long = 0
    max_draws = 20 * total + 10_000
    draws = 0
    while len(target_of) - len(ambiguous) < total:
        draws += 1
        if draws > max_draws:
            raise ValueError(
                f"only {len(target_of) - len(ambiguous)} distinct unambiguous sources after {max_draws} draws; "
                f"asked for {total}: widen the year range or add locales"
            )
        fmt = every_format[rng.randrange(len(every_format))]
        day = datetime.date.fromordinal(first_day + rng.randrange(day_span))
        source = render_date(day, fmt)
        if len(source) > max_source_chars:
            too_long += 1
            continue
        target = day.isoformat()
        if target_of.setdefault(source, target) == target:
            format_of.setdefault(source, fmt)
        else:
            ambiguous.add(source)

    pairs = [Pair(source, target) for source, target in target_of.items() if source not in ambiguous]
    rng.shuffle(pairs)
    train, valid, test = take_splits(pairs, n_train, n_valid, n_test)

    per_locale = Counter(format_of[pair.source].locale for pair in pairs)
    per_format = Counter(format_of[pair.source].name for pair in pairs)
    description: dict[str, Any] = {
        "kind": "dates",
        "description": "Human-readable dates in many locales (CLDR via Babel) to ISO 8601 (YYYY-MM-DD).",
        "source_languages": list(locales),
        "target_language": "ISO 8601",
        "seed": seed,
        "counts": {"train": len(train), "valid": len(valid), "test": len(test)},
        "years": [first_year, last_year],
        "max_source_chars": max_source_chars,
        "formats": {code: [fmt.name for fmt in formats[code]] for code in groups},
        "dropped_formats": [
            {
                "locale": item.format.locale,
                "name": item.format.name,
                "pattern": item.format.pattern,
                "reason": item.reason,
            }
            for item in dropped
        ],
        "pairs_per_locale": sorted_counts(per_locale),
        "pairs_per_format": sorted_counts(per_format),
        "draws": draws,
        "skipped_too_long": too_long,
        "dropped_ambiguous_sources": len(ambiguous),
        "digits": "latin",
        "babel_version": _babel_version(),
        "cldr_version": _cldr_version(),
    }
    return Splits(train=train, valid=valid, test=test, description=description)


def draw_dates(
    seed: int,
    per_format: int,
    *,
    locales: Sequence[str] = DEFAULT_LOCALES,
    first_year: int = 1900,
    last_year: int = 2099,
    max_source_chars: int = 60,
    exclude: Collection[str] = (),
) -> list[tuple[DateFormat, Pair]]:
    """`per_format` fresh dates in every format of every locale the task claims, each with its format.

    For checking a trained model as its users meet it: the days are drawn uniformly from the year range
    with `random.Random(seed)` (use a seed no training run used), and sources in `exclude` (the training
    splits) or longer than `max_source_chars` are drawn again, so every pair is new to the model.
    """
    formats, _ = select_date_formats(locales)
    rng = random.Random(seed)
    first_day = datetime.date(first_year, 1, 1).toordinal()
    day_span = datetime.date(last_year, 12, 31).toordinal() - first_day + 1
    excluded = set(exclude)
    drawn: list[tuple[DateFormat, Pair]] = []
    for code in (*locales, NUMERIC_GROUP):
        for fmt in formats[code]:
            taken, tries = 0, 0
            while taken < per_format:
                tries += 1
                if tries > 100 * per_format:
                    raise ValueError(f"could not draw {per_format} new dates in {fmt.locale} {fmt.name!r}")
                day = datetime.date.fromordinal(first_day + rng.randrange(day_span))
                source = render_date(day, fmt)
                if len(source) > max_source_chars or source in excluded:
                    continue
                excluded.add(source)
                drawn.append((fmt, Pair(source, day.isoformat())))
                taken += 1
    return drawn


@functools.cache
def _locale(code: str) -> Any:
    """Babel Locale for a CLDR id (NUMERIC_GROUP renders digits and separators only: any locale does)."""
    from babel import Locale  # training-only dependency, imported on first use

    return Locale.parse("en" if code == NUMERIC_GROUP else code)


@functools.cache
def _compile(pattern: str) -> Any:
    """Babel's parsed form of a CLDR pattern (parsed once, applied many times)."""
    from babel.dates import parse_pattern

    return parse_pattern(pattern)


def _fields(pattern: str) -> list[tuple[str, Any]]:
    from babel.dates import tokenize_pattern

    return tokenize_pattern(pattern)


def _candidate_formats(locales: Sequence[str]) -> dict[str, list[DateFormat]]:
    candidates: dict[str, list[DateFormat]] = {}
    for code in locales:
        date_formats = _locale(code).date_formats
        found = [DateFormat(code, name, date_formats[name].pattern) for name in STANDARD_FORMATS]
        if _writes_day_month_year(date_formats["long"].pattern):
            found.extend(DateFormat(code, pattern, pattern) for pattern in DAY_FIRST_WORD_PATTERNS)
        candidates[code] = found
    candidates[NUMERIC_GROUP] = [DateFormat(NUMERIC_GROUP, pattern, pattern) for pattern in NUMERIC_PATTERNS]
    return candidates


def _numeric_shape(pattern: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """For an all-numeric pattern: (layout, order of its day and month fields); None for other patterns.

    The layout keeps the separators and marks the year as 'Y' (always four digits here) and day and
    month as '#' (one or two digits): two patterns can render the same string only if their layouts
    are equal, and then they disagree about the date exactly when the day/month order differs.
    """
    layout: list[str] = []
    order: list[str] = []
    for kind, value in _fields(pattern):
        if kind == "chars":
            text = _SPACES.sub(" ", _BIDI_CONTROLS.sub("", value))
            if layout and layout[-1] not in ("#", "Y"):
                layout[-1] += text
            else:
                layout.append(text)
            continue
        letter, width = value
        if letter not in _NUMERIC_FIELDS or (letter == "M" and width > 2):
            return None
        if letter == "y":
            layout.append("Y")
        else:
            layout.append("#")
            order.append(letter)
    return tuple(layout), tuple(order)


def _writes_day_month_year(pattern: str) -> bool:
    letters = [value[0] for kind, value in _fields(pattern) if kind == "field" and value[0] in "dMy"]
    return letters == ["d", "M", "y"]


def _babel_version() -> str:
    import babel

    return str(babel.__version__)


def _cldr_version() -> str:
    from babel.core import get_cldr_version

    return str(get_cldr_version())
