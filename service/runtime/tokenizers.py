"""Tokenizers shared by export (training) and the server: text <-> token ids.

Three kinds, one interface (`Tokenizer`), one file format:

- `char`: one token per Unicode character of the normalised text.
- `word`: words and punctuation marks, split on whitespace with every punctuation or symbol character
  a token of its own.
- `sentencepiece`: a SentencePiece unigram or BPE model (the `sentencepiece` package is imported only
  when such a tokenizer is trained or loaded).

Every tokenizer carries its input normalisation (`Normalization`, service/runtime/normalization.py) and
`encode` applies it before anything else, so whoever encodes text (training, export, the server, the
offline client, the benchmark) normalises it the same way. Files of format 1 carry no spec (only a name,
'NFC' or 'nmt_nfkc', that the kind fixes) and keep exactly what they always did: NFC for char and word,
nothing besides SentencePiece's own rules for sentencepiece.

Every tokenizer reserves the same four ids, fixed by the model repository contract:
PAD=0 '<pad>', BOS=1 '<s>', EOS=2 '</s>', UNK=3 '<unk>'. `encode` never adds BOS or EOS; the caller
does. A tokenizer file is one UTF-8 JSON object `{"kind": ..., "format": 2, "normalization": {...}, ...}`.

What round-trips (`decode(encode(text)) == normalize(text)` when every token is known):

- `char`: the normalised text, exactly.
- `word`: the normalised text's words and punctuation joined by single spaces ("Hi, you!" -> "Hi , you !"),
  so only text already written that way round-trips exactly.
- `sentencepiece`: SentencePiece's own normalisation (NFKC, runs of whitespace collapsed, stripped) of the
  normalised text.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import tempfile
import unicodedata
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from service.runtime.normalization import IDENTITY, LEGACY, Normalization, NormalizationError

#: Id of the padding token.
PAD = 0
#: Id of the begin-of-sequence token (the decoder's first input).
BOS = 1
#: Id of the end-of-sequence token (appended to every source; ends a hypothesis).
EOS = 2
#: Id every unknown character, word or piece encodes to.
UNK = 3

PAD_PIECE = "<pad>"
BOS_PIECE = "<s>"
EOS_PIECE = "</s>"
UNK_PIECE = "<unk>"

#: The reserved pieces in id order: SPECIAL_PIECES[PAD] == '<pad>', ...
SPECIAL_PIECES: tuple[str, ...] = (PAD_PIECE, BOS_PIECE, EOS_PIECE, UNK_PIECE)
#: The reserved ids by name, as model.json's "special_tokens" writes them.
SPECIAL_TOKENS: dict[str, int] = {"pad": PAD, "bos": BOS, "eos": EOS, "unk": UNK}

#: Version of the tokenizer file layout written now; bumped on incompatible change. Format 2 added the
#: `normalization` spec (an object); format 1 files carry none and normalise with NFC (char, word) or with
#: SentencePiece's own rules only (sentencepiece).
FILE_FORMAT = 2
#: The formats `load_tokenizer` reads.
READABLE_FORMATS: tuple[int, ...] = (1, 2)

#: Tokenizer kinds, as named in model.json and in tokenizer files.
TokenizerKind = Literal["char", "word", "sentencepiece"]
KINDS: tuple[str, ...] = get_args(TokenizerKind)

_SKIPPED_ON_DECODE = frozenset((PAD, BOS, EOS))


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used: unreadable, not JSON, another kind or format, inconsistent."""


