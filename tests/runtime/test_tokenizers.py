"""Tokenizers: fixed specials, round trips, unknowns, save/load, corrupt files."""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from service.runtime.normalization import IDENTITY, LEGACY, Normalization
from service.runtime.tokenizers import (
    BOS,
    EOS,
    FILE_FORMAT,
    PAD,
    SPECIAL_PIECES,
    UNK,
    CharTokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    split_words,
    train_tokenizer,
)

DATE_SAMPLES = [
    "samedi 21 novembre 2026",
    "Samstag, 21. November 2026",
    "суббота, 21 ноября 2026 г.",
    "Σάββατο 21 Νοεμβρίου 2026",
    "2026年11月21日土曜日",
    "2026年11月21日星期六",
    "2026년 11월 21일 토요일",
    "السبت، 21 نوفمبر 2026",
    "शनिवार, 21 नवंबर 2026",
    "יום שבת, 21 בנובמבר 2026",
    "วันเสาร์ที่ 21 พฤศจิกายน ค.ศ. 2026",
    "2026-11-21",
]
NUMBER_SAMPLES = [
    "vierundachtzig",
    "quatre-vingt-dix-sept",
    "eighty-four",
    "ninety-seven",
    "seven thousand, seven hundred and seventy-seven",
    "sept mille sept cent soixante-dix-sept",
]


def _number_corpus() -> list[str]:
    from export.data import make_numbers

    splits = make_numbers(max_number=299)
    return [text for pair in splits.all_pairs() for text in (pair.source, pair.target)]


@pytest.fixture(scope="module")
def number_corpus() -> list[str]:
    return _number_corpus()


@pytest.fixture(scope="module")
def sentencepiece_tokenizers(number_corpus: list[str]) -> dict[str, Tokenizer]:
    return {
        model_type: train_tokenizer("sentencepiece", number_corpus, vocab_size=120, model_type=model_type)
        for model_type in ("unigram", "bpe")
    }


def _all_kinds(texts: list[str], sentencepiece: dict[str, Tokenizer]) -> list[Tokenizer]:
    return [train_tokenizer("char", texts), train_tokenizer("word", texts), *sentencepiece.values()]


# ---------------------------------------------------------------- specials


def test_special_ids_are_fixed(number_corpus: list[str], sentencepiece_tokenizers: dict[str, Tokenizer]) -> None:
    assert (PAD, BOS, EOS, UNK) == (0, 1, 2, 3)
    assert SPECIAL_PIECES == ("<pad>", "<s>", "</s>", "<unk>")
    for tokenizer in _all_kinds(number_corpus, sentencepiece_tokenizers):
        assert [tokenizer.id_to_piece(token_id) for token_id in range(4)] == list(SPECIAL_PIECES), tokenizer.kind
        ids = tokenizer.encode("vierundachtzig")
        assert ids and BOS not in ids and EOS not in ids and PAD not in ids, tokenizer.kind


def test_decode_skips_pad_bos_eos_and_shows_unk(
    number_corpus: list[str], sentencepiece_tokenizers: dict[str, Tokenizer]
) -> None:
    for tokenizer in _all_kinds(number_corpus, sentencepiece_tokenizers):
        ids = tokenizer.encode("eighty")
        assert tokenizer.decode([BOS, *ids, EOS, PAD, PAD]) == "eighty", tokenizer.kind
        assert tokenizer.decode([BOS, *ids, EOS, *ids]) == tokenizer.decode(ids + ids), tokenizer.kind
        assert "<unk>" in tokenizer.decode([*ids, UNK]), tokenizer.kind
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tokenizer.decode([tokenizer.vocab_size])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tokenizer.id_to_piece(-1)


# ---------------------------------------------------------------- char


