"""The phrasebook corpus generator: deterministic, distinct, parallel lines the project's TSV reader accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from export.data import load_tsv
from loadtests.corpus import LANGUAGES, TEMPLATES, Lexicon, clean, fill, phrase_pairs, target_tag, write_corpus


@pytest.fixture(scope="module")
def lexicon() -> Lexicon:
    return Lexicon()


def test_lexicon_is_large_and_shared_by_every_locale(lexicon: Lexicon) -> None:
    # The point of the corpus is a vocabulary of thousands of subwords: hundreds of names per kind.
    assert len(lexicon.territories) > 200
    assert len(lexicon.languages) > 400
    assert len(lexicon.currencies) > 200
    assert all(code.isalpha() for code in lexicon.territories)


def test_every_template_is_written_in_every_language_with_the_same_slots() -> None:
    for template in TEMPLATES:
        assert len(template) == len(LANGUAGES)
        slots = {tuple(sorted(re.findall(r"\{(\w+)\}", text))) for text in template}
        assert len(slots) == 1, template


def test_pairs_are_deterministic_distinct_and_tagged(lexicon: Lexicon) -> None:
    first = list(phrase_pairs(300, seed=5, lexicon=lexicon))
    again = list(phrase_pairs(300, seed=5, lexicon=lexicon))
    other = list(phrase_pairs(300, seed=6, lexicon=lexicon))
    assert first == again
    assert first != other
    assert len({(pair.source, pair.target) for pair in first}) == 300
    for pair in first:
        assert pair.source_language != pair.target_language
        assert pair.source.startswith(target_tag(pair.target_language) + " ")
        assert "\t" not in pair.source + pair.target and "\n" not in pair.source + pair.target
        assert pair.clauses in (0, 1, 2, 3)


def test_a_clause_renders_the_same_entities_in_both_languages(lexicon: Lexicon) -> None:
    import random

    entities = lexicon.draw(random.Random(1))
    english = fill(1, entities, "en", lexicon)  # "Local currency ({territory}): {currency}."
    french = fill(1, entities, "fr", lexicon)
    assert english.startswith("Local currency (") and french.startswith("Monnaie locale (")
    assert lexicon.render("territory", entities, "en") in english
    assert lexicon.render("territory", entities, "fr") in french


def test_clause_counts_follow_the_arguments(lexicon: Lexicon) -> None:
    short = list(phrase_pairs(50, seed=3, short_fraction=1.0, lexicon=lexicon))
    long = list(phrase_pairs(50, seed=3, min_clauses=3, max_clauses=3, short_fraction=0.0, lexicon=lexicon))
    assert {pair.clauses for pair in short} == {0}
    assert {pair.clauses for pair in long} == {3}
    assert max(len(pair.source) for pair in short) < min(len(pair.source) for pair in long)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="min_clauses"):
        next(phrase_pairs(1, min_clauses=2, max_clauses=1))
    with pytest.raises(ValueError, match="short_fraction"):
        next(phrase_pairs(1, short_fraction=1.5))


def test_clean_removes_invisible_marks_and_collapses_spaces() -> None:
    assert clean("a\u200f\u00a0 b\u202f c ") == "a b c"


def test_written_corpus_loads_as_a_tsv_task(tmp_path: Path, lexicon: Lexicon) -> None:
    path = tmp_path / "phrasebook.tsv"
    pairs = list(phrase_pairs(400, seed=9, lexicon=lexicon))
    assert write_corpus(path, pairs) == 400
    splits = load_tsv(path, seed=13)
    assert sum(splits.counts().values()) == 400
    assert {(p.source, p.target) for p in splits.all_pairs()} == {(p.source, p.target) for p in pairs}