class Tokenizer(ABC):
    """Maps text to token ids and back. Instances are immutable and safe to share between threads."""

    #: 'char', 'word' or 'sentencepiece'.
    kind: ClassVar[str]

    def __init__(self, normalization: Normalization) -> None:
        self._normalization = normalization
        self._normalize = normalization.function()

    @property
    def normalization(self) -> Normalization:
        """The input normalisation `encode` applies first (declared by the tokenizer file)."""
        return self._normalization

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, the four specials included; valid ids are 0 .. vocab_size - 1."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` after the tokenizer's normalisation, without BOS or EOS; unknown characters,
        words or pieces become UNK."""
        return self._encode_normalized(self._normalize(text))

    def normalize(self, text: str) -> str:
        """The form of `text` that decode(encode(text)) gives back when every token is known."""
        return self._render_normalized(self._normalize(text))

    @abstractmethod
    def _encode_normalized(self, text: str) -> list[int]:
        """Token ids of text the normalisation has already been applied to."""

    @abstractmethod
    def _render_normalized(self, text: str) -> str:
        """normalize() of text the normalisation has already been applied to."""

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The token string of an id ('<unk>' for UNK); ValueError for an id outside the vocabulary."""

    @abstractmethod
    def _decode_known(self, ids: list[int]) -> str:
        """Text of ids that are all in range and none of PAD/BOS/EOS."""

    @abstractmethod
    def to_document(self) -> dict[str, Any]:
        """The JSON object `save` writes; always has 'kind' and 'format'."""

    def pieces(self, text: str) -> list[str]:
        """The token strings of encode(text), one per id (an unknown token is '<unk>')."""
        return [self.id_to_piece(token_id) for token_id in self.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, skipping PAD, BOS and EOS wherever they are (it does not stop at EOS).

        UNK becomes the text '<unk>'. Raises ValueError for an id outside the vocabulary.
        """
        kept = []
        for token_id in ids:
            token_id = int(token_id)
            self._check_id(token_id)
            if token_id not in _SKIPPED_ON_DECODE:
                kept.append(token_id)
        return self._decode_known(kept)

    def incremental_decoder(self) -> IncrementalDecoder:
        """A decoder for a sequence that grows one id at a time (streaming): each id costs O(1), and the
        text it builds equals decode() of the whole sequence."""
        return IncrementalDecoder(self)

    def _decode_step(self, context: list[int], token_id: int) -> str:
        """The text `token_id` adds after the known ids `context` (the last few of the sequence, possibly
        none). The default decodes with and without it, which is right when the text of a sequence extends
        the text of its prefix (SentencePiece without byte fallback, as attnserve trains it)."""
        before = self._decode_known(context) if context else ""
        after = self._decode_known([*context, token_id])
        return after[len(before) :] if after.startswith(before) else after

    def save(self, path: Path | str) -> None:
        """Write the tokenizer to one JSON file (atomically: a reader never sees half a file)."""
        path = Path(path)
        text = json.dumps(self.to_document(), ensure_ascii=False, indent=1) + "\n"
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(text)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self.vocab_size} ids")


class _VocabularyTokenizer(Tokenizer):
    """A tokenizer whose vocabulary is an explicit list of pieces, the specials first."""

    def __init__(self, pieces: Sequence[str], normalization: Normalization = LEGACY) -> None:
        super().__init__(normalization)
        pieces = list(pieces)
        if tuple(pieces[: len(SPECIAL_PIECES)]) != SPECIAL_PIECES:
            raise TokenizerError(f"a {self.kind} vocabulary must start with {list(SPECIAL_PIECES)}, got {pieces[:4]}")
        self._pieces = pieces
        self._ids = {piece: token_id for token_id, piece in enumerate(pieces)}
        if len(self._ids) != len(pieces):
            duplicated = sorted(piece for piece, count in Counter(pieces).items() if count > 1)
            raise TokenizerError(f"{self.kind} vocabulary repeats pieces {duplicated[:10]}")
        # Specials never come out of encode(): text such as '<s>' is split into ordinary tokens.
        for piece in SPECIAL_PIECES:
            del self._ids[piece]

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def vocabulary(self) -> list[str]:
        """Every piece in id order, the four specials first."""
        return list(self._pieces)

    def id_to_piece(self, token_id: int) -> str:
        self._check_id(token_id)
        return self._pieces[token_id]

    def _encode_normalized(self, text: str) -> list[int]:
        ids = self._ids
        return [ids.get(token, UNK) for token in self._split(text)]

    def to_document(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "format": FILE_FORMAT,
            "normalization": self._normalization.to_document(),
            "pieces": self._pieces,
        }

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> _VocabularyTokenizer:
        pieces = document.get("pieces")
        if not isinstance(pieces, list) or not all(isinstance(piece, str) and piece for piece in pieces):
            raise TokenizerError(f"a {cls.kind} tokenizer file needs 'pieces': a list of non-empty strings")
        return cls(pieces, _declared_normalization(document, LEGACY))

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int | None,
        min_count: int,
        normalization: Normalization = LEGACY,
    ) -> _VocabularyTokenizer:
        """Vocabulary of the tokens seen in `texts` (normalised by `normalization`) at least `min_count` times,
        the most frequent first when `vocab_size` (specials included) caps it; ties are broken by the token's
        text."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if vocab_size is not None and vocab_size <= len(SPECIAL_PIECES):
            raise ValueError(f"vocab_size must be > {len(SPECIAL_PIECES)} (the specials), got {vocab_size}")
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(cls._split(normalization(text)))
        for piece in SPECIAL_PIECES:
            counts.pop(piece, None)  # a word tokenizer never produces '<unk>' as one token, but be sure
        ranked = sorted((token for token, count in counts.items() if count >= min_count), key=lambda t: (-counts[t], t))
        if vocab_size is not None:
            ranked = ranked[: vocab_size - len(SPECIAL_PIECES)]
        return cls([*SPECIAL_PIECES, *cls._order(ranked)], normalization)

    @staticmethod
    @abstractmethod
    def _split(text: str) -> list[str]:
        """The tokens of normalised `text`, before the vocabulary lookup."""

    @staticmethod
    def _order(tokens: list[str]) -> list[str]:
        """Id order of the trained vocabulary, given tokens ranked by frequency."""
        return tokens


class IncrementalDecoder:
    """Builds the text of a growing id sequence, one id at a time, for streaming.

    Decoding the whole prefix again at every token costs O(length) per token; this keeps the text and
    decodes only the new id in the context of the few before it.
    """

    #: Known ids decoded with each new one: a SentencePiece word-start marker needs the piece before it.
    CONTEXT = 2

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._known: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one id (PAD, BOS and EOS add nothing); returns the text it adds."""
        token_id = int(token_id)
        self._tokenizer._check_id(token_id)
        if token_id in _SKIPPED_ON_DECODE:
            return ""
        added = self._tokenizer._decode_step(self._known[-self.CONTEXT :], token_id)
        self._known.append(token_id)
        self.text += added
        return added


class CharTokenizer(_VocabularyTokenizer):
    """One token per character of the normalised text (NFC by default); spaces are characters too.

    Vocabulary ids (from 4) follow code point order, so they do not depend on corpus frequencies.
    """

    kind = "char"

    @staticmethod
    def _split(text: str) -> list[str]:
        return list(text)

    @staticmethod
    def _order(tokens: list[str]) -> list[str]:
        return sorted(tokens)

    def _render_normalized(self, text: str) -> str:
        return text

    def _decode_known(self, ids: list[int]) -> str:
        return "".join(self._pieces[token_id] for token_id in ids)

    def _decode_step(self, context: list[int], token_id: int) -> str:
        return self._pieces[token_id]


class WordTokenizer(_VocabularyTokenizer):
    """Words and punctuation of the normalised text (then NFC); ids (from 4) in order of training frequency.

    A word is a run of letters, combining marks, digits and connector punctuation ('_'); whitespace
    separates tokens; every other character (punctuation, symbols) is a token by itself, so "l'été,"
    is ['l', "'", 'été', ','].
    """

    kind = "word"

    @staticmethod
    def _split(text: str) -> list[str]:
        return split_words(text)

    def _render_normalized(self, text: str) -> str:
        return " ".join(split_words(text))

    def _decode_known(self, ids: list[int]) -> str:
        return " ".join(self._pieces[token_id] for token_id in ids)

    def _decode_step(self, context: list[int], token_id: int) -> str:
        return f" {self._pieces[token_id]}" if context else self._pieces[token_id]


def split_words(text: str) -> list[str]:
    """The word tokenizer's tokens of `text` (see WordTokenizer); Unicode-aware, after NFC."""
    tokens: list[str] = []
    word: list[str] = []
    for char in unicodedata.normalize("NFC", text):
        if char.isspace():
            if word:
                tokens.append("".join(word))
                word = []
        elif _is_word_character(char):
            word.append(char)
        else:
            if word:
                tokens.append("".join(word))
                word = []
            tokens.append(char)
    if word:
        tokens.append("".join(word))
    return tokens


def _is_word_character(char: str) -> bool:
    # Marks (M*) belong to words: Devanagari and Thai vowel signs are marks, and Python's \w misses them.
    category = unicodedata.category(char)
    return category[0] in "LMN" or category == "Pc"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; pieces mark word starts with '▁' (U+2581).

    The file holds the serialized model proto in base64, so the model travels in the same single JSON
    file as every other tokenizer.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, model_type: str, normalization: Normalization = IDENTITY) -> None:
        super().__init__(normalization)
        import sentencepiece  # native module: loaded only when a SentencePiece tokenizer is used

        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as error:
            raise TokenizerError(f"not a SentencePiece model: {error}") from error
        reserved = {
            "pad": processor.pad_id(),
            "bos": processor.bos_id(),
            "eos": processor.eos_id(),
            "unk": processor.unk_id(),
        }
        if reserved != SPECIAL_TOKENS:
            raise TokenizerError(f"SentencePiece model reserves ids {reserved}, expected {SPECIAL_TOKENS}")
        pieces = tuple(processor.IdToPiece(token_id) for token_id in range(len(SPECIAL_PIECES)))
        if pieces != SPECIAL_PIECES:
            raise TokenizerError(
                f"SentencePiece model names its special ids {list(pieces)}, expected {list(SPECIAL_PIECES)}"
            )
        self._processor = processor
        self._model_proto = bytes(model_proto)
        self._model_type = model_type
        self._vocab_size = int(processor.GetPieceSize())

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def model_type(self) -> str:
        """'unigram' or 'bpe'."""
        return self._model_type

    def _encode_normalized(self, text: str) -> list[int]:
        return [int(token_id) for token_id in self._processor.EncodeAsIds(text)]

    def _render_normalized(self, text: str) -> str:
        return str(self._processor.Normalize(text)).replace("\u2581", " ").strip()

    def id_to_piece(self, token_id: int) -> str:
        self._check_id(token_id)
        return str(self._processor.IdToPiece(token_id))

    def _decode_known(self, ids: list[int]) -> str:
        return str(self._processor.DecodeIds(ids))

    def to_document(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "format": FILE_FORMAT,
            "model_type": self._model_type,
            "vocab_size": self._vocab_size,
            "normalization": self._normalization.to_document(),
            "model": base64.b64encode(self._model_proto).decode("ascii"),
        }

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> SentencePieceTokenizer:
        model = document.get("model")
        model_type = document.get("model_type")
        if not isinstance(model, str) or not isinstance(model_type, str):
            raise TokenizerError("a sentencepiece tokenizer file needs 'model' (base64) and 'model_type' strings")
        try:
            proto = base64.b64decode(model.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as error:
            raise TokenizerError(f"'model' is not valid base64: {error}") from error
        tokenizer = cls(proto, model_type, _declared_normalization(document, IDENTITY))
        if document.get("vocab_size", tokenizer.vocab_size) != tokenizer.vocab_size:
            raise TokenizerError(
                f"file says vocab_size {document.get('vocab_size')} but its model has {tokenizer.vocab_size} pieces"
            )
        return tokenizer

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int,
        model_type: str,
        input_sentence_size: int,
        character_coverage: float,
        seed: int,
        normalization: Normalization = IDENTITY,
    ) -> SentencePieceTokenizer:
        """Train on `texts` (normalised by `normalization`, then by SentencePiece's own rules) with one thread
        and a fixed seed, so the same input gives the same model.

        `vocab_size` is a soft limit (hard_vocab_limit=False): a small corpus yields fewer pieces
        instead of an error. At most `input_sentence_size` sentences are used (sampled with `seed`).
        """
        import sentencepiece

        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
        if vocab_size <= len(SPECIAL_PIECES):
            raise ValueError(f"vocab_size must be > {len(SPECIAL_PIECES)} (the specials), got {vocab_size}")
        sentences = [normalized for normalized in map(normalization, texts) if normalized.strip()]
        if not sentences:
            raise ValueError("cannot train a sentencepiece tokenizer on no text")
        # Both settings are process-wide in the sentencepiece library; the log level keeps training quiet.
        sentencepiece.set_random_generator_seed(seed)
        sentencepiece.set_min_log_level(2)
        model = io.BytesIO()
        try:
            sentencepiece.SentencePieceTrainer.Train(
                sentence_iterator=iter(sentences),
                model_writer=model,
                model_type=model_type,
                vocab_size=vocab_size,
                hard_vocab_limit=False,
                character_coverage=character_coverage,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                num_threads=1,
                pad_id=PAD,
                bos_id=BOS,
                eos_id=EOS,
                unk_id=UNK,
                pad_piece=PAD_PIECE,
                bos_piece=BOS_PIECE,
                eos_piece=EOS_PIECE,
                unk_piece=UNK_PIECE,
                unk_surface=UNK_PIECE,
            )
        except RuntimeError as error:
            raise ValueError(f"sentencepiece training failed: {error}") from error
        return cls(model.getvalue(), model_type, normalization)


