"""Data tasks: generated dates and numbers, and user TSV corpora."""

from __future__ import annotations

import datetime
import json
import re
import unicodedata
from pathlib import Path

import pytest

from export.data import (
    CorpusError,
    Pair,
    Splits,
    ambiguous_sources,
    describe,
    load_tsv,
    make_dates,
    make_numbers,
    shared_sources,
    write_splits,
    write_tsv,
)
from export.data.dates import (
    DATES_NORMALIZATION,
    FOLDING_KEEPS_CAPITALS,
    NUMERIC_GROUP,
    draw_dates,
    render_date,
    select_date_formats,
)
from export.data.numbers import NUMBERS_NORMALIZATION, german_parts, number_spellings
from export.data.written import upper

pytestmark = pytest.mark.slow  # trains models or starts servers

ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
SMALL_DATES = {"n_train": 3000, "n_valid": 300, "n_test": 300}


@pytest.fixture(scope="module")
def dates() -> Splits:
    """The dates task at its default size (about a second to build)."""
    return make_dates()


@pytest.fixture(scope="module")
def small_numbers() -> Splits:
    return make_numbers(max_number=999)


# ---------------------------------------------------------------- dates


def test_dates_default_sizes_and_disjoint_unambiguous_splits(dates: Splits) -> None:
    assert dates.counts() == {"train": 40_000, "valid": 2_000, "test": 2_000}
    assert dates.description["counts"] == dates.counts()
    assert shared_sources(dates) == set()
    assert ambiguous_sources(dates.all_pairs()) == set()
    assert len({pair.source for pair in dates.all_pairs()}) == 44_000
    # Distinct as the model sees them, too: no two sources normalise alike.
    assert len({DATES_NORMALIZATION(pair.source) for pair in dates.all_pairs()}) == 44_000


def test_dates_targets_are_iso_dates_in_range(dates: Splits) -> None:
    for pair in dates.all_pairs():
        assert ISO_DATE.fullmatch(pair.target), pair
        assert 1900 <= datetime.date.fromisoformat(pair.target).year <= 2099
        assert 0 < len(DATES_NORMALIZATION(pair.source)) <= 60


def test_dates_sources_are_renderings_of_their_targets(dates: Splits) -> None:
    formats, _ = select_date_formats(dates.description["source_languages"])
    every_format = [fmt for group in formats.values() for fmt in group]
    for pair in dates.test[:300]:
        day = datetime.date.fromisoformat(pair.target)
        renderings = {render_date(day, fmt) for fmt in every_format}
        # Greek and Turkish capitals are forms of their own once case-folded (see FOLDING_KEEPS_CAPITALS).
        renderings |= {upper(render_date(day, fmt), fmt.locale) for fmt in every_format}
        assert DATES_NORMALIZATION(pair.source) in {DATES_NORMALIZATION(text) for text in renderings}, pair


def test_dates_cover_many_locales_and_scripts(dates: Splits) -> None:
    per_locale = dates.description["pairs_per_locale"]
    locales = [code for code in per_locale if code != NUMERIC_GROUP]
    assert len(locales) >= 20
    assert all(per_locale[code] > 500 for code in locales)
    scripts = set()
    for pair in dates.all_pairs():
        for char in pair.source:
            if char.isalpha():
                scripts.add(unicodedata.name(char, "?").split()[0])
    assert {"LATIN", "CYRILLIC", "GREEK", "CJK", "HANGUL", "ARABIC", "DEVANAGARI", "HEBREW", "THAI"} <= scripts


def test_dates_sources_are_written_as_software_and_people_write_them(dates: Splits) -> None:
    text = "".join(pair.source for pair in dates.all_pairs())
    # Babel's own characters (CLDR's narrow no-break space, the right-to-left mark), full-width and native
    # digits, invisible characters, capitals, spaces added and left out.
    assert {"\u202f", "\u00a0", "\u200f", "\uff12", "\u0662", "\u0968", "\ufeff", "\u200b"} <= set(text)
    written = dates.description["written"]
    assert written["as_formatted"] > 2_000
    assert {"upper case", "capitalised", "missing spaces", "extra spaces", "full-width", "native digits"} <= set(
        written["changes"]
    )
    assert dates.description["normalization"] == DATES_NORMALIZATION.to_document()
    assert dates.source_normalization == DATES_NORMALIZATION
    assert all(not any(char in pair.source for char in "\t\r\n") for pair in dates.all_pairs())  # TSV-safe


