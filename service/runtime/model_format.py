"""`model.json`: the one description of a model version, written by the exporter and read by the server.

The sections the server relies on (files, tensor names, limits, special token ids) are typed and checked here;
the sections it only shows (`architecture`, `metrics`, `data`, `training`, `build`, `acceptance`, ...) are free
JSON objects whose content belongs to the training recipe. docs/model-format.md explains each field; a test checks
that page against `ModelDocument.model_json_schema()`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.errors import ModelLoadError
from service.runtime.normalization import Normalization
from service.runtime.repository import is_valid_model_name
from service.runtime.tokenizers import SPECIAL_TOKENS, TokenizerKind
from service.validation import problems_text

FORMAT_VERSION: Literal[1] = 1
"""The `format` this server reads; an exporter that changes the contract bumps it."""

FreeForm = dict[str, Any]
"""A section the server shows (GetModel) but never interprets."""


class _Section(BaseModel):
    # A misspelt key in a section the server relies on is an error, not a silently ignored field.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _file_in_version_folder(name: str) -> str:
    # The files named by model.json must lie in the version's own folder: the repository may be writable by
    # fewer people than the files a path could reach.
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"{name!r} must be a file name in the version folder, not a path")
    return name


def _model_name(name: str) -> str:
    if not is_valid_model_name(name):
        raise ValueError(f"{name!r} is not a model name (letters, digits, '_', '-', '.'; at most 64)")
    return name


class GraphFile(_Section):
    file: str
    """The ONNX graph's file name in the version folder."""

    _check_file = field_validator("file")(_file_in_version_folder)


class StateTensors(_Section):
    """One recurrent decoder state: its step input, its step output and the encoder output that initialises it."""

    input: str
    output: str
    init: str


class DecoderGraph(GraphFile):
    memory: Annotated[tuple[str, ...], Field(min_length=1)]
    """Encoder outputs that stay fixed while decoding ([batch, source_len, ...]); decoder inputs of the same name."""

    state: tuple[StateTensors, ...]
    """The recurrent state tensors, carried from one step to the next (may be empty)."""

    full_log_probs: bool = False
    """Whether the step graph also returns `log_probs` [rows, target_vocab]."""


class TokenizerFile(_Section):
    type: TokenizerKind
    """The tokenizer kind (service/runtime/tokenizers.py)."""

    file: str
    """The tokenizer file's name in the version folder."""

    normalization: Normalization | None = None
    """The input normalisation the tokenizer file declares, repeated here for readers of model.json (absent in
    models exported before it existed); the server refuses a version where the two differ."""

    _check_file = field_validator("file")(_file_in_version_folder)


class Tokenizers(_Section):
    source: TokenizerFile
    target: TokenizerFile


class Limits(_Section):
    max_source_tokens: Annotated[int, Field(ge=1)]
    """Longest source in ids, `eos` included; longer inputs are refused."""

    max_target_tokens: Annotated[int, Field(ge=1)]
    """Most tokens a hypothesis may generate."""

    top_k: Annotated[int, Field(ge=1)]
    """Candidates the step graph returns per row, and so the widest beam the server allows."""


class SpecialTokens(_Section):
    pad: int
    bos: int
    eos: int
    unk: int

    @model_validator(mode="after")
    def _the_reserved_ids(self) -> SpecialTokens:
        if self.model_dump() != SPECIAL_TOKENS:
            raise ValueError(f"special token ids {self.model_dump()} differ from {SPECIAL_TOKENS}")
        return self


class ModelDocument(BaseModel):
    """The whole of `model.json`. Sections are assigned one by one while an export is verified (parity,
    quantization, acceptance), so the document is mutable and every assignment is validated.

    Top-level fields this version does not know are kept (and written back), not refused: a repository annotated
    by its owners (a `license`, say) keeps loading. Inside the typed sections an unknown key is an error."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    format: Literal[1] = FORMAT_VERSION
    name: Annotated[str, AfterValidator(_model_name)]
    version: Annotated[int, Field(ge=1)]
    task: FreeForm = Field(default_factory=dict)
    """What the model does: `kind`, `description`, `source_languages`, `target_language`."""
    architecture: FreeForm = Field(default_factory=dict)
    """The training recipe's hyper-parameters; `source_vocab`/`target_vocab`, when present, are checked against
    the tokenizers at load."""
    special_tokens: SpecialTokens
    tokenizers: Tokenizers
    limits: Limits
    encoder: GraphFile
    decoder: DecoderGraph
    onnx: FreeForm | None = None
    """How the graphs were exported: `opset`, `exporter`, `torch`, and the `op_types` of each graph."""
    metrics: FreeForm = Field(default_factory=dict)
    """Accuracy on the test split, e.g. `{"test": {"exact_match": 0.998, "bleu": 99.9, ...}}`."""
    data: FreeForm = Field(default_factory=dict)
    training: FreeForm = Field(default_factory=dict)
    build: FreeForm | None = None
    """For the shipped default models: the recipe's fingerprint, its description and the machine it was built on."""
    parity: FreeForm | None = None
    """onnxruntime against PyTorch: the largest differences and whether greedy outputs are identical."""
    quantization: FreeForm | None = None
    acceptance: FreeForm | None = None
    """For the shipped default models: exact match on fresh inputs, decoded as the server decodes."""

    @classmethod
    def read(cls, directory: Path) -> ModelDocument:
        """The `model.json` of a version folder; raises ModelLoadError naming the file and what is wrong."""
        path = directory / "model.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as error:
            raise ModelLoadError(f"{directory}: model.json is missing") from error
        except (OSError, UnicodeDecodeError) as error:
            raise ModelLoadError(f"{path}: unreadable: {error}") from error
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ModelLoadError(f"{path}: unreadable: {error}") from error
        if isinstance(data, dict) and data.get("format") != FORMAT_VERSION:
            raise ModelLoadError(f"{path}: format {data.get('format')!r} is not supported (expected {FORMAT_VERSION})")
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            problems = problems_text(error, "document")
            raise ModelLoadError(f"{path}: {problems}") from None

    def write(self, directory: Path) -> None:
        """Write `model.json` into a version folder (UTF-8, indented, keys in the order of the fields)."""
        absent: dict[str, Any] = {name: True for name in type(self).model_fields if getattr(self, name) is None}
        # A model exported before tokenizers declared their normalisation is written back as it was read.
        undeclared = {side: {"normalization"} for side in ("source", "target")}
        undeclared = {
            side: fields for side, fields in undeclared.items() if getattr(self.tokenizers, side).normalization is None
        }
        if undeclared:
            absent["tokenizers"] = undeclared
        text = json.dumps(self.model_dump(mode="json", exclude=absent), indent=2, ensure_ascii=False)
        (directory / "model.json").write_text(text + "\n", encoding="utf-8")