def _declared_normalization(document: dict[str, Any], format_1: Normalization) -> Normalization:
    """The normalisation a tokenizer file declares: `format_1` for a format 1 file (whose 'normalization', a
    name, was never read), the spec object of a format 2 file."""
    if document.get("format") == 1:
        return format_1
    try:
        return Normalization.from_document(document.get("normalization"))
    except NormalizationError as error:
        raise TokenizerError(str(error)) from error


DEFAULT_SENTENCEPIECE_VOCAB_SIZE = 8000

_VOCABULARY_KINDS: dict[str, type[_VocabularyTokenizer]] = {"char": CharTokenizer, "word": WordTokenizer}


def train_tokenizer(
    kind: str,
    texts: Iterable[str],
    *,
    vocab_size: int | None = None,
    min_count: int = 1,
    model_type: str = "unigram",
    input_sentence_size: int = 1_000_000,
    character_coverage: float = 1.0,
    seed: int = 13,
    normalization: Normalization | None = None,
) -> Tokenizer:
    """Build a tokenizer of `kind` from training texts. Deterministic: same texts and options, same ids.

    `vocab_size` counts the four specials. For 'char' and 'word' it caps the vocabulary (None: every
    token seen at least `min_count` times); for 'sentencepiece' it is the target size (None: 8000,
    fewer if the corpus is too small). `model_type`, `input_sentence_size`, `character_coverage` and
    `seed` only apply to 'sentencepiece'; `min_count` only to 'char' and 'word'. `normalization` is the
    tokenizer's input normalisation, applied to the training texts too (None: NFC for 'char' and 'word',
    none for 'sentencepiece', which normalises with its own rules).
    """
    if kind in _VOCABULARY_KINDS:
        return _VOCABULARY_KINDS[kind].train(
            texts, vocab_size=vocab_size, min_count=min_count, normalization=normalization or LEGACY
        )
    if kind == SentencePieceTokenizer.kind:
        return SentencePieceTokenizer.train(
            texts,
            vocab_size=DEFAULT_SENTENCEPIECE_VOCAB_SIZE if vocab_size is None else vocab_size,
            model_type=model_type,
            input_sentence_size=input_sentence_size,
            character_coverage=character_coverage,
            seed=seed,
            normalization=normalization or IDENTITY,
        )
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {list(KINDS)}")


