"""The registry on its own: a request's (name, version) to a served version, and the errors that say why not.

Filled through its writer's methods with the shipped dates model (real onnxruntime sessions; nothing decodes:
the registry only looks versions up)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import InvalidRequest, ModelLoadError, ModelNotFound, Unavailable
from service.registry import ModelEntry, ModelRegistry, ServedVersion
from service.runtime.model import LoadedModel, load_model

DATES = Path(__file__).resolve().parents[2] / "models" / "dates" / "1"


@pytest.fixture(scope="module")
def dates_model() -> LoadedModel:
    return load_model(DATES, provider="cpu", intra_op_threads=1)


def dates_entry(model: LoadedModel) -> ModelEntry:
    """dates with versions 1..4 on disk, 2 and 3 served, 4 failed."""
    return ModelEntry(
        versions_on_disk=(1, 2, 3, 4),
        served={2: ServedVersion("dates", 2, model), 3: ServedVersion("dates", 3, model)},
        failures={4: "decoder.onnx: truncated"},
    )


@pytest.fixture
def registry(dates_model: LoadedModel) -> ModelRegistry:
    """dates (see dates_entry); numbers on disk, nothing of it loaded."""
    registry = ModelRegistry(loaded_versions=2)
    registry.add_model("dates", dates_entry(dates_model))
    registry.add_model("numbers", ModelEntry(versions_on_disk=(1,), failures={1: "model.json is missing"}))
    registry.set_default_model("dates")
    return registry


def test_the_default_model_and_the_latest_loaded_version_when_a_request_names_neither(registry: ModelRegistry) -> None:
    assert registry.resolve("", "").label == "dates version 3"
    assert registry.resolve("dates", "2").label == "dates version 2"
    assert [(s.name, s.version) for s in registry.served_versions()] == [("dates", 2), ("dates", 3)]
    assert registry.model_names == ["dates"] and registry.all_model_names == ["dates", "numbers"]


@pytest.mark.parametrize(
    ("name", "version", "error", "message"),
    [
        ("../dates", "", InvalidRequest, "model name '../dates' is not valid"),
        ("dates", "v2", InvalidRequest, "model version 'v2' is not valid"),
        ("poetry", "", ModelNotFound, "model 'poetry' not found; available models: dates, numbers"),
        ("dates", "9", ModelNotFound, "model dates has no version 9; loaded versions: 2, 3"),
        ("dates", "1", ModelNotFound, "in the repository but not loaded (loaded: 2, 3; the server loads the newest 2"),
        ("dates", "4", ModelLoadError, "model dates version 4 failed to load: decoder.onnx: truncated"),
        ("numbers", "", ModelLoadError, "model numbers has no loaded version: version 1: model.json is missing"),
    ],
)
def test_every_lookup_that_fails_says_why(
    registry: ModelRegistry, name: str, version: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as raised:
        registry.resolve(name, version)
    assert message in str(raised.value)
    with pytest.raises(error):  # GetModel picks the version the same way
        registry.describe(name, version)
    if error is InvalidRequest:  # malformed: an error for the caller, not a "not ready"
        with pytest.raises(InvalidRequest):
            registry.is_ready(name, version)
    else:
        assert registry.is_ready(name, version) is False


def test_draining_refuses_translations_but_still_describes(registry: ModelRegistry) -> None:
    assert registry.describe("", "").ready is True
    registry.begin_draining()
    with pytest.raises(Unavailable, match="shutting down; model dates version 3 accepts no new requests"):
        registry.resolve("", "")
    description = registry.describe("dates", "2")
    assert (description.version, description.ready, description.loaded_versions) == (2, False, (2, 3))
    assert registry.is_ready("dates", "3") is False


def test_readiness_before_start_and_with_a_model_that_has_no_loaded_version(
    registry: ModelRegistry, dates_model: LoadedModel
) -> None:
    assert registry.all_loaded is False  # numbers has no loaded version
    starting = ModelRegistry(loaded_versions=2)
    starting.add_model("dates", dates_entry(dates_model))
    assert starting.all_loaded is False  # loaded, but the start has not finished (no default model yet)
    with pytest.raises(Unavailable, match="has not finished loading"):
        starting.resolve("", "")
    starting.set_default_model("dates")
    assert starting.all_loaded is True
    starting.set_unavailable("the engine process is restarting")
    assert starting.all_loaded is False
    with pytest.raises(Unavailable, match="accepts no requests now: the engine process is restarting"):
        starting.resolve("dates", "3")


def test_list_models_describes_the_latest_loaded_version_of_each_model(registry: ModelRegistry) -> None:
    (description,) = registry.describe_all()
    assert (description.name, description.version, description.is_default) == ("dates", 3, True)
    assert description.versions == (1, 2, 3, 4) and description.top_k == 15 and description.task_kind == "dates"
