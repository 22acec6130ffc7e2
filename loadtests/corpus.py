"""The phrasebook corpus: a user-style, many-to-many TSV corpus generated offline from a large real lexicon.

The benchmark's production-size model needs a corpus with a vocabulary of several thousand subwords, and
nothing can be downloaded. So the corpus is generated from what ships with the training extra:

- CLDR display names (Babel) of ~290 territories, ~550 languages and ~280 currencies (singular and
  plural) in six locales: en, fr, de, es, it, pt;
- CLDR unit patterns (lengths, masses, durations, temperatures) and locale number formats (Babel);
- CLDR long date formats (Babel), and number words in each language (num2words).

Each line is a phrasebook sentence made of one to `max_clauses` clauses. A clause is a template written by
hand in all six languages (the same meaning in each) whose slots are filled with the same entity (a
territory code, a currency code, a number, a date, ...) rendered in the source and in the target locale.
The source starts with a target-language tag (`<2de>`), as in many-to-many translation systems, so one
model translates every direction and both sides carry the whole lexicon:

    <2de> Local currency (Japan): Japanese yen. I paid forty-two euros for the ticket.
    -> Landeswährung (Japan): Japanischer Yen. Ich habe zweiundvierzig Euro für die Fahrkarte bezahlt.

The sentences are deliberately simple; what the benchmark needs from them is realistic token statistics
(subword vocabulary, sentence lengths, many scripts of numbers and names), not literary quality.
Same arguments -> the same lines (only `random.Random(seed)` draws).

    python -m loadtests.corpus --out build/bench/phrasebook.tsv --lines 40000
"""

from __future__ import annotations

import argparse
import datetime
import random
import re
import sys
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

#: The six locales every template is written in.
LANGUAGES: tuple[str, ...] = ("en", "fr", "de", "es", "it", "pt")

