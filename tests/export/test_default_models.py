"""The shipped default models (models/dates/2, models/numbers/2) normalise as they declare and meet their bars as
users meet them, on plain text and on text as software and people write it.

Fresh inputs drawn with seeds that neither training (13) nor the build's own check (101) used, over every
locale x format (dates) or every number of the range (numbers), decoded by the serving stack on onnxruntime,
greedy and with a beam of 4; every group (locale group, language) must meet the bar. Version 1 (format 1
tokenizers, NFC only) stays in the repository and keeps loading and translating as it did.
No torch: this is what `make serve` serves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.acceptance import AS_WRITTEN, PLAIN, SET_NAMES, acceptance_sets, check, translate_as_served
from export.data.dates import DATES_NORMALIZATION, DATES_TARGET_NORMALIZATION
from export.data.numbers import NUMBERS_NORMALIZATION, NUMBERS_TARGET_NORMALIZATION, number_spellings
from export.zoo import ACCEPTANCE_BEAMS, DEFAULT_MODELS, DEFAULT_VERSION
from service.runtime.normalization import LEGACY
from service.runtime.tokenizers import UNK, Tokenizer, load_tokenizer

pytestmark = pytest.mark.slow  # trains models or starts servers

REPOSITORY = Path(__file__).resolve().parents[2] / "models"
ENTRIES = {entry.name: entry for entry in DEFAULT_MODELS}
DECLARED = {
    "dates": (DATES_NORMALIZATION, DATES_TARGET_NORMALIZATION),
    "numbers": (NUMBERS_NORMALIZATION, NUMBERS_TARGET_NORMALIZATION),
}


#: README.md, "What a low score means": a client that flags answers scoring below these flags at most 1% of the
#: right answers to text as people write it.
FLAG_BELOW = {"dates": -0.01, "numbers": -0.1}


def shipped(name: str, version: int = DEFAULT_VERSION) -> Path:
    return REPOSITORY / name / str(version)


def source_tokenizer(name: str, version: int = DEFAULT_VERSION) -> Tokenizer:
    return load_tokenizer("char", shipped(name, version) / "source.tokenizer.json")


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_the_shipped_version_was_built_from_the_current_recipe_and_met_its_bar(name: str) -> None:
    document = json.loads((shipped(name) / "model.json").read_text(encoding="utf-8"))
    entry = ENTRIES[name]
    assert document["build"]["fingerprint"] == entry.fingerprint(), (
        f"models/{name} was built from another recipe than export/zoo.py's: run `make models BUILD_ARGS='--only "
        f"{name}'`"
    )
    assert document["build"]["machine"]["cpu"] and document["build"]["machine"]["torch_cpu_capability"]
    acceptance = document["acceptance"]
    assert acceptance["bar"] == entry.bar
    for decoding in ACCEPTANCE_BEAMS:
        for set_name in SET_NAMES:
            groups = acceptance[decoding][set_name]["groups"]
            assert groups and all(figures["exact_match"] >= entry.bar for figures in groups.values()), (
                decoding,
                set_name,
                groups,
            )
    assert document["parity"]["greedy_identical"] is True
    assert document["training"]["stop_reason"] == "target_reached"


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_the_tokenizers_declare_the_tasks_normalisation_and_model_json_repeats_it(name: str) -> None:
    document = json.loads((shipped(name) / "model.json").read_text(encoding="utf-8"))
    for side, declared in zip(("source", "target"), DECLARED[name], strict=True):
        tokenizer = load_tokenizer("char", shipped(name) / f"{side}.tokenizer.json")
        assert tokenizer.normalization == declared
        assert document["tokenizers"][side]["normalization"] == declared.to_document()


# Each rule of a model's source normalisation, with raw forms (as software and people write them) that must give
# exactly the token ids of their plain form.
RULE_EXAMPLES: dict[str, dict[str, list[tuple[str, str]]]] = {
    "dates": {
        "ignorables": [
            ("21\u200f/11\u200f/2026", "21/11/2026"),  # Babel's Arabic short date
            ("\ufeffsamedi 21 novembre 2026", "samedi 21 novembre 2026"),
            ("21\u200b.\u200e11.\u20602026\u00ad", "21.11.2026"),
        ],
        "unicode": [
            ("21 листопада 2032\u202fр.", "21 листопада 2032 р."),  # CLDR's narrow no-break space
            ("21\u00a0novembre\u00a02026", "21 novembre 2026"),
            ("２０２６年１１月２１日", "2026年11月21日"),  # full-width digits, as CJK input methods type
            ("２０２６／１１／２１", "2026/11/21"),
            ("sa\u0301bado, 21 de noviembre de 2026", "sábado, 21 de noviembre de 2026"),
        ],
        "case": [
            ("SAMEDI 21 NOVEMBRE 2026", "samedi 21 novembre 2026"),
            ("Samedi 21 novembre 2026", "samedi 21 novembre 2026"),
            ("21 ноября 2026 Г.", "21 ноября 2026 г."),
        ],
        "digits": [
            ("٢١ نوفمبر ٢٠٢٦", "21 نوفمبر 2026"),
            ("۲۱ نوفمبر ۲۰۲۶", "21 نوفمبر 2026"),
            ("२१ नवंबर २०२६", "21 नवंबर 2026"),
            ("๒๑ พ.ย. ๒๐๒๖", "21 พ.ย. 2026"),
        ],
        "dashes": [("21\u201011\u20102026", "21-11-2026"), ("21\u201311\u20132026", "21-11-2026")],
        "whitespace": [
            ("  21   novembre  2026 ", "21 novembre 2026"),
            ("21novembre2026", "21 novembre 2026"),
            ("Samstag , 21 . November 2026", "Samstag, 21. November 2026"),
            ("2026년11월21일", "2026년 11월 21일"),
        ],
    },
    "numbers": {
        "ignorables": [
            ("vier\u00adund\u00adachtzig", "vierundachtzig"),  # soft hyphens, as web pages break long words
            ("\ufeffquatre-vingt-quatre\u200b", "quatre-vingt-quatre"),
        ],
        "unicode": [
            ("ｖｉｅｒｕｎｄａｃｈｔｚｉｇ", "vierundachtzig"),
            ("vingt\u00a0et\u202fun", "vingt et un"),
        ],
        "case": [
            ("Vierundachtzig", "vierundachtzig"),
            ("VIERUNDACHTZIG", "vierundachtzig"),
            ("QUATRE-VINGT-QUATRE", "quatre-vingt-quatre"),
            ("Dreißig", "dreißig"),
        ],
        "dashes": [
            ("deux-cent-vingt-et-un", "deux cent vingt et un"),  # the 1990 spelling
            ("vingt-et-un", "vingt et un"),
            ("quatre\u2010vingt\u2013quatre", "quatre-vingt-quatre"),
            ("vier-und-achtzig", "vierundachtzig"),
        ],
        "whitespace": [
            ("vier und achtzig", "vierundachtzig"),
            ("vierund achtzig", "vierundachtzig"),
            ("quatre vingt quatre", "quatre-vingt-quatre"),
            ("quatrevingtquatre", "quatre-vingt-quatre"),
            ("  sieben hundert drei und vierzig ", "siebenhundertdreiundvierzig"),
        ],
    },
}


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_every_rule_a_model_declares_has_examples(name: str) -> None:
    declared = source_tokenizer(name).normalization.to_document()
    default = LEGACY.to_document()
    rules = {rule for rule, value in declared.items() if value != default[rule]} | {"unicode"}
    assert rules == set(RULE_EXAMPLES[name]), (name, declared)


@pytest.mark.parametrize(
    ("name", "rule", "raw", "plain"),
    [
        (name, rule, raw, plain)
        for name, rules in RULE_EXAMPLES.items()
        for rule, examples in rules.items()
        for raw, plain in examples
    ],
)
def test_a_raw_form_gives_the_token_ids_of_its_plain_form(name: str, rule: str, raw: str, plain: str) -> None:
    tokenizer = source_tokenizer(name)
    assert raw != plain
    ids = tokenizer.encode(plain)
    assert ids and UNK not in ids, tokenizer.pieces(plain)
    assert tokenizer.encode(raw) == ids, (rule, tokenizer.pieces(raw), tokenizer.pieces(plain))


@pytest.fixture(scope="module")
def dates_inputs() -> dict[int, dict]:
    entry = ENTRIES["dates"]
    return {
        seed: acceptance_sets("dates", seed, training_seed=entry.training_seed, data_options=entry.data_options)
        for seed in (2026, 90210)
    }


@pytest.mark.parametrize(("seed", "beam_size"), [(2026, 0), (90210, 0), (2026, 4)])
@pytest.mark.parametrize("set_name", SET_NAMES)
def test_dates_translates_fresh_dates_in_every_locale_group(
    dates_inputs: dict[int, dict], seed: int, beam_size: int, set_name: str
) -> None:
    entry = ENTRIES["dates"]
    inputs = dates_inputs[seed][set_name]
    assert len({detail for detail in inputs.details}) == 134 and len(set(inputs.groups)) == 9
    result = check(shipped("dates"), inputs, beam_size=beam_size)
    assert not result.below(entry.bar), result.to_dict()
    assert result.scores["right"]["p01"] >= FLAG_BELOW["dates"], result.scores


@pytest.mark.parametrize("beam_size", [0, 4])
@pytest.mark.parametrize("set_name", SET_NAMES)
def test_numbers_translates_every_number_of_its_range_in_both_languages(beam_size: int, set_name: str) -> None:
    entry = ENTRIES["numbers"]
    inputs = acceptance_sets("numbers", 7, training_seed=entry.training_seed, data_options=entry.data_options)[set_name]
    assert sorted(set(inputs.groups)) == ["de", "fr"]
    assert len(inputs.pairs) == (2000 if set_name == PLAIN else 3100)
    result = check(shipped("numbers"), inputs, beam_size=beam_size)
    assert not result.below(entry.bar), result.to_dict()
    assert result.scores["right"]["p01"] >= FLAG_BELOW["numbers"], result.scores


def test_the_as_written_sets_hold_what_the_issue_names(dates_inputs: dict[int, dict]) -> None:
    dates = dates_inputs[2026][AS_WRITTEN]
    text = "".join(pair.source for pair in dates.pairs)
    assert {"\u202f", "\u00a0", "\u200f", "\uff12", "\u0662"} <= set(
        text
    )  # CLDR's spaces and RLM, full-width and native digits
    kinds = {kind for label in dates.changes for kind in label.split("+")}
    assert {"as formatted", "capitalised", "upper case", "missing spaces", "extra spaces", "full-width"} <= kinds
    entry = ENTRIES["numbers"]
    numbers = acceptance_sets("numbers", 7, training_seed=entry.training_seed, data_options=entry.data_options)
    kinds = {kind for label in numbers[AS_WRITTEN].changes for kind in label.split("+")}
    assert {
        "1990 spelling",
        "hundert spelling",
        "capitalised",
        "upper case",
        "spaced words",
        "hyphenated words",
    } <= kinds
    assert number_spellings(21, "fr") == {"standard": "vingt et un", "1990": "vingt-et-un"}
    assert number_spellings(201, "fr")["1990"] == "deux-cent-un"
    assert number_spellings(184, "de") == {"standard": "einhundertvierundachtzig", "hundert": "hundertvierundachtzig"}


def test_version_1_still_loads_and_translates_plain_text_as_it_did() -> None:
    assert translate_as_served(shipped("dates", 1), ["samedi 21 novembre 2026"])[0].text == "2026-11-21"
    assert translate_as_served(shipped("numbers", 1), ["vierundachtzig"])[0].text == "eighty-four"
    # Its tokenizer files are format 1: NFC and nothing else, exactly as it was trained.
    dates, numbers = source_tokenizer("dates", 1), source_tokenizer("numbers", 1)
    assert dates.normalization == numbers.normalization == LEGACY
    assert dates.encode("1 de\u0301cembre 2026") == dates.encode("1 d\u00e9cembre 2026")
    assert UNK not in dates.encode("1 d\u00e9cembre 2026")
    assert dates.encode("1 D\u00c9CEMBRE 2026") != dates.encode("1 d\u00e9cembre 2026")
    assert dates.pieces("1\u202fd\u00e9cembre\u200f 2026")[1:2] == ["<unk>"] and len(dates.pieces("a\u200fb")) == 3
    assert numbers.encode("vier und achtzig") != numbers.encode("vierundachtzig")
