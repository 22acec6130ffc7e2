"""Human-readable dates in many locales -> ISO 8601 (`samedi 21 novembre 2026` -> `2026-11-21`).

Sources are rendered from CLDR data with Babel: each locale's standard 'full', 'long', 'medium' and
'short' date formats, a few custom word patterns for locales that write the day before the month, and
a group of locale-independent numeric patterns. Babel writes Latin digits in every locale (including
ar and hi), so the digits of a source always match the digits of its target.

Rules that keep the task well-posed:

- Patterns with a two-digit year are never used: '26' could be 1926 or 2026 in the year range.
- Numeric-only patterns that share separators but differ in field order (d/M/y against M/d/y) are
  ambiguous for days <= 12; only the most common order of each separator layout is kept.
- Whatever slipped through is caught per string: a source whose normalised form (`DATES_NORMALIZATION`,
  what the model sees) was drawn with two different targets is dropped, so every source maps to exactly
  one target.

Sources are drawn as software and people write them (`write_date`): Babel's output exactly as it comes
(CLDR's narrow no-break spaces U+202F, no-break spaces, right-to-left marks U+200F), with, for most draws, a
few of the changes people make (export/data/written.py: spaces added or left out, other spaces, full-width
or native digits, capitals, invisible characters). The model's normalisation (NFKC, ignorables dropped,
case folded, digits to ASCII, dashes folded, whitespace dropped) removes most of them; the rest (Turkish
dotted capitals, Greek capitals without accents) are learnt, from a quarter of the Greek and Turkish
training draws written in capitals (FOLDING_KEEPS_CAPITALS). `render_date` gives the plain form: no bidi
marks, plain single spaces, NFC, as the acceptance's plain set writes dates.
"""

from __future__ import annotations

import datetime
import functools
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from export.data.splits import Pair, Splits, sorted_counts, take_splits
from export.data.written import (
    COMMON_WRITERS,
    Writer,
    Written,
    case_writer,
    digits_in,
    other_dashes,
    upper,
    write,
)
from service.runtime.normalization import LEGACY, Normalization

#: The dates model's source normalisation: what its tokenizer declares and applies to every input.
DATES_NORMALIZATION = Normalization(
    unicode="NFKC", ignorables="drop", case="fold", digits="ascii", dashes="fold", whitespace="drop"
)
#: Its target normalisation: ISO dates are ASCII, NFC leaves them as they are.
DATES_TARGET_NORMALIZATION = LEGACY

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

#: Locales grouped by script, the groups the acceptance reports on (a locale not listed is its own group).
LOCALE_GROUPS: dict[str, tuple[str, ...]] = {
    "Latin": ("en", "en_GB", "fr", "de", "es", "it", "pt", "nl", "pl", "cs", "tr", "sv", "fi", "hu", "ro", "vi", "id"),
    "Cyrillic": ("ru", "uk"),
    "Greek": ("el",),
    "CJK": ("ja", "zh", "ko"),
    "Arabic": ("ar",),
    "Hebrew": ("he",),
    "Devanagari": ("hi",),
    "Thai": ("th",),
    "numeric": (NUMERIC_GROUP,),
}

#: Native digits people and software write dates with, by language (the zero of each digit set).
NATIVE_DIGITS: dict[str, tuple[str, ...]] = {
    "ar": ("\u0660", "\u06f0"),  # Arabic-Indic (ICU's default for ar), extended Arabic-Indic (Persian keyboards)
    "hi": ("\u0966",),  # Devanagari
    "th": ("\u0e50",),  # Thai
}

#: Share of training draws left exactly as Babel wrote them; the others get one to three changes.
AS_FORMATTED_SHARE = 1 / 6

#: Locales whose capitals case folding does not undo (Greek capitals drop their accents; Turkish capitals
#: dot the i), and the share of their training draws written in capitals, so the model learns those forms.
FOLDING_KEEPS_CAPITALS: tuple[str, ...] = ("el", "tr")
CAPITALS_SHARE = 0.25

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
class DrawnDate:
    """A fresh date for checking a model: its format, its source as written, and its ISO target."""

    format: DateFormat
    written: Written
    target: str

    @property
    def pair(self) -> Pair:
        return Pair(self.written.text, self.target)


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
    """`day` written in `fmt`, in the plain form (see clean_date_text)."""
    return clean_date_text(render_date_raw(day, fmt))


def render_date_raw(day: datetime.date, fmt: DateFormat) -> str:
    """`day` written in `fmt` exactly as Babel (CLDR) writes it, U+202F, U+00A0 and U+200F included."""
    return str(_compile(fmt.pattern).apply(day, _locale(fmt.locale)))


def locale_group(code: str) -> str:
    """The LOCALE_GROUPS group of a locale (or NUMERIC_GROUP); the code itself for a locale not listed."""
    for group, codes in LOCALE_GROUPS.items():
        if code in codes:
            return group
    return code


def date_writers(code: str) -> dict[str, Writer]:
    """The changes people make to a date written in locale `code` (NUMERIC_GROUP: no letters, Latin digits)."""
    language = code.split("_")[0]
    writers: dict[str, Writer] = {}
    if code != NUMERIC_GROUP and locale_group(code) in ("Latin", "Cyrillic", "Greek"):
        writers["case"] = case_writer(language)
    zeros = NATIVE_DIGITS.get(language, ())
    if zeros:

        def native(text: str, rng: random.Random) -> str:
            return str(digits_in(rng.choice(zeros))(text, rng))

        writers["native digits"] = native
    writers["other dashes"] = other_dashes
    writers.update(COMMON_WRITERS)
    return writers


