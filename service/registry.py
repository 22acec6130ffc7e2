"""The registry: which model versions are served now, and looking one up by a request's name and version.

It holds in-memory tables only; the reconciler (service/models.py) fills them from the repository. A
client-supplied name is checked against the strict model-name pattern first and is never turned into a path.
Use on the event-loop thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from service.engine import RequestHandle, TranslationRequest
from service.errors import InvalidRequest, ModelLoadError, ModelNotFound, Unavailable
from service.runtime.model_format import ModelDocument
from service.runtime.repository import is_valid_model_name, is_valid_version
from service.runtime.tokenizers import Tokenizer


class ServedModel(Protocol):
    """What the dataplane needs of a model version: runtime.LoadedModel in the process that decodes, the
    text side alone (document and tokenizers) in a front-end process."""

    @property
    def document(self) -> ModelDocument: ...
    @property
    def directory(self) -> Path: ...
    @property
    def source_tokenizer(self) -> Tokenizer: ...
    @property
    def target_tokenizer(self) -> Tokenizer: ...
    @property
    def provider(self) -> str: ...
    @property
    def load_seconds(self) -> float: ...


class DecodeQueue(Protocol):
    """What the dataplane and the reconciler need of a version's decoder: engine.Scheduler in the process that
    decodes, a proxy to the engine process's scheduler in a front-end process."""

    @property
    def waiting(self) -> int: ...
    @property
    def running(self) -> int: ...
    def check_room(self, count: int) -> None: ...
    def submit(self, request: TranslationRequest) -> RequestHandle: ...
    def submit_all(self, requests: Sequence[TranslationRequest]) -> list[RequestHandle]: ...
    async def stop(self, grace_s: float) -> None: ...


@dataclass
class ServedVersion:
    """One loaded model version and the scheduler that decodes with it."""

    name: str
    version: int
    model: ServedModel
    scheduler: DecodeQueue

    @property
    def label(self) -> str:
        """'dates version 1', for messages."""
        return f"{self.name} version {self.version}"


@dataclass(frozen=True)
class ModelDescription:
    """What ListModels / GetModel report about one model version (transport-neutral).

    `versions`: every version on disk at start, ascending; `loaded_versions`: those served.
    `architecture`: model.json's architecture scalars as text (null values left out).
    `test_metrics`: numeric entries of model.json metrics.test. `load_seconds`: load time, seconds.
    """

    name: str
    version: int
    versions: tuple[int, ...]
    loaded_versions: tuple[int, ...]
    ready: bool
    attention: str
    architecture: dict[str, str]
    task_kind: str
    task_description: str
    source_languages: tuple[str, ...]
    target_language: str
    test_metrics: dict[str, float]
    provider: str
    max_source_tokens: int
    max_target_tokens: int
    top_k: int
    is_default: bool
    load_seconds: float


@dataclass
class ModelEntry:
    """One model name: its versions on disk, those served, and those that failed to load."""

    versions_on_disk: tuple[int, ...]
    served: dict[int, ServedVersion] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)  # version -> why it did not load

    @property
    def latest(self) -> ServedVersion | None:
        return self.served[max(self.served)] if self.served else None


