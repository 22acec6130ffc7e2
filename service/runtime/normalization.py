"""Input normalisation: what a tokenizer does to text before it splits it into tokens.

The normalisation belongs to the model: its tokenizer file declares it (docs/model-format.md), and
`Tokenizer.encode` applies it, so training, export, the server, `attnserve translate --offline` and the
benchmark all run exactly this function on every text. A `Normalization` is a small typed spec; each field
is one rule, applied in this order:

1. `ignorables` 'drop': remove the characters Unicode calls Default_Ignorable_Code_Point (bidi marks
   U+200E/U+200F/U+061C, embeddings and isolates U+202A-U+202E and U+2066-U+2069, zero-width characters
   U+200B-U+200D, word joiner U+2060, byte order mark U+FEFF, soft hyphen U+00AD, variation selectors, ...).
2. `unicode` 'NFC' or 'NFKC': Unicode normalisation form. NFKC also maps compatibility characters: full-width
   digits and letters to ASCII, no-break and narrow no-break spaces (U+00A0, U+202F) and the other fixed-width
   spaces to U+0020, ligatures to their letters. 'none' leaves the text as it is (SentencePiece normalises
   itself).
3. `case` 'fold': Unicode case folding (str.casefold: 'Vierundachtzig', 'VIERUNDACHTZIG' -> 'vierundachtzig';
   'ß' -> 'ss'), then the `unicode` form again.
4. `digits` 'ascii': every decimal digit (Unicode category Nd: Arabic-Indic '٢١', Devanagari '२१', Thai '๒๑',
   ...) becomes its ASCII digit.
5. `dashes` 'fold' or 'drop': every dash (Unicode category Pd: '‐', '–', '—', '〜', ...) and the minus sign
   U+2212 becomes '-' (fold) or is removed (drop).
6. `whitespace` 'fold' or 'drop': every run of whitespace (str.isspace: Unicode spaces, tabs, line breaks)
   becomes one ' ' and the ends are stripped (fold), or all whitespace is removed (drop).

When `dashes` or `whitespace` drops characters, the `unicode` form is applied once more at the end: a dropped
space can leave a combining mark next to a letter it composes with. Normalising twice gives what normalising
once gave.

`version` numbers the rules themselves: a later change to what a value means (another list of ignorables,
say) comes with a new version, which older readers refuse instead of normalising differently.

The default spec, `Normalization()`, is NFC with every other rule off: exactly what tokenizer files of
format 1 (which declare no spec) always did.
"""

from __future__ import annotations

import functools
import sys
import unicodedata
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from service.validation import problems_text

#: The newest version of the rules this module implements.
RULES_VERSION: Literal[1] = 1

UnicodeForm = Literal["none", "NFC", "NFKC"]

# Default_Ignorable_Code_Point (Unicode 15.1, DerivedCoreProperties.txt), fixed here so that what `ignorables`
# removes does not depend on the Python version that serves the model.
_DEFAULT_IGNORABLE_RANGES: tuple[tuple[int, int], ...] = (
    (0x00AD, 0x00AD),  # soft hyphen
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x061C, 0x061C),  # Arabic letter mark
    (0x115F, 0x1160),  # Hangul choseong and jungseong fillers
    (0x17B4, 0x17B5),  # Khmer inherent vowels
    (0x180B, 0x180F),  # Mongolian free variation selectors and vowel separator
    (0x200B, 0x200F),  # zero width space, non-joiner, joiner; left-to-right and right-to-left marks
    (0x202A, 0x202E),  # bidi embeddings and overrides
    (0x2060, 0x206F),  # word joiner, invisible operators, bidi isolates, deprecated format characters
    (0x3164, 0x3164),  # Hangul filler
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFEFF, 0xFEFF),  # zero width no-break space (byte order mark)
    (0xFFA0, 0xFFA0),  # half-width Hangul filler
    (0xFFF0, 0xFFF8),  # unassigned, ignorable
    (0x1BCA0, 0x1BCA3),  # shorthand format controls
    (0x1D173, 0x1D17A),  # musical symbol format controls
    (0xE0000, 0xE0FFF),  # tags, variation selectors supplement
)

#: Characters that `dashes` treats as dashes besides Unicode category Pd.
_EXTRA_DASHES = ("\u2212",)  # minus sign


class NormalizationError(ValueError):
    """A normalisation spec that this version cannot apply: unknown rule, value or rules version."""