#: Clause templates: one string per language (same order as LANGUAGES), slots in braces.
#: Labels with parentheses ("Local currency (Japan):") keep every language grammatical without articles,
#: whose gender and contraction would depend on the name filled in.
TEMPLATES: tuple[tuple[str, ...], ...] = (
    (
        "In this country ({territory}), many people speak {language}.",
        "Dans ce pays ({territory}), beaucoup de gens parlent {language}.",
        "In diesem Land ({territory}) sprechen viele Menschen {language}.",
        "En este país ({territory}), mucha gente habla {language}.",
        "In questo paese ({territory}) molte persone parlano {language}.",
        "Neste país ({territory}), muitas pessoas falam {language}.",
    ),
    (
        "Local currency ({territory}): {currency}.",
        "Monnaie locale ({territory}) : {currency}.",
        "Landeswährung ({territory}): {currency}.",
        "Moneda local ({territory}): {currency}.",
        "Valuta locale ({territory}): {currency}.",
        "Moeda local ({territory}): {currency}.",
    ),
    (
        "I paid {money} for the ticket.",
        "J'ai payé {money} pour le billet.",
        "Ich habe {money} für die Fahrkarte bezahlt.",
        "Pagué {money} por el billete.",
        "Ho pagato {money} per il biglietto.",
        "Paguei {money} pelo bilhete.",
    ),
    (
        "The next town is {distance} away.",
        "La prochaine ville est à {distance}.",
        "Die nächste Stadt ist {distance} entfernt.",
        "La próxima ciudad está a {distance}.",
        "La prossima città è a {distance}.",
        "A próxima cidade fica a {distance}.",
    ),
    (
        "The meeting is planned for {date}.",
        "La réunion est prévue pour le {date}.",
        "Das Treffen ist für den {date} geplant.",
        "La reunión está prevista para el {date}.",
        "La riunione è prevista per il {date}.",
        "A reunião está prevista para o dia {date}.",
    ),
    (
        "Our flight: {territory} → {territory2}, on {date}.",
        "Notre vol : {territory} → {territory2}, le {date}.",
        "Unser Flug: {territory} → {territory2}, am {date}.",
        "Nuestro vuelo: {territory} → {territory2}, el {date}.",
        "Il nostro volo: {territory} → {territory2}, il {date}.",
        "O nosso voo: {territory} → {territory2}, em {date}.",
    ),
    (
        "Could you translate this text? Target language: {language}.",
        "Pourriez-vous traduire ce texte ? Langue cible : {language}.",
        "Könnten Sie diesen Text übersetzen? Zielsprache: {language}.",
        "¿Podría traducir este texto? Idioma de destino: {language}.",
        "Potrebbe tradurre questo testo? Lingua di destinazione: {language}.",
        "Poderia traduzir este texto? Idioma de destino: {language}.",
    ),
    (
        "There are {count} people waiting in line.",
        "Il y a {count} personnes qui attendent.",
        "Es warten {count} Personen in der Schlange.",
        "Hay {count} personas esperando en la fila.",
        "Ci sono {count} persone in fila.",
        "Há {count} pessoas à espera na fila.",
    ),
    (
        "The parcel weighs {weight}.",
        "Le colis pèse {weight}.",
        "Das Paket wiegt {weight}.",
        "El paquete pesa {weight}.",
        "Il pacco pesa {weight}.",
        "O pacote pesa {weight}.",
    ),
    (
        "The journey takes {duration}.",
        "Le trajet dure {duration}.",
        "Die Reise dauert {duration}.",
        "El viaje dura {duration}.",
        "Il viaggio dura {duration}.",
        "A viagem dura {duration}.",
    ),
    (
        "Price in {currency}: {amount}.",
        "Prix en {currency} : {amount}.",
        "Preis in {currency}: {amount}.",
        "Precio en {currency}: {amount}.",
        "Prezzo in {currency}: {amount}.",
        "Preço em {currency}: {amount}.",
    ),
    (
        "Languages spoken ({territory}): {language}, {language2}.",
        "Langues parlées ({territory}) : {language}, {language2}.",
        "Gesprochene Sprachen ({territory}): {language}, {language2}.",
        "Idiomas hablados ({territory}): {language}, {language2}.",
        "Lingue parlate ({territory}): {language}, {language2}.",
        "Línguas faladas ({territory}): {language}, {language2}.",
    ),
    (
        "Tomorrow it will be {temperature}.",
        "Demain, il fera {temperature}.",
        "Morgen werden es {temperature} sein.",
        "Mañana hará {temperature}.",
        "Domani ci saranno {temperature}.",
        "Amanhã estarão {temperature}.",
    ),
    (
        "My passport was issued in this country ({territory}) on {date}.",
        "Mon passeport a été délivré dans ce pays ({territory}) le {date}.",
        "Mein Pass wurde in diesem Land ({territory}) am {date} ausgestellt.",
        "Mi pasaporte fue expedido en este país ({territory}) el {date}.",
        "Il mio passaporto è stato rilasciato in questo paese ({territory}) il {date}.",
        "O meu passaporte foi emitido neste país ({territory}) em {date}.",
    ),
)

#: Bare entries (a single name), the shortest lines of the corpus and of the mixed-length workload.
SHORT_SLOTS: tuple[str, ...] = ("territory", "language", "currency", "date", "distance")

