"""Input normalisation: each rule, their order, the spec's file form and its versioning."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.runtime.normalization import (
    IDENTITY,
    LEGACY,
    Normalization,
    NormalizationError,
    _character_table,
    _pipeline,
)
from service.runtime.tokenizers import SPECIAL_PIECES, CharTokenizer

EVERYTHING = Normalization(
    unicode="NFKC", ignorables="drop", case="fold", digits="ascii", dashes="fold", whitespace="fold"
)


def test_the_default_spec_is_nfc_alone_as_format_1_tokenizers_always_were() -> None:
    assert Normalization() == LEGACY
    assert LEGACY("Cafe\u0301\u00a0 \u200f21\u202f") == "Café\u00a0 \u200f21\u202f"
    assert IDENTITY("Cafe\u0301") == "Cafe\u0301" and IDENTITY.is_identity and not LEGACY.is_identity


@pytest.mark.parametrize(
    ("spec", "raw", "plain"),
    [
        # ignorables: bidi marks, zero-width characters, BOM, soft hyphen, word joiner, variation selectors
        ({"ignorables": "drop"}, "\ufeff21\u200f/11\u200f/2026\u200e", "21/11/2026"),
        ({"ignorables": "drop"}, "vier\u00adund\u200bacht\u2060zig\u061c\u2066\u2069\ufe0f", "vierundachtzig"),
        ({"ignorables": "keep"}, "a\u200fb", "a\u200fb"),
        # unicode: NFC composes; NFKC also maps compatibility forms (full-width, fixed-width spaces, ligatures)
        ({"unicode": "NFC"}, "Cafe\u0301", "Café"),
        ({"unicode": "NFC"}, "２０２６", "２０２６"),
        ({"unicode": "NFKC"}, "２０２６／１１", "2026/11"),
        ({"unicode": "NFKC"}, "2026\u202fг.\u00a0x\u2009y\u3000z", "2026 г. x y z"),
        ({"unicode": "NFKC"}, "ﬁn", "fin"),
        # case: Unicode case folding
        ({"case": "fold"}, "VIERUNDACHTZIG", "vierundachtzig"),
        ({"case": "fold"}, "Dreißig", "dreissig"),
        ({"case": "fold"}, "ΣΆΒΒΑΤΟ", "σάββατο"),
        # digits: every decimal digit as ASCII
        ({"digits": "ascii"}, "٢١/١١/٢٠٢٦ ۲۱ २१ ๒๑", "21/11/2026 21 21 21"),
        # dashes: fold to '-', or drop
        ({"dashes": "fold"}, "21\u201011\u201326\u221210\uff0d1", "21-11-26-10-1"),
        ({"unicode": "NFKC", "dashes": "fold"}, "21\uff0d1\u2011", "21-1-"),
        ({"dashes": "drop"}, "quatre-vingt\u2010dix", "quatrevingtdix"),
        # whitespace: fold runs (and strip), or drop all
        ({"whitespace": "fold"}, "  vingt \t et\u00a0\u202fun\n", "vingt et un"),
        ({"whitespace": "drop"}, " vier und\u3000achtzig ", "vierundachtzig"),
    ],
)
def test_each_rule_turns_the_raw_form_into_the_plain_form(spec: dict[str, str], raw: str, plain: str) -> None:
    assert Normalization(**spec)(raw) == plain  # type: ignore[arg-type]


def test_the_rules_apply_in_their_documented_order() -> None:
    # Ignorables go before NFKC composes; case folding is followed by the form again; digits after NFKC.
    assert EVERYTHING("\ufeffSAMEDI  ２１\u200f NOVEMBRE\u202f٢٠٢٦ ") == "samedi 21 novembre 2026"
    assert EVERYTHING("e\u200b\u0301") == "é"
    # Case folding then NFKC again: 'İ' folds to 'i' + U+0307, which no precomposed letter holds.
    assert EVERYTHING("İ") == "i\u0307"


@given(st.text(max_size=40))
def test_normalising_twice_changes_nothing(text: str) -> None:
    dropping = Normalization(unicode="NFKC", ignorables="drop", case="fold", dashes="drop", whitespace="drop")
    for spec in (LEGACY, EVERYTHING, dropping, Normalization(unicode="NFC", whitespace="drop")):
        once = spec(text)
        assert spec(once) == once


def test_the_spec_round_trips_through_its_document_and_the_command_line_form() -> None:
    document = EVERYTHING.to_document()
    assert document == {
        "version": 1,
        "unicode": "NFKC",
        "ignorables": "drop",
        "case": "fold",
        "digits": "ascii",
        "dashes": "fold",
        "whitespace": "fold",
    }
    assert Normalization.from_document(document) == EVERYTHING
    assert hash(Normalization.from_document(document)) == hash(EVERYTHING)
    parsed = Normalization.parse("unicode=nfkc, ignorables=drop,case=fold,digits=ascii,dashes=fold,whitespace=fold")
    assert parsed == EVERYTHING
    assert Normalization.parse("none") == IDENTITY and Normalization.parse("NFC") == LEGACY
    assert EVERYTHING.describe() == (
        "NFKC; ignorables dropped; case folded; digits to ASCII; dashes folded to -; whitespace folded"
    )


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"version": 2}, "rules version 2 is not supported"),
        ({"case": "upper"}, "case: Input should be 'keep' or 'fold'"),
        ({"unicode": "NFD"}, "unicode"),
        ({"accents": "strip"}, "accents: Extra inputs are not permitted"),
        ("NFC", "a JSON object"),
    ],
)
def test_a_spec_this_version_cannot_apply_is_refused(document: object, message: str) -> None:
    with pytest.raises(NormalizationError, match=message):
        Normalization.from_document(document)


def test_the_command_line_form_names_what_is_wrong() -> None:
    with pytest.raises(NormalizationError, match="is not rule=value"):
        Normalization.parse("NFKC")
    with pytest.raises(NormalizationError, match="whitespace"):
        Normalization.parse("whitespace=squash")


def test_a_tokenizer_builds_its_normalisation_when_made_not_in_its_first_encode() -> None:
    # The table takes a pass over every code point: about 0.1 s that the first request served would wait.
    spec = Normalization(dashes="drop")
    _pipeline.cache_clear()
    _character_table.cache_clear()
    tokenizer = CharTokenizer([*SPECIAL_PIECES, "a", "b"], spec)
    built = _character_table.cache_info()
    assert built.currsize == 1
    assert tokenizer.encode("a\u2013b") == tokenizer.encode("ab")
    assert _character_table.cache_info().misses == built.misses  # the first encode found the table made