class Normalization(BaseModel):
    """One model's input normalisation (see the module docstring). Immutable and hashable; call it on text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = RULES_VERSION
    """The version of the rules' definitions."""
    unicode: UnicodeForm = "NFC"
    """Unicode normalisation form: 'NFC', 'NFKC', or 'none'."""
    ignorables: Literal["keep", "drop"] = "keep"
    """'drop' removes Default_Ignorable_Code_Point characters (bidi marks, zero-width characters, BOM, ...)."""
    case: Literal["keep", "fold"] = "keep"
    """'fold' applies Unicode case folding."""
    digits: Literal["keep", "ascii"] = "keep"
    """'ascii' maps every decimal digit (Nd) to 0-9."""
    dashes: Literal["keep", "fold", "drop"] = "keep"
    """'fold' maps every dash (Pd, U+2212) to '-'; 'drop' removes them."""
    whitespace: Literal["keep", "fold", "drop"] = "keep"
    """'fold' turns each run of whitespace into one space and strips the ends; 'drop' removes all whitespace."""

    def __call__(self, text: str) -> str:
        """`text` normalised."""
        return _pipeline(self)(text)

    def function(self) -> Callable[[str], str]:
        """The function that applies this spec, built now: its translation table takes a pass over every code point
        (about 0.1 s, once per spec and process), which a server does when it loads a model, not in the first
        request it serves. Calling it skips the spec's hash that each `self(text)` costs."""
        return _pipeline(self)

    @property
    def is_identity(self) -> bool:
        """True when the spec leaves every text as it is."""
        return self == IDENTITY

    def to_document(self) -> dict[str, object]:
        """The JSON object a tokenizer file (format 2) and model.json write."""
        return self.model_dump()

    @classmethod
    def from_document(cls, document: object) -> Normalization:
        """The spec of a JSON object; NormalizationError naming what is wrong."""
        if not isinstance(document, dict):
            raise NormalizationError(f"a normalization spec is a JSON object, got {type(document).__name__}")
        version = document.get("version", RULES_VERSION)
        if version != RULES_VERSION:
            raise NormalizationError(
                f"normalization rules version {version!r} is not supported (this version applies {RULES_VERSION})"
            )
        try:
            return cls.model_validate(document)
        except ValidationError as error:
            problems = problems_text(error, "spec")
            raise NormalizationError(f"bad normalization spec: {problems}") from None

    @classmethod
    def parse(cls, text: str) -> Normalization:
        """A spec from the command line: 'none' (identity), 'nfc' (the format 1 default), or comma-separated
        rule=value items on top of the default, e.g. 'unicode=NFKC,ignorables=drop,whitespace=fold'."""
        text = text.strip()
        if text.lower() == "none":
            return IDENTITY
        if text.lower() == "nfc":
            return LEGACY
        values: dict[str, str] = {}
        for item in text.split(","):
            rule, separator, value = item.partition("=")
            if not separator or not rule.strip() or not value.strip():
                raise NormalizationError(
                    f"{item!r} is not rule=value (rules: {', '.join(name for name in cls.model_fields)})"
                )
            values[rule.strip()] = value.strip()
        if "unicode" in values:
            values["unicode"] = values["unicode"].upper() if values["unicode"].lower() != "none" else "none"
        return cls.from_document(values)

    def describe(self) -> str:
        """A short English description, e.g. 'NFKC; ignorables dropped; case folded; whitespace folded'."""
        parts: list[str] = ["no Unicode normalisation" if self.unicode == "none" else self.unicode]
        if self.ignorables == "drop":
            parts.append("ignorables dropped")
        if self.case == "fold":
            parts.append("case folded")
        if self.digits == "ascii":
            parts.append("digits to ASCII")
        if self.dashes != "keep":
            parts.append(f"dashes {'folded to -' if self.dashes == 'fold' else 'dropped'}")
        if self.whitespace != "keep":
            parts.append(f"whitespace {'folded' if self.whitespace == 'fold' else 'dropped'}")
        return "; ".join(parts)


#: What tokenizer files of format 1 do: NFC, nothing else.
LEGACY = Normalization()
#: No change at all (a SentencePiece model normalises with its own rules).
IDENTITY = Normalization(unicode="none")


@functools.cache
def _pipeline(spec: Normalization) -> Callable[[str], str]:
    """The function that applies `spec`, built once per spec."""
    steps: list[Callable[[str], str]] = []
    if spec.ignorables == "drop":
        ignorables = _ignorable_table()
        steps.append(lambda text: text.translate(ignorables))
    form = spec.unicode
    if form != "none":
        steps.append(functools.partial(unicodedata.normalize, form))
    if spec.case == "fold":
        if form != "none":
            steps.append(lambda text: unicodedata.normalize(form, text.casefold()))
        else:
            steps.append(str.casefold)
    table = _character_table(spec.digits, spec.dashes)
    if table:
        steps.append(lambda text: text.translate(table))
    if spec.whitespace == "fold":
        steps.append(lambda text: " ".join(text.split()))
    elif spec.whitespace == "drop":
        steps.append(lambda text: "".join(text.split()))
    if form != "none" and "drop" in (spec.dashes, spec.whitespace):
        # A dropped space or dash can leave a combining mark next to a letter it composes with.
        steps.append(functools.partial(unicodedata.normalize, form))

    def normalize(text: str) -> str:
        for step in steps:
            text = step(text)
        return text

    return normalize


@functools.cache
def _ignorable_table() -> dict[int, None]:
    return {code: None for first, last in _DEFAULT_IGNORABLE_RANGES for code in range(first, last + 1)}


@functools.cache
def _character_table(digits: str, dashes: str) -> dict[int, str | None]:
    """str.translate table for the `digits` and `dashes` rules (built once: a pass over every code point)."""
    table: dict[int, str | None] = {}
    if digits == "keep" and dashes == "keep":
        return table
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        category = unicodedata.category(char)
        if digits == "ascii" and category == "Nd" and not char.isascii():
            table[code] = str(unicodedata.decimal(char))
        elif dashes != "keep" and (category == "Pd" or char in _EXTRA_DASHES):
            table[code] = "-" if dashes == "fold" else None
    if dashes == "fold":
        table.pop(ord("-"), None)
    return table