_DISTANCE_UNITS = ("length-kilometer", "length-meter", "length-mile", "length-centimeter")
_WEIGHT_UNITS = ("mass-kilogram", "mass-gram", "mass-pound", "mass-tonne")
_DURATION_UNITS = ("duration-hour", "duration-minute", "duration-day", "duration-week")
_SLOT = re.compile(r"\{(\w+)\}")
_SPACES = re.compile(r"\s+")
_INVISIBLE = re.compile("[\u061c\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


@dataclass(frozen=True, slots=True)
class PhrasePair:
    """One corpus line: `source` (tagged with the target language) and its `target`, both one line of text.

    `clauses` is how many templates the line joins (0 for a bare name); `source_language` and
    `target_language` are codes of LANGUAGES.
    """

    source: str
    target: str
    source_language: str
    target_language: str
    clauses: int


@dataclass(frozen=True, slots=True)
class Entities:
    """The language-independent values filling one clause; rendered per locale by `Lexicon.render`."""

    territory: str
    territory2: str
    language: str
    language2: str
    currency: str
    amount: float
    count: int
    date: datetime.date
    distance: tuple[int, str]
    weight: tuple[int, str]
    duration: tuple[int, str]
    temperature: int


class Lexicon:
    """CLDR names, units, dates and number words in the six LANGUAGES (Babel and num2words, loaded lazily)."""

    def __init__(self) -> None:
        from babel import Locale

        self._locales = {code: Locale.parse(code) for code in LANGUAGES}
        self.territories = self._shared_codes(lambda locale: locale.territories, alpha=True)
        self.languages = self._shared_codes(lambda locale: locale.languages, alpha=True)
        self.currencies = self._shared_codes(lambda locale: locale.currencies, alpha=True)

    def _shared_codes(self, table: Callable[[Any], dict[str, str]], *, alpha: bool) -> tuple[str, ...]:
        """Codes that have a display name in every locale (sorted, so the draw order is fixed)."""
        shared: set[str] | None = None
        for locale in self._locales.values():
            codes = {code for code, name in table(locale).items() if name and (not alpha or code.isalpha())}
            shared = codes if shared is None else shared & codes
        return tuple(sorted(shared or ()))

    def draw(self, rng: random.Random) -> Entities:
        """Random values for every slot (each clause uses the ones its template names)."""
        territory, territory2 = rng.sample(self.territories, 2)
        language, language2 = rng.sample(self.languages, 2)
        day = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(100 * 365))
        amount = round(rng.choice((rng.uniform(1, 100), rng.uniform(100, 10000), rng.uniform(10000, 1e6))), 2)
        return Entities(
            territory=territory,
            territory2=territory2,
            language=language,
            language2=language2,
            currency=rng.choice(self.currencies),
            amount=amount,
            count=rng.choice((rng.randint(2, 20), rng.randint(21, 999), rng.randint(1000, 99999))),
            date=day,
            distance=(rng.randint(2, 950), rng.choice(_DISTANCE_UNITS)),
            weight=(rng.randint(2, 950), rng.choice(_WEIGHT_UNITS)),
            duration=(rng.randint(2, 72), rng.choice(_DURATION_UNITS)),
            temperature=rng.randint(-30, 45),
        )

    def render(self, slot: str, entities: Entities, language: str) -> str:
        """The text of one slot in `language`."""
        locale = self._locales[language]
        if slot in ("territory", "territory2"):
            return locale.territories[getattr(entities, slot)]
        if slot in ("language", "language2"):
            return locale.languages[getattr(entities, slot)]
        if slot == "currency":
            return _currency_name(entities.currency, 1, language)
        if slot == "money":
            whole = max(2, int(entities.amount) % 1000)
            return f"{_number_words(whole, language)} {_currency_name(entities.currency, whole, language)}"
        if slot == "amount":
            from babel.numbers import format_decimal

            return format_decimal(entities.amount, format="#,##0.00", locale=language)
        if slot == "count":
            return _number_words(entities.count, language)
        if slot == "date":
            from babel.dates import format_date

            return format_date(entities.date, format="long", locale=language)
        if slot in ("distance", "weight", "duration"):
            value, unit = getattr(entities, slot)
            return _unit(value, unit, language)
        if slot == "temperature":
            return _unit(entities.temperature, "temperature-celsius", language)
        raise KeyError(f"unknown slot {slot!r}")


@cache
def _currency_name(code: str, count: int, language: str) -> str:
    from babel.numbers import get_currency_name

    # Plural categories are what matter, so caching per count costs little: few distinct counts repeat.
    return get_currency_name(code, count=count, locale=language)