class ModelRegistry:
    """Resolves (name, version) to a ServedVersion and describes what is served.

    `loaded_versions` is only quoted in messages (how many of each model's newest versions the server loads).
    """

    def __init__(self, loaded_versions: int) -> None:
        self.loaded_versions = loaded_versions
        self.entries: dict[str, ModelEntry] = {}
        self.default_model = ""  # the model used when a request names none; '' until the first load finished
        self.draining = False
        # Why no model accepts requests now although versions are loaded ('' = they do): a front-end process
        # sets it while it has no connection to the engine process.
        self.unavailable = ""

    @property
    def model_names(self) -> list[str]:
        """Names with at least one loaded version, sorted."""
        return sorted(name for name, entry in self.entries.items() if entry.served)

    @property
    def all_model_names(self) -> list[str]:
        """Every name found in the repository (loaded or not), sorted."""
        return sorted(self.entries)

    @property
    def all_loaded(self) -> bool:
        """True once start has finished and every model of the repository has a loaded version, until
        draining begins; False while starting, while some model has no version that loaded, and while
        draining. (A version that failed while another version of its model serves does not count.)"""
        return (
            bool(self.default_model)
            and not self.draining
            and not self.unavailable
            and all(entry.served for entry in self.entries.values())
        )

    def is_ready(self, name: str, version: str) -> bool:
        """Whether model `name` version `version` ('' = latest loaded) would accept a request now: False
        for an unknown, unloaded or failed one and while draining. A malformed name or version raises
        InvalidRequest (as resolve() does)."""
        try:
            self.resolve(name, version)
        except (ModelNotFound, ModelLoadError, Unavailable):
            return False
        return True

    def served_versions(self) -> list[ServedVersion]:
        """Every loaded version, by name then version."""
        return [
            entry.served[version] for name, entry in sorted(self.entries.items()) for version in sorted(entry.served)
        ]

    def resolve(self, name: str, version: str) -> ServedVersion:
        """The loaded version for a request's model and version fields ('' = default model / latest loaded).

        Raises InvalidRequest for a malformed name or version (checked before anything else; nothing
        here touches the filesystem), ModelNotFound for an unknown one, ModelLoadError for a version
        that failed to load, Unavailable while draining.
        """
        served = self._pick(name, version)[1]
        if self.draining:
            raise Unavailable(f"the server is shutting down; model {served.label} accepts no new requests")
        if self.unavailable:
            raise Unavailable(f"model {served.label} accepts no requests now: {self.unavailable}")
        return served

    def describe(self, name: str, version: str) -> ModelDescription:
        """GetModel: one version ('' = default model / latest loaded); same errors as resolve(), except
        that it still answers while draining (with ready=False)."""
        entry, served = self._pick(name, version)
        return self._description(entry, served)

    def describe_all(self) -> list[ModelDescription]:
        """ListModels: the latest loaded version of every model with one, by name."""
        return [self._description(entry, entry.latest) for _, entry in sorted(self.entries.items()) if entry.latest]

    def _pick(self, name: str, version: str) -> tuple[ModelEntry, ServedVersion]:
        """The one place a request's (name, version) becomes a served version; the errors say why not."""
        entry, name = self._entry(name)
        if not version:
            if entry.latest is None:
                raise ModelLoadError(f"model {name} has no loaded version: {self._failure_text(entry)}")
            return entry, entry.latest
        number = self._version_number(version)
        served = entry.served.get(number)
        if served is None:
            raise self._version_error(name, number, entry)
        return entry, served

    def _entry(self, name: str) -> tuple[ModelEntry, str]:
        name = name or self.default_model
        if not name:
            raise Unavailable("the server has not finished loading its models")
        if not is_valid_model_name(name):
            shown = name if len(name) <= 80 else name[:77] + "..."
            raise InvalidRequest(
                f"model name {shown!r} is not valid: use letters, digits, '_', '.', '-' (at most 64, "
                "starting with a letter or digit, no '..')"
            )
        entry = self.entries.get(name)
        if entry is None:
            raise ModelNotFound(
                f"model {name!r} not found; available models: {', '.join(self.all_model_names) or 'none'}"
            )
        return entry, name

    @staticmethod
    def _version_number(version: str) -> int:
        if not is_valid_version(version):
            shown = version if len(version) <= 20 else version[:17] + "..."
            raise InvalidRequest(
                f"model version {shown!r} is not valid: use a positive integer, or leave it empty for the latest"
            )
        return int(version)

    def _version_error(self, name: str, number: int, entry: ModelEntry) -> Exception:
        loaded = ", ".join(str(v) for v in sorted(entry.served)) or "none"
        if number in entry.failures:
            return ModelLoadError(f"model {name} version {number} failed to load: {entry.failures[number]}")
        if number in entry.versions_on_disk:
            return ModelNotFound(
                f"model {name} version {number} is in the repository but not loaded (loaded: {loaded}; "
                f"the server loads the newest {self.loaded_versions} versions, see --loaded-versions)"
            )
        return ModelNotFound(f"model {name} has no version {number}; loaded versions: {loaded}")

    @staticmethod
    def _failure_text(entry: ModelEntry) -> str:
        return "; ".join(f"version {v}: {why}" for v, why in sorted(entry.failures.items())) or "none selected"

    def _description(self, entry: ModelEntry, served: ServedVersion) -> ModelDescription:
        document = served.model.document
        task, limits = document.task, document.limits
        return ModelDescription(
            name=served.name,
            version=served.version,
            versions=entry.versions_on_disk,
            loaded_versions=tuple(sorted(entry.served)),
            ready=not (self.draining or self.unavailable),
            attention=str(document.architecture.get("attention") or ""),
            architecture=_scalars_as_text(document.architecture),
            task_kind=str(task.get("kind") or ""),
            task_description=str(task.get("description") or ""),
            source_languages=tuple(str(language) for language in task.get("source_languages") or ()),
            target_language=str(task.get("target_language") or ""),
            test_metrics=_numbers(document.metrics.get("test")),
            provider=served.model.provider,
            max_source_tokens=limits.max_source_tokens,
            max_target_tokens=limits.max_target_tokens,
            top_k=limits.top_k,
            is_default=served.name == self.default_model,
            load_seconds=served.model.load_seconds,
        )


def _scalars_as_text(values: dict[str, Any]) -> dict[str, str]:
    """Scalar entries as text (booleans as 'true'/'false'); nulls and nested values left out."""
    text: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, bool):
            text[str(key)] = "true" if value else "false"
        elif isinstance(value, (str, int, float)):
            text[str(key)] = str(value)
    return text


def _numbers(values: Any) -> dict[str, float]:
    if not isinstance(values, dict):
        return {}
    return {
        str(key): float(value)
        for key, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
