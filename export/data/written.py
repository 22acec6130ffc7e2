"""Text as people and software write it: the variations the default models' recipes draw sources with.

A formatter (ICU, Babel, a browser, a spreadsheet) writes CLDR's characters: narrow no-break spaces (U+202F),
no-break spaces (U+00A0), right-to-left marks (U+200F). People add or leave out spaces, type full-width
digits with CJK input methods, capitalise the first word of a sentence or shout in upper case, paste text
that carries a byte order mark or bidi marks. Each `Writer` here makes one such change to a text; `write`
applies a few of them, chosen with a seeded `random.Random`, and says which.

What a model's normalisation removes (service/runtime/normalization.py) needs no training data, but the
recipes still train and check on these forms: training then proves the normalisation removes them, and the
acceptance sets measure the models on text as users send it. What the normalisation cannot remove (Turkish
dotted capitals, Greek capitals without accents) is learnt from them.
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: What `write` reports for a source left exactly as the formatter wrote it.
AS_FORMATTED = "as formatted"

#: Spaces that formatters and keyboards produce besides U+0020 (no tabs or line breaks: a source must fit on
#: one line of a TSV file).
UNICODE_SPACES = ("\u00a0", "\u202f", "\u2009", "\u2007", "\u2002", "\u3000")

#: Invisible characters that pasted text carries.
INVISIBLES = ("\u200b", "\u200e", "\u200f", "\u2060", "\u00ad", "\u061c")

#: Dashes people type or paste for '-'.
DASHES = ("\u2010", "\u2011", "\u2013", "\u2212", "\uff0d")

#: A change to a text: the changed text, or the changed text and the name of what was done (a writer that
#: picks one of several changes names the one it made).
Writer = Callable[[str, random.Random], "str | tuple[str, str]"]


@dataclass(frozen=True, slots=True)
class Written:
    """A text as written, and the kinds of change made to the formatter's (or dictionary's) form."""

    text: str
    kinds: tuple[str, ...]

    @property
    def label(self) -> str:
        """The kinds joined by '+', or AS_FORMATTED."""
        return "+".join(self.kinds) if self.kinds else AS_FORMATTED


def write(
    text: str,
    writers: dict[str, Writer],
    rng: random.Random,
    *,
    counts: Sequence[int] = (0, 1, 1, 2, 2, 3),
) -> Written:
    """`text` with `rng.choice(counts)` of `writers` applied, in the dict's order.

    Only writers that change this text are chosen (missing spaces need a text with spaces), and only the
    kinds that changed it are reported.
    """
    probe = random.Random(rng.random())
    applicable = [name for name, writer in writers.items() if _changed(writer(text, probe)) != text]
    count = min(rng.choice(counts), len(applicable))
    chosen = set(rng.sample(applicable, count))
    kinds = []
    for name, writer in writers.items():
        if name in chosen:
            result = writer(text, rng)
            changed, kind = result if isinstance(result, tuple) else (result, name)
            if changed != text:
                kinds.append(kind)
                text = changed
    return Written(text, tuple(kinds))


def _changed(result: str | tuple[str, str]) -> str:
    return result[0] if isinstance(result, tuple) else result


# ----- case ---------------------------------------------------------------------------------------------------------


def upper(text: str, language: str = "") -> str:
    """Upper case as a person writing `language` types it: Turkish dotted and dotless i, Greek without accents."""
    if language == "tr":
        text = text.replace("i", "İ").replace("ı", "I")
    if language == "el":
        decomposed = unicodedata.normalize("NFD", text)
        text = unicodedata.normalize("NFC", decomposed.replace("\u0301", "").replace("\u0344", "\u0308"))
    return text.upper()


def lower(text: str, language: str = "") -> str:
    """Lower case (Turkish: 'I' -> 'ı', 'İ' -> 'i')."""
    if language == "tr":
        text = text.replace("I", "ı").replace("İ", "i")
    return text.lower()


def capitalise(text: str, language: str = "") -> str:
    """The first letter upper case, as at the start of a sentence; the rest unchanged."""
    for index, char in enumerate(text):
        if char.isalpha():
            return text[:index] + upper(char, language) + text[index + 1 :]
    return text


def title(text: str, language: str = "") -> str:
    """Every word's first letter upper case ('Samedi 21 Novembre 2026')."""
    words = text.split(" ")
    return " ".join(capitalise(word, language) for word in words)