@cache
def _number_words(number: int, language: str) -> str:
    from num2words import num2words

    return str(num2words(number, lang=language))


@cache
def _unit(value: int, unit: str, language: str) -> str:
    from babel.units import format_unit

    return format_unit(value, unit, length="long", locale=language)


def clean(text: str) -> str:
    """One line of plain NFC text: no invisible marks, every run of (Unicode) whitespace one space."""
    text = _INVISIBLE.sub("", unicodedata.normalize("NFC", text))
    return _SPACES.sub(" ", text).strip()


def target_tag(language: str) -> str:
    """The prefix that tells the model which language to write, e.g. '<2de>'."""
    return f"<2{language}>"


def fill(template_index: int, entities: Entities, language: str, lexicon: Lexicon) -> str:
    """Template `template_index` in `language` with its slots rendered from `entities`."""
    template = TEMPLATES[template_index][LANGUAGES.index(language)]
    return _SLOT.sub(lambda match: lexicon.render(match.group(1), entities, language), template)


def phrase_pairs(
    count: int,
    *,
    seed: int = 13,
    min_clauses: int = 1,
    max_clauses: int = 3,
    short_fraction: float = 0.05,
    lexicon: Lexicon | None = None,
) -> Iterator[PhrasePair]:
    """`count` distinct phrase pairs in random directions (source language != target language).

    Each line joins a uniform number of clauses in [min_clauses, max_clauses]; a `short_fraction` of the
    lines are a bare name or value instead. Raises ValueError for bad arguments.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not 1 <= min_clauses <= max_clauses:
        raise ValueError(f"need 1 <= min_clauses <= max_clauses, got {min_clauses}..{max_clauses}")
    if not 0.0 <= short_fraction <= 1.0:
        raise ValueError(f"short_fraction must be in [0, 1], got {short_fraction}")
    lexicon = lexicon or Lexicon()
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    attempts = 0
    while len(seen) < count:
        attempts += 1
        if attempts > 20 * count + 1000:
            raise ValueError(f"could not draw {count} distinct lines (got {len(seen)})")
        source_language, target_language = rng.sample(LANGUAGES, 2)
        if rng.random() < short_fraction:
            slot = rng.choice(SHORT_SLOTS)
            entities = lexicon.draw(rng)
            source_text = lexicon.render(slot, entities, source_language)
            target_text = lexicon.render(slot, entities, target_language)
            clauses = 0
        else:
            clauses = rng.randint(min_clauses, max_clauses)
            source_parts, target_parts = [], []
            for _ in range(clauses):
                index = rng.randrange(len(TEMPLATES))
                entities = lexicon.draw(rng)
                source_parts.append(fill(index, entities, source_language, lexicon))
                target_parts.append(fill(index, entities, target_language, lexicon))
            source_text, target_text = " ".join(source_parts), " ".join(target_parts)
        source = clean(f"{target_tag(target_language)} {source_text}")
        target = clean(target_text)
        if not target or (source, target) in seen:
            continue
        seen.add((source, target))
        yield PhrasePair(source, target, source_language, target_language, clauses)


def write_corpus(path: Path | str, pairs: Sequence[PhrasePair] | Iterator[PhrasePair]) -> int:
    """Write `source<TAB>target` lines (UTF-8, '\\n'); returns the number of lines. Written to a temporary
    file first and renamed, so a reader never sees half a corpus."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    lines = 0
    with partial.open("w", encoding="utf-8", newline="\n") as handle:
        for pair in pairs:
            handle.write(f"{pair.source}\t{pair.target}\n")
            lines += 1
    partial.replace(path)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="TSV file to write")
    parser.add_argument("--lines", type=int, default=40000, help="distinct lines (default 40000)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--max-clauses", type=int, default=3, help="most clauses per line (default 3)")
    args = parser.parse_args(argv)
    written = write_corpus(args.out, phrase_pairs(args.lines, seed=args.seed, max_clauses=args.max_clauses))
    print(f"wrote {written} lines to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