def test_plain_dates_sources_are_clean_text() -> None:
    plain = make_dates(written=False, **SMALL_DATES)
    for pair in plain.all_pairs():
        assert pair.source == unicodedata.normalize("NFC", pair.source)
        assert "\u200f" not in pair.source and "\u200e" not in pair.source
        assert "  " not in pair.source and pair.source == pair.source.strip()
        assert all(char == " " or not char.isspace() for char in pair.source)


def test_fresh_dates_written_and_plain_share_their_days_and_targets() -> None:
    plain = draw_dates(3, 2, written=False)
    written = draw_dates(3, 2, written=True)
    assert [date.target for date in plain] == [date.target for date in written]
    assert [date.format for date in plain] == [date.format for date in written]
    for before, after in zip(plain, written, strict=True):
        if before.format.locale not in FOLDING_KEEPS_CAPITALS:
            assert DATES_NORMALIZATION(after.written.text) == DATES_NORMALIZATION(before.written.text), after


def test_dates_french_full_example_is_producible() -> None:
    formats, _ = select_date_formats(["fr"])
    full = next(fmt for fmt in formats["fr"] if fmt.name == "full")
    assert render_date(datetime.date(2026, 11, 21), full) == "samedi 21 novembre 2026"


def test_dates_never_use_two_digit_years() -> None:
    formats, dropped = select_date_formats()
    patterns = [fmt.pattern for group in formats.values() for fmt in group]
    assert not any(re.search(r"(?<!y)yy(?!y)", pattern.replace("'", "")) for pattern in patterns)
    assert any(item.reason == "two-digit year" for item in dropped)


def test_dates_numeric_formats_agree_on_day_month_order() -> None:
    # Every numeric rendering of a day with day <= 12 must decode to one date: check the whole format set.
    formats, _ = select_date_formats()
    every_format = [fmt for group in formats.values() for fmt in group]
    seen: dict[str, datetime.date] = {}
    for day in (
        datetime.date(2001, 2, 3),
        datetime.date(2001, 3, 2),
        datetime.date(2010, 11, 12),
        datetime.date(2010, 12, 11),
    ):
        for fmt in every_format:
            text = render_date(day, fmt)
            assert seen.setdefault(text, day) == day, (text, fmt)
            # ... and once normalised as the model sees them (no spaces: '21. 11. 2026' is '21.11.2026').
            assert seen.setdefault(DATES_NORMALIZATION(text), day) == day, (text, fmt)


def test_dates_same_seed_identical_different_seed_different() -> None:
    first = make_dates(seed=5, **SMALL_DATES)
    again = make_dates(seed=5, **SMALL_DATES)
    other = make_dates(seed=6, **SMALL_DATES)
    assert first == again
    assert json.dumps(describe(first), ensure_ascii=False) == json.dumps(describe(again), ensure_ascii=False)
    assert first.train != other.train
    assert first.counts() == {"train": 3000, "valid": 300, "test": 300}


def test_dates_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_valid"):
        make_dates(n_valid=-1)
    with pytest.raises(ValueError, match="first_year"):
        make_dates(first_year=2100, last_year=2000)
    with pytest.raises(ValueError, match="distinct"):
        # One locale and one year cannot give this many distinct strings.
        make_dates(n_train=5000, n_valid=0, n_test=0, locales=["fr"], first_year=2000, last_year=2000)


# ---------------------------------------------------------------- numbers


def test_numbers_examples(small_numbers: Splits) -> None:
    normalised = {(NUMBERS_NORMALIZATION(pair.source), pair.target) for pair in small_numbers.all_pairs()}
    assert ("vierundachtzig", "eighty-four") in normalised
    assert ("quatrevingtdixsept", "ninety-seven") in normalised
    assert ("einhundertfünf", "one hundred and five") in normalised
    assert ("hundertfünf", "one hundred and five") in normalised  # German's other spelling


def test_numbers_spellings_and_german_parts() -> None:
    assert number_spellings(97, "fr") == {"standard": "quatre-vingt-dix-sept", "1990": "quatre-vingt-dix-sept"}
    assert number_spellings(221, "fr") == {"standard": "deux cent vingt et un", "1990": "deux-cent-vingt-et-un"}
    assert number_spellings(84, "de") == {"standard": "vierundachtzig"}
    assert german_parts("siebzehn") == ["siebzehn"]
    assert german_parts("einhundertachtundachtzig") == ["ein", "hundert", "acht", "und", "achtzig"]
    with pytest.raises(ValueError, match="not a German number word"):
        german_parts("vierundachtzigx")