def load_tokenizer(kind: str, path: Path | str) -> Tokenizer:
    """Read a tokenizer file written by `Tokenizer.save`, expecting `kind` (as model.json names it).

    Raises TokenizerError if the file is missing, unreadable, not a JSON object, of another kind or
    format version, or inconsistent.
    """
    if kind not in KINDS:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; expected one of {list(KINDS)}")
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise TokenizerError(f"{path}: cannot read tokenizer file: {error.strerror or error}") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{path}: not a JSON tokenizer file: {error}") from error
    if not isinstance(document, dict):
        raise TokenizerError(f"{path}: a tokenizer file must hold a JSON object, got {type(document).__name__}")
    if document.get("kind") != kind:
        raise TokenizerError(f"{path}: expected a {kind!r} tokenizer, the file holds kind {document.get('kind')!r}")
    if document.get("format") not in READABLE_FORMATS:
        raise TokenizerError(
            f"{path}: tokenizer file format {document.get('format')!r}, this version reads "
            f"{' and '.join(str(number) for number in READABLE_FORMATS)}"
        )
    try:
        if kind == SentencePieceTokenizer.kind:
            return SentencePieceTokenizer.from_document(document)
        return _VOCABULARY_KINDS[kind].from_document(document)
    except TokenizerError as error:
        raise TokenizerError(f"{path}: {error}") from error