def write_date(day: datetime.date, fmt: DateFormat, rng: random.Random, *, changed: bool | None = None) -> Written:
    """`day` in `fmt` as software and people write it: Babel's raw output, and unless `changed` is False one to
    three of `date_writers` (`changed` None: left as formatted with probability AS_FORMATTED_SHARE)."""
    raw = render_date_raw(day, fmt)
    if changed is None:
        changed = rng.random() >= AS_FORMATTED_SHARE
    if not changed:
        return Written(raw, ())
    return write(raw, date_writers(fmt.locale), rng, counts=(1, 1, 2, 2, 3))


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
    written: bool = True,
) -> Splits:
    """Generate the dates task: `n_train + n_valid + n_test` pairs whose sources are distinct once normalised.

    A draw picks one of the kept formats of every locale (and of the numeric group) uniformly, so every
    locale x format combination the task claims is trained on equally, then a day uniformly in
    [first_year-01-01, last_year-12-31], so every year of the range (whose digits the model must copy)
    is as likely as any other, then (`written`) the way it is written (`write_date`); `written=False` gives
    plain sources (`render_date`). Draws whose plain form is longer than `max_source_chars` characters are
    skipped. Two sources that normalise alike (DATES_NORMALIZATION) count as one. Same arguments ->
    byte-identical splits; only `random.Random(seed)` is used.
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

    # Keyed by the normalised source, which is what the model sees: the first source drawn for it is kept.
    target_of: dict[str, str] = {}
    source_of: dict[str, str] = {}
    format_of: dict[str, DateFormat] = {}
    kinds_of: dict[str, tuple[str, ...]] = {}
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
        plain = render_date(day, fmt)
        if len(plain) > max_source_chars:
            too_long += 1
            continue
        drawn = write_date(day, fmt, rng) if written else Written(plain, ())
        if written and fmt.locale in FOLDING_KEEPS_CAPITALS and rng.random() < CAPITALS_SHARE:
            drawn = Written(upper(drawn.text, fmt.locale), (*drawn.kinds, "upper case"))
        key = DATES_NORMALIZATION(drawn.text)
        target = day.isoformat()
        if target_of.setdefault(key, target) == target:
            if key not in source_of:
                source_of[key], format_of[key], kinds_of[key] = drawn.text, fmt, drawn.kinds
        else:
            ambiguous.add(key)

    keys = [key for key in target_of if key not in ambiguous]
    rng.shuffle(keys)
    pairs = [Pair(source_of[key], target_of[key]) for key in keys]
    train, valid, test = take_splits(pairs, n_train, n_valid, n_test)

    per_locale = Counter(format_of[key].locale for key in keys)
    per_format = Counter(format_of[key].name for key in keys)
    per_change = Counter(kind for key in keys for kind in kinds_of[key])
    as_formatted = sum(1 for key in keys if not kinds_of[key])
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
        "written": (
            {
                "description": "Babel's output as it comes (U+202F, U+00A0, U+200F), most with one to three "
                "changes people make (export/data/written.py)",
                "as_formatted": as_formatted,
                "changes": sorted_counts(per_change),
            }
            if written
            else "plain (no bidi marks, single spaces, NFC)"
        ),
        "normalization": DATES_NORMALIZATION.to_document(),
        "draws": draws,
        "skipped_too_long": too_long,
        "dropped_ambiguous_sources": len(ambiguous),
        "digits": "latin",
        "babel_version": _babel_version(),
        "cldr_version": _cldr_version(),
    }
    return Splits(
        train=train,
        valid=valid,
        test=test,
        description=description,
        source_normalization=DATES_NORMALIZATION,
        target_normalization=DATES_TARGET_NORMALIZATION,
    )


def draw_dates(
    seed: int,
    per_format: int | Mapping[str, int],
    *,
    locales: Sequence[str] = DEFAULT_LOCALES,
    first_year: int = 1900,
    last_year: int = 2099,
    max_source_chars: int = 60,
    exclude: Collection[str] = (),
    written: bool = False,
) -> list[DrawnDate]:
    """`per_format` fresh dates (a number, or one per locale code) in every format of every locale the task
    claims, each with its format and target.

    For checking a trained model as its users meet it: the days are drawn uniformly from the year range
    with `random.Random(seed)` (use a seed no training run used); a day whose source normalises like one in
    `exclude` (the training splits) or whose plain form is longer than `max_source_chars` is drawn again, so
    every pair is new to the model. Sources are plain (`render_date`), or with `written` as software and
    people write them (`write_date`: Babel's raw output, most with changes people make), drawn with a second
    generator so that the same seed gives the same days either way.
    """
    formats, _ = select_date_formats(locales)
    rng = random.Random(seed)
    writing = random.Random(f"{seed}/written")
    first_day = datetime.date(first_year, 1, 1).toordinal()
    day_span = datetime.date(last_year, 12, 31).toordinal() - first_day + 1
    excluded = {DATES_NORMALIZATION(source) for source in exclude}
    drawn: list[DrawnDate] = []
    for code in (*locales, NUMERIC_GROUP):
        wanted = per_format if isinstance(per_format, int) else per_format.get(code, 0)
        for fmt in formats[code]:
            taken, tries = 0, 0
            while taken < wanted:
                tries += 1
                if tries > 100 * wanted:
                    raise ValueError(f"could not draw {wanted} new dates in {fmt.locale} {fmt.name!r}")
                day = datetime.date.fromordinal(first_day + rng.randrange(day_span))
                plain = render_date(day, fmt)
                key = DATES_NORMALIZATION(plain)
                if len(plain) > max_source_chars or key in excluded:
                    continue
                excluded.add(key)
                source = write_date(day, fmt, writing, changed=None) if written else Written(plain, ())
                drawn.append(DrawnDate(fmt, source, day.isoformat()))
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