def test_numbers_sources_are_written_as_people_write_them(small_numbers: Splits) -> None:
    changes = small_numbers.description["written"]["changes"]
    assert {"upper case", "capitalised", "spaced words", "hyphenated words", "invisible characters"} <= set(changes)
    assert small_numbers.description["spellings"].keys() == {"standard", "1990", "hundert"}
    assert any(pair.source.isupper() for pair in small_numbers.all_pairs())
    assert small_numbers.source_normalization == NUMBERS_NORMALIZATION
    plain = make_numbers(max_number=999, written=False)
    assert Pair("vierundachtzig", "eighty-four") in set(plain.all_pairs())


def _spellings(numbers: list[int]) -> int:
    """Pairs of `numbers` in both languages: the two French spellings normalise alike; German has two for 100-199."""
    return sum(3 if 100 <= number <= 199 else 2 for number in numbers)


def test_numbers_split_by_number(small_numbers: Splits) -> None:
    # Targets name numbers: a number's German and French forms share a split, so each target appears
    # exactly twice (three times for 100-199: German's 'hundert' spelling) in its split and in no other split.
    targets = {name: [pair.target for pair in getattr(small_numbers, name)] for name in ("train", "valid", "test")}
    for name, values in targets.items():
        assert all(
            values.count(value) == (3 if " hundred" in value and value.startswith("one ") else 2)
            for value in set(values)
        ), name
    assert not set(targets["train"]) & set(targets["test"])
    assert not set(targets["train"]) & set(targets["valid"])
    assert not set(targets["valid"]) & set(targets["test"])
    assert shared_sources(small_numbers) == set()
    assert ambiguous_sources(small_numbers.all_pairs()) == set()
    per_split = small_numbers.description["numbers_per_split"]
    assert per_split == {"valid": 50, "test": 50, "train": 900}
    assert sum(small_numbers.counts().values()) == _spellings(list(range(1000)))


def test_numbers_default_sizes() -> None:
    splits = make_numbers()
    assert splits.description["numbers_per_split"] == {"valid": 500, "test": 500, "train": 9000}
    assert sum(splits.counts().values()) == _spellings(list(range(10_000)))


def test_numbers_deterministic(small_numbers: Splits) -> None:
    assert make_numbers(max_number=999) == small_numbers
    other = make_numbers(seed=14, max_number=999)
    assert {pair.target for pair in other.test} != {pair.target for pair in small_numbers.test}


def test_numbers_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="valid_fraction"):
        make_numbers(valid_fraction=1.5)
    with pytest.raises(ValueError, match="target_language"):
        make_numbers(source_languages=["en"], target_language="en")


# ---------------------------------------------------------------- TSV corpora


def _write_bytes(tmp_path: Path, data: bytes, name: str = "corpus.tsv") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _corpus_lines(count: int) -> list[str]:
    return [f"sentence number {index}\tphrase numéro {index}" for index in range(count)]


def test_tsv_good_file_parses(tmp_path: Path) -> None:
    lines = [
        "\ufeffHello.\tBonjour.",  # byte-order mark before the first line
        "",
        "Thank you!\tMerci !\tCC-BY 2.0 (France) Attribution: tatoeba.org #1 (CM) & #2 (sacredceltic)\r",
        "   ",
        "Thank you!\tMerci !",  # an exact duplicate: kept once
        "Thank you!\tMerci beaucoup !",  # a second reference for the same source
        "  Cafe\u0301 ? \t  Cafe\u0301 ?  ",  # decomposed accent, surrounding spaces
        *_corpus_lines(200),
    ]
    path = _write_bytes(tmp_path, "\n".join(lines).encode("utf-8"))
    splits = load_tsv(path, valid_fraction=0.1, test_fraction=0.1)
    pairs = splits.all_pairs()
    assert len(pairs) == 204
    assert Pair("Hello.", "Bonjour.") in pairs
    assert Pair("Thank you!", "Merci !") in pairs
    assert Pair("Thank you!", "Merci beaucoup !") in pairs
    assert Pair("Café ?", "Café ?") in pairs
    assert splits.description["duplicate_pairs_skipped"] == 1
    assert splits.description["sources_with_several_targets"] == 1
    assert splits.description["file"] == "corpus.tsv"
    assert all(splits.counts()[name] > 0 for name in ("train", "valid", "test"))
    assert shared_sources(splits) == set()


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        (b"no tab on this line", "no tab"),
        (b"\tonly a target", "empty source"),
        (b"only a source\t   ", "empty target"),
        (b"caf\xe9\tcoffee", "not valid UTF-8"),
    ],
)
def test_tsv_malformed_line_reports_line_number(tmp_path: Path, bad_line: bytes, message: str) -> None:
    data = b"one\tun\n\ntwo\ttwo\n" + bad_line + b"\nthree\ttrois\n"
    path = _write_bytes(tmp_path, data)
    with pytest.raises(CorpusError, match=message) as caught:
        load_tsv(path)
    assert f"{path}:4:" in str(caught.value)