def has_case(text: str) -> bool:
    """True when the text has letters whose case can change (Latin, Cyrillic, Greek, ...)."""
    return any(char.upper() != char.lower() for char in text)


def case_writer(language: str) -> Writer:
    """One of the case changes people make to a text in `language`: capitalised (a sentence's first word),
    upper case, lower case, or every word capitalised."""
    changes: dict[str, Callable[[str, str], str]] = {
        "capitalised": capitalise,
        "upper case": upper,
        "lower case": lower,
        "title case": title,
    }

    def change_case(text: str, rng: random.Random) -> tuple[str, str]:
        kind = rng.choice(sorted(changes))
        return changes[kind](text, language), kind

    return change_case


# ----- spaces, digits, invisible characters -------------------------------------------------------------------------


def missing_spaces(text: str, rng: random.Random) -> str:
    """One or every space left out."""
    positions = [index for index, char in enumerate(text) if char.isspace()]
    if not positions:
        return text
    dropped = set(positions) if rng.random() < 0.5 else {rng.choice(positions)}
    return "".join(char for index, char in enumerate(text) if index not in dropped)


def extra_spaces(text: str, rng: random.Random) -> str:
    """A doubled space, spaces around the text, or every space doubled."""
    choice = rng.randrange(3)
    positions = [index for index, char in enumerate(text) if char.isspace()]
    if choice == 0 and positions:
        index = rng.choice(positions)
        return text[:index] + " " * rng.randint(1, 3) + text[index:]
    if choice == 1 or not positions:
        return " " * rng.randint(1, 2) + text + " " * rng.randint(0, 2)
    return text.replace(" ", "  ")


def spaced_punctuation(text: str, rng: random.Random) -> str:
    """A space added before or after punctuation ('21 . 11 . 2026', 'Samstag , 21.')."""
    positions = [index for index, char in enumerate(text) if unicodedata.category(char).startswith("P")]
    if not positions:
        return text
    index = rng.choice(positions)
    if rng.random() < 0.5:
        return text[:index] + " " + text[index:]
    return text[: index + 1] + " " + text[index + 1 :]


def unicode_spaces(text: str, rng: random.Random) -> str:
    """Some spaces written as no-break, narrow no-break, thin, figure or ideographic spaces, or tabs."""
    positions = [index for index, char in enumerate(text) if char.isspace()]
    if not positions:
        return text
    chosen = set(positions) if rng.random() < 0.5 else {rng.choice(positions)}
    space = rng.choice(UNICODE_SPACES)
    return "".join(space if index in chosen else char for index, char in enumerate(text))


def full_width(text: str, rng: random.Random) -> str:
    """Digits (and, half the time, ASCII punctuation and letters) in their full-width forms, as CJK input
    methods type them."""
    everything = rng.random() < 0.5

    def widen(char: str) -> str:
        if "0" <= char <= "9" or (everything and "!" <= char <= "~"):
            return chr(ord(char) - 0x21 + 0xFF01)
        return char

    return "".join(widen(char) for char in text)


def digits_in(zero: str) -> Writer:
    """A writer that writes ASCII digits with the digits of another script (its zero given)."""
    base = ord(zero)

    def native(text: str, rng: random.Random) -> str:
        return "".join(chr(base + ord(char) - ord("0")) if "0" <= char <= "9" else char for char in text)

    return native


def invisibles(text: str, rng: random.Random) -> str:
    """Invisible characters that pasted text carries: a byte order mark in front, bidi marks, zero-width
    spaces, word joiners or soft hyphens inside."""
    if rng.random() < 0.25:
        return "\ufeff" + text
    for _ in range(rng.randint(1, 3)):
        index = rng.randrange(len(text) + 1)
        text = text[:index] + rng.choice(INVISIBLES) + text[index:]
    return text


def other_dashes(text: str, rng: random.Random) -> str:
    """'-' written as a hyphen, a non-breaking hyphen, an en dash, a minus sign or a full-width hyphen-minus."""
    dash = rng.choice(DASHES)
    return text.replace("-", dash)


#: The writers that apply to any text, in the order `write` applies them.
COMMON_WRITERS: dict[str, Writer] = {
    "full-width": full_width,
    "spaced punctuation": spaced_punctuation,
    "missing spaces": missing_spaces,
    "extra spaces": extra_spaces,
    "other spaces": unicode_spaces,
    "invisible characters": invisibles,
}
