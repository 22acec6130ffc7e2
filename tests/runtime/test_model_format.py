"""model.json: one pydantic model read by the server and written by the exporter, and the page that documents it."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from service.errors import ModelLoadError
from service.runtime.model_format import ModelDocument

ROOT = Path(__file__).resolve().parents[2]
# Every shipped version: version 1 (model.json without normalisation, format 1 tokenizers) and the current one.
SHIPPED = sorted(path.parent for path in (ROOT / "models").glob("*/*/model.json"))


def documented_example() -> dict[str, Any]:
    page = (ROOT / "docs" / "model-format.md").read_text(encoding="utf-8")
    match = re.search(r"## `model.json`\n.*?```json\n(.*?)\n```", page, re.S)
    assert match, "docs/model-format.md has no model.json example"
    return json.loads(match.group(1))


def keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield key
            yield from keys(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from keys(inner)


def test_the_documented_example_validates_against_the_schema_and_shows_every_field() -> None:
    schema = ModelDocument.model_json_schema()
    example = documented_example()
    jsonschema.validate(example, schema)
    assert ModelDocument.model_validate(example).decoder.memory == ("memory", "memory_keys")
    every_field = set(schema["properties"]) | {
        name for definition in schema["$defs"].values() for name in definition.get("properties", {})
    }
    assert every_field - set(keys(example)) == set()


def test_both_default_models_ship_version_1_and_a_newer_one() -> None:
    versions = {(path.parent.name, path.name) for path in SHIPPED}
    assert {("dates", "1"), ("numbers", "1"), ("dates", "2"), ("numbers", "2")} <= versions


@pytest.mark.parametrize("version_dir", SHIPPED, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_shipped_documents_read_and_write_back_byte_for_byte(version_dir: Path, tmp_path: Path) -> None:
    document = ModelDocument.read(version_dir)
    assert (document.name, document.version) == (version_dir.parent.name, int(version_dir.name))
    document.write(tmp_path)
    assert (tmp_path / "model.json").read_bytes() == (version_dir / "model.json").read_bytes()


def broken(tmp_path: Path, change: Any) -> Path:
    """A copy of the shipped dates model.json with one change made to its JSON."""
    data = json.loads((SHIPPED[0] / "model.json").read_text(encoding="utf-8"))
    change(data)
    folder = tmp_path / "dates" / "1"
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps(data), encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format=2), "format 2 is not supported (expected 1)"),
        (lambda d: d["special_tokens"].update(eos=5), "special token ids"),
        (lambda d: d.pop("special_tokens"), "special_tokens: Field required"),
        (lambda d: d["decoder"].pop("state"), "decoder.state: Field required"),
        (
            lambda d: d["tokenizers"]["source"].update(file="../../etc/passwd"),
            "tokenizers.source.file: '../../etc/passwd' must be a file name in the version folder, not a path",
        ),
        (lambda d: d["tokenizers"]["target"].update(type="bpe"), "tokenizers.target.type"),
        (
            lambda d: d["tokenizers"]["source"].update(normalization={"unicode": "NFKC", "case": "lower"}),
            "tokenizers.source.normalization.case: Input should be 'keep' or 'fold'",
        ),
        (lambda d: d["decoder"].update(memory=[]), "decoder.memory"),
        (lambda d: d["limits"].pop("top_k"), "limits.top_k: Field required"),
        (lambda d: d["limits"].update(max_source_tokens=0), "limits.max_source_tokens"),
        (lambda d: d["limits"].update(top_kk=3), "limits.top_kk: Extra inputs are not permitted"),
        (lambda d: d.update(name="../x"), "name"),
        (lambda d: d.update(version="one"), "version"),
    ],
)
def test_a_bad_document_names_the_file_the_field_and_the_problem(tmp_path: Path, change: Any, message: str) -> None:
    folder = broken(tmp_path, change)
    with pytest.raises(ModelLoadError) as raised:
        ModelDocument.read(folder)
    assert str(folder / "model.json") in str(raised.value) and message in str(raised.value)


def test_a_missing_or_unreadable_document_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model.json is missing"):
        ModelDocument.read(tmp_path)
    (tmp_path / "model.json").write_text("{ not json", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="unreadable"):
        ModelDocument.read(tmp_path)


def test_assignments_are_validated_like_the_file(tmp_path: Path) -> None:
    shutil.copytree(SHIPPED[0], tmp_path / "v")
    document = ModelDocument.read(tmp_path / "v")
    with pytest.raises(ValueError, match="version"):
        document.version = 0


def test_an_unknown_top_level_field_is_kept_and_written_back(tmp_path: Path) -> None:
    folder = broken(tmp_path, lambda d: d.update(license="CC-BY-4.0"))
    document = ModelDocument.read(folder)
    document.write(tmp_path)
    assert json.loads((tmp_path / "model.json").read_text(encoding="utf-8"))["license"] == "CC-BY-4.0"


def test_a_model_json_whose_normalisation_differs_from_its_tokenizer_file_does_not_load(tmp_path: Path) -> None:
    from service.runtime.model import read_text_side

    current = max(path for path in SHIPPED if path.parent.name == "dates")
    folder = tmp_path / "dates" / current.name
    shutil.copytree(current, folder)
    document, source, _ = read_text_side(folder)
    assert document.tokenizers.source.normalization == source.normalization
    data = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    data["tokenizers"]["source"]["normalization"]["case"] = "keep"
    (folder / "model.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="model.json says the source tokenizer normalises with NFKC; ignorables"):
        read_text_side(folder)