def test_tsv_empty_or_too_small_file(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="no source<TAB>target pairs"):
        load_tsv(_write_bytes(tmp_path, b"\n  \n", "blank.tsv"))
    with pytest.raises(CorpusError, match="too few"):
        load_tsv(_write_bytes(tmp_path, b"one\tun\ntwo\tdeux\n", "tiny.tsv"))
    with pytest.raises(CorpusError, match="cannot open"):
        load_tsv(tmp_path / "missing.tsv")


def test_tsv_split_is_stable_when_lines_are_added(tmp_path: Path) -> None:
    base = _corpus_lines(400)
    first = load_tsv(_write_bytes(tmp_path, "\n".join(base).encode(), "a.tsv"))
    again = load_tsv(_write_bytes(tmp_path, "\n".join(base).encode(), "b.tsv"))
    assert (first.train, first.valid, first.test) == (again.train, again.valid, again.test)

    grown = load_tsv(_write_bytes(tmp_path, "\n".join([*_corpus_lines(800)[400:], *base]).encode(), "c.tsv"))
    for name in ("train", "valid", "test"):
        assert set(getattr(first, name)) <= set(getattr(grown, name)), name

    reseeded = load_tsv(_write_bytes(tmp_path, "\n".join(base).encode(), "d.tsv"), seed=99)
    assert reseeded.test != first.test


def test_tsv_all_targets_of_a_source_share_a_split(tmp_path: Path) -> None:
    lines = [f"source {index % 50}\ttarget {index}" for index in range(500)]
    splits = load_tsv(_write_bytes(tmp_path, "\n".join(lines).encode()), valid_fraction=0.2, test_fraction=0.2)
    assert shared_sources(splits) == set()
    assert len(splits.all_pairs()) == 500


def test_tsv_max_pairs_reads_only_the_first_pairs(tmp_path: Path) -> None:
    lines = [*_corpus_lines(300), "this line has no tab"]
    splits = load_tsv(_write_bytes(tmp_path, "\n".join(lines).encode()), max_pairs=250)
    assert len(splits.all_pairs()) == 250
    assert {pair.source for pair in splits.all_pairs()} == {f"sentence number {index}" for index in range(250)}


def test_write_tsv_round_trip_and_refusals(tmp_path: Path) -> None:
    pairs = [Pair(f"quelle heure {index} ?", f"what time {index}?") for index in range(300)]
    path = tmp_path / "out.tsv"
    write_tsv(pairs, path)
    assert sorted(load_tsv(path).all_pairs(), key=pairs.index) == pairs
    with pytest.raises(ValueError, match="tab"):
        write_tsv([Pair("a\tb", "c")], tmp_path / "bad.tsv")
    with pytest.raises(ValueError, match="empty"):
        write_tsv([Pair("a", " ")], tmp_path / "bad.tsv")


def test_write_splits_writes_files_and_description(tmp_path: Path, small_numbers: Splits) -> None:
    write_splits(small_numbers, tmp_path / "numbers")
    description = json.loads((tmp_path / "numbers" / "description.json").read_text(encoding="utf-8"))
    assert description["counts"] == small_numbers.counts()
    assert description["kind"] == "numbers"
    assert description["source_chars"]["max"] == max(len(pair.source) for pair in small_numbers.all_pairs())
    lines = (tmp_path / "numbers" / "test.tsv").read_text(encoding="utf-8").splitlines()
    assert [Pair(*line.split("\t")) for line in lines] == small_numbers.test