def test_char_round_trip_dates_numbers_and_cjk() -> None:
    texts = DATE_SAMPLES + NUMBER_SAMPLES
    tokenizer = train_tokenizer("char", texts)
    assert tokenizer.kind == "char"
    for text in texts:
        ids = tokenizer.encode(text)
        assert UNK not in ids
        assert len(ids) == len(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.pieces(text) == list(text)


def test_char_normalises_to_nfc_and_unknown_chars_become_unk() -> None:
    tokenizer = train_tokenizer("char", ["café", "été"])
    decomposed = unicodedata.normalize("NFD", "café")
    assert decomposed != "café"
    assert tokenizer.encode(decomposed) == tokenizer.encode("café")
    ids = tokenizer.encode("cafe☃")
    assert ids[-1] == UNK and ids[3] == UNK  # plain 'e' and the snowman were never seen
    assert tokenizer.pieces("caf☃") == ["c", "a", "f", "<unk>"]
    assert tokenizer.decode(ids) == "caf<unk><unk>"
    assert tokenizer.encode("<s>") == [UNK, UNK, UNK]  # text never encodes to a special id


def test_char_vocabulary_is_sorted_and_respects_min_count_and_cap() -> None:
    tokenizer = train_tokenizer("char", ["banana", "cab"], min_count=2)
    assert isinstance(tokenizer, CharTokenizer)
    assert tokenizer.vocabulary == [*SPECIAL_PIECES, "a", "b", "n"]  # 'c' seen once
    capped = train_tokenizer("char", ["banana", "cab"], vocab_size=6)
    # Counts a=4, b=2, n=2, c=1: keep 'a', then 'b' wins the tie with 'n' alphabetically; ids in code point order.
    assert capped.vocabulary == [*SPECIAL_PIECES, "a", "b"]
    assert capped.vocab_size == 6


# ---------------------------------------------------------------- word


def test_word_splitting_is_unicode_aware() -> None:
    assert split_words("Hi, you!") == ["Hi", ",", "you", "!"]
    assert split_words("l'été,  2026") == ["l", "'", "été", ",", "2026"]
    assert split_words("quatre-vingt-dix-sept") == ["quatre", "-", "vingt", "-", "dix", "-", "sept"]
    # Devanagari vowel signs are combining marks: they stay inside the word.
    assert split_words("शनिवार, 21 नवंबर") == ["शनिवार", ",", "21", "नवंबर"]
    assert split_words("2026年11月21日") == ["2026年11月21日"]
    assert split_words("  ") == []


def test_word_round_trip_of_normalised_text() -> None:
    texts = DATE_SAMPLES + NUMBER_SAMPLES
    tokenizer = train_tokenizer("word", texts)
    for text in texts:
        assert UNK not in tokenizer.encode(text)
        assert tokenizer.decode(tokenizer.encode(text)) == tokenizer.normalize(text)
        assert tokenizer.pieces(text) == split_words(text)
    assert tokenizer.normalize("Samstag, 21. November") == "Samstag , 21 . November"
    spaced = "seven thousand , seven hundred"
    assert tokenizer.decode(tokenizer.encode(spaced)) == spaced
    assert tokenizer.encode("eighty-five") == [tokenizer.encode("eighty")[0], tokenizer.encode("-")[0], UNK]


def test_word_vocabulary_capped_by_frequency_ties_alphabetical() -> None:
    texts = ["b a c", "a c", "c d", "e"]  # counts: c=3, a=2, b=1, d=1, e=1
    tokenizer = train_tokenizer("word", texts, vocab_size=4 + 3)
    assert tokenizer.vocabulary == [*SPECIAL_PIECES, "c", "a", "b"]
    assert tokenizer.encode("d c") == [UNK, 4]
    assert train_tokenizer("word", texts, min_count=2).vocabulary == [*SPECIAL_PIECES, "c", "a"]


# ---------------------------------------------------------------- sentencepiece


def test_sentencepiece_round_trip_and_pieces(
    sentencepiece_tokenizers: dict[str, Tokenizer], number_corpus: list[str]
) -> None:
    for model_type, tokenizer in sentencepiece_tokenizers.items():
        assert tokenizer.kind == "sentencepiece"
        assert 4 < tokenizer.vocab_size <= 120
        for text in number_corpus[:300] + ["  quatre-vingt-dix-sept   eins "]:
            ids = tokenizer.encode(text)
            assert UNK not in ids, (model_type, text)
            assert tokenizer.decode(ids) == tokenizer.normalize(text), (model_type, text)
        assert tokenizer.normalize("  quatre   vingts ") == "quatre vingts"
        pieces = tokenizer.pieces("quatre-vingt-dix-sept")
        assert pieces[0].startswith("\u2581")
        assert "".join(pieces).replace("\u2581", " ").strip() == "quatre-vingt-dix-sept"
        ids = tokenizer.encode("sept ☃")
        assert UNK in ids
        assert tokenizer.pieces("sept ☃")[ids.index(UNK)] == "<unk>"
        assert tokenizer.decode(ids).endswith("<unk>")


def test_sentencepiece_training_is_deterministic(
    number_corpus: list[str], sentencepiece_tokenizers: dict[str, Tokenizer]
) -> None:
    again = train_tokenizer("sentencepiece", number_corpus, vocab_size=120, model_type="unigram")
    assert again.to_document() == sentencepiece_tokenizers["unigram"].to_document()


def test_sentencepiece_small_corpus_gives_fewer_pieces_instead_of_failing() -> None:
    tokenizer = train_tokenizer("sentencepiece", ["eins zwei drei", "vier fünf"], vocab_size=5000)
    assert tokenizer.vocab_size < 5000
    assert tokenizer.decode(tokenizer.encode("zwei drei")) == "zwei drei"


# ---------------------------------------------------------------- save / load


def test_save_load_gives_same_ids(
    tmp_path: Path, number_corpus: list[str], sentencepiece_tokenizers: dict[str, Tokenizer]
) -> None:
    probes = [*number_corpus[:50], *DATE_SAMPLES, "unseen ☃ text"]
    texts = number_corpus + DATE_SAMPLES
    tokenizers = [train_tokenizer("char", texts), train_tokenizer("word", texts), *sentencepiece_tokenizers.values()]
    for index, tokenizer in enumerate(tokenizers):
        path = tmp_path / f"{index}.tokenizer.json"
        tokenizer.save(path)
        document = json.loads(path.read_text(encoding="utf-8"))
        assert document["kind"] == tokenizer.kind and document["format"] == FILE_FORMAT == 2
        assert document["normalization"] == tokenizer.normalization.to_document()
        loaded = load_tokenizer(tokenizer.kind, path)
        assert type(loaded) is type(tokenizer)
        assert loaded.vocab_size == tokenizer.vocab_size
        assert loaded.to_document() == tokenizer.to_document()
        for text in probes:
            assert loaded.encode(text) == tokenizer.encode(text)
            assert loaded.pieces(text) == tokenizer.pieces(text)
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{index}.tokenizer.json" for index in range(4)]


def test_corrupt_or_mismatched_files_raise_tokenizer_error(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    train_tokenizer("char", ["abc"]).save(good)
    document = json.loads(good.read_text(encoding="utf-8"))

    def write(name: str, content: str | bytes) -> Path:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    cases = {
        "not a JSON": (write("truncated.json", good.read_text(encoding="utf-8")[:20]), "char"),
        "JSON object": (write("list.json", "[1, 2]"), "char"),
        "expected a 'word'": (good, "word"),
        "format": (write("format.json", json.dumps({**document, "format": 99})), "char"),
        "rules version 7": (
            write("rules.json", json.dumps({**document, "normalization": {"version": 7, "unicode": "NFC"}})),
            "char",
        ),
        "Input should be 'keep' or 'fold'": (
            write("case.json", json.dumps({**document, "normalization": {"case": "upper"}})),
            "char",
        ),
        "a JSON object": (write("no-spec.json", json.dumps({**document, "normalization": None})), "char"),
        "must start with": (write("specials.json", json.dumps({**document, "pieces": ["a", "b"]})), "char"),
        "repeats": (write("repeats.json", json.dumps({**document, "pieces": [*SPECIAL_PIECES, "a", "a"]})), "char"),
        "base64": (
            write(
                "b64.json",
                json.dumps({"kind": "sentencepiece", "format": 1, "model_type": "unigram", "model": "%%%not base64"}),
            ),
            "sentencepiece",
        ),
        "not a SentencePiece model": (
            write(
                "proto.json",
                json.dumps(
                    {"kind": "sentencepiece", "format": 1, "model_type": "unigram", "model": "aGVsbG8gd29ybGQ="}
                ),
            ),
            "sentencepiece",
        ),
        "cannot read": (tmp_path / "missing.json", "char"),
        "unknown tokenizer kind": (good, "bytes"),
    }
    for message, (path, kind) in cases.items():
        with pytest.raises(TokenizerError, match=message):
            load_tokenizer(kind, path)
    with pytest.raises(TokenizerError, match="truncated.json"):
        load_tokenizer("char", tmp_path / "truncated.json")


def test_train_tokenizer_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        train_tokenizer("bytes", ["abc"])
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer("char", ["abc"], vocab_size=4)
    with pytest.raises(ValueError, match="min_count"):
        train_tokenizer("word", ["abc"], min_count=0)
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer("sentencepiece", ["abc"], model_type="word")


def test_importing_tokenizers_loads_neither_sentencepiece_nor_torch() -> None:
    code = (
        "import sys, service.runtime.tokenizers as t; "
        "t.train_tokenizer('char', ['abc']); "
        "assert 'sentencepiece' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("seed", range(3))
def test_incremental_decoding_builds_exactly_the_text_of_the_whole_sequence(
    seed: int, number_corpus: list[str], sentencepiece_tokenizers: dict[str, Tokenizer]
) -> None:
    import random

    rng = random.Random(seed)
    for tokenizer in _all_kinds(number_corpus, sentencepiece_tokenizers):
        for text in rng.sample(number_corpus, 20):
            ids = tokenizer.encode(text) + [rng.randrange(4, tokenizer.vocab_size) for _ in range(3)] + [UNK, EOS]
            decoder = tokenizer.incremental_decoder()
            deltas = [decoder.push(token_id) for token_id in ids]
            assert "".join(deltas) == decoder.text == tokenizer.decode(ids), (tokenizer.kind, ids)


# ---------------------------------------------------------------- normalisation


def test_encode_applies_the_declared_normalisation_for_every_kind(number_corpus: list[str]) -> None:
    spec = Normalization(unicode="NFKC", ignorables="drop", case="fold", dashes="drop", whitespace="drop")
    tokenizers = [
        train_tokenizer("char", number_corpus, normalization=spec),
        train_tokenizer("word", number_corpus, normalization=spec),
        train_tokenizer("sentencepiece", number_corpus, vocab_size=120, normalization=spec),
    ]
    for tokenizer in tokenizers:
        assert tokenizer.normalization == spec
        plain = tokenizer.encode("quatre-vingt-dix-sept")
        assert UNK not in plain, tokenizer.kind
        for raw in ("QUATRE VINGT DIX SEPT", "\ufeffQuatre\u00a0vingt\u2011dix\u200b-sept ", "quatre-vingt-dix-sept"):
            assert tokenizer.encode(raw) == plain, (tokenizer.kind, raw)
            assert tokenizer.normalize(raw) == tokenizer.normalize("quatrevingtdixsept"), (tokenizer.kind, raw)
        assert tokenizer.decode(plain).replace(" ", "") == "quatrevingtdixsept", tokenizer.kind
    # The vocabulary was built from normalised text: no capitals, no hyphens, no spaces.
    assert not {"Q", "-", " "} & set(tokenizers[0].vocabulary)


def test_the_defaults_keep_what_each_kind_always_did(number_corpus: list[str]) -> None:
    assert train_tokenizer("char", ["abc"]).normalization == LEGACY
    assert train_tokenizer("word", ["abc"]).normalization == LEGACY
    sentencepiece = train_tokenizer("sentencepiece", number_corpus, vocab_size=120)
    assert sentencepiece.normalization == IDENTITY
    # SentencePiece's own normalisation still applies (NFKC, whitespace runs).
    assert sentencepiece.normalize("  quatre\u00a0 vingts ") == "quatre vingts"


def _format_1(document: dict) -> dict:
    """A tokenizer document as this project wrote them before normalisation specs (format 1)."""
    legacy = {**document, "format": 1}
    legacy["normalization"] = "nmt_nfkc" if document["kind"] == "sentencepiece" else "NFC"
    return legacy


def test_a_format_1_file_keeps_exactly_its_old_behaviour(
    tmp_path: Path, number_corpus: list[str], sentencepiece_tokenizers: dict[str, Tokenizer]
) -> None:
    probes = ["Cafe\u0301", "21\u202fр.", "\u200f21\u200f/11", "VIERUNDACHTZIG", "vier und achtzig", "２０２６"]
    texts = [*number_corpus, *DATE_SAMPLES, "Café", "р."]
    for tokenizer in [
        train_tokenizer("char", texts),
        train_tokenizer("word", texts),
        *sentencepiece_tokenizers.values(),
    ]:
        path = tmp_path / f"{tokenizer.kind}.json"
        path.write_text(json.dumps(_format_1(tokenizer.to_document())), encoding="utf-8")
        loaded = load_tokenizer(tokenizer.kind, path)
        assert loaded.normalization == (IDENTITY if tokenizer.kind == "sentencepiece" else LEGACY)
        for text in probes:
            assert loaded.encode(text) == tokenizer.encode(text), (tokenizer.kind, text)
    char = load_tokenizer("char", tmp_path / "char.json")
    assert char.encode("Cafe\u0301") == char.encode("Café")  # NFC, as before
    # ... and nothing more: the narrow no-break space and the right-to-left mark are characters of their own.
    assert char.encode("21\u202fр.") != char.encode("21 р.") and char.encode("\u200f21") != char.encode("21")


def test_the_shipped_version_1_tokenizers_are_format_1_and_normalise_with_nfc_alone() -> None:
    root = Path(__file__).resolve().parents[2] / "models"
    for name in ("dates", "numbers"):
        for side in ("source", "target"):
            path = root / name / "1" / f"{side}.tokenizer.json"
            assert json.loads(path.read_text(encoding="utf-8"))["format"] == 1
            assert load_tokenizer("char", path).normalization == LEGACY
