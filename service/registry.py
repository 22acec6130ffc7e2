"""The registry: which model versions a process serves now, and looking one up by a request's name and version.

It holds in-memory tables only, changed through its methods by one writer per process: the model manager
(service/models.py) in the process that decodes, the socket client (service/engine_client/socket_client.py)
in a front-end process, which applies the engine process's reports. A client-supplied name is checked
against the strict model-name pattern first and is never turned into a path. Use on the event-loop thread.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec

from service.errors import InvalidRequest, ModelLoadError, ModelNotFound, Unavailable
from service.runtime.model_format import ModelDocument
from service.runtime.repository import is_valid_model_name, is_valid_version
from service.runtime.tokenizers import Tokenizer

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class ServedVersion:
    """One loaded model version: its name, number and what the dataplane reads of it (document, tokenizers)."""

    name: str
    version: int
    model: ServedModel

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


# ----- what a front-end process learns of the served versions -------------------------------------------------


class ServedVersionReport(msgspec.Struct, array_like=True):
    """One loaded version, as the engine process reports it: a front-end reads its model.json and tokenizers
    from `directory`."""

    version: int
    directory: str
    provider: str
    load_seconds: float


class ModelReport(msgspec.Struct, array_like=True):
    """One model name's ModelEntry, as the engine process reports it."""

    name: str
    versions_on_disk: list[int]
    served: list[ServedVersionReport]
    failures: dict[int, str]


class RegistryReport(msgspec.Struct, array_like=True):
    """Everything a registry serves, as a front-end process needs it to fill its own (ModelRegistry.report)."""

    default_model: str
    draining: bool
    models: list[ModelReport]


LoadTextSide = Callable[[str, ServedVersionReport], ServedModel]
"""Loads a reported version's text side (model.json and tokenizers); raises ModelLoadError."""


class ModelEventKind(enum.Enum):
    """What happened to a model version."""

    LOADED = "loaded"
    """Loaded, warmed up and serving (at start or by a repository scan)."""
    RETIRED = "retired"
    """Taken out of service by a repository scan (replaced or removed); it drains its requests."""
    FAILED = "failed"
    """A load attempt failed; the version is not served."""


@dataclass(frozen=True)
class ModelEvent:
    """A change in what the manager serves, given to listeners on the event-loop thread.
    `detail`: why a load failed ('' otherwise)."""

    kind: ModelEventKind
    name: str
    version: int
    detail: str = ""


def notify_listeners(listeners: list[Callable[[ModelEvent], None]], event: ModelEvent) -> None:
    """Give `event` to every listener; one that raises is logged and the others still hear of it (a broken
    listener must not stop a reload half-way)."""
    for listener in listeners:
        try:
            listener(event)
        except Exception:
            log.exception("model event listener failed on %s", event)


class ModelRegistry:
    """Resolves (name, version) to a ServedVersion and describes what is served.

    `loaded_versions` is only quoted in messages (how many of each model's newest versions the server loads).
    """

    def __init__(self, loaded_versions: int) -> None:
        self.loaded_versions = loaded_versions
        self._entries: dict[str, ModelEntry] = {}
        self._default_model = ""  # the model used when a request names none; '' until the first load finished
        self._draining = False
        # Why no model accepts requests now although versions are loaded ('' = they do): a front-end process
        # sets it while it has no connection to the engine process.
        self._unavailable = ""

    # ----- reading ----------------------------------------------------------------------------------

    @property
    def default_model(self) -> str:
        return self._default_model

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def unavailable(self) -> str:
        return self._unavailable

    @property
    def model_names(self) -> list[str]:
        """Names with at least one loaded version, sorted."""
        return sorted(name for name, entry in self._entries.items() if entry.served)

    @property
    def all_model_names(self) -> list[str]:
        """Every name found in the repository (loaded or not), sorted."""
        return sorted(self._entries)

    def entry(self, name: str) -> ModelEntry | None:
        """The entry of a model name (None when unknown). The writer may change it through its methods."""
        return self._entries.get(name)

    @property
    def all_loaded(self) -> bool:
        """True once start has finished and every model of the repository has a loaded version, until
        draining begins; False while starting, while some model has no version that loaded, and while
        draining. (A version that failed while another version of its model serves does not count.)"""
        return (
            bool(self._default_model)
            and not self._draining
            and not self._unavailable
            and all(entry.served for entry in self._entries.values())
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
            entry.served[version] for name, entry in sorted(self._entries.items()) for version in sorted(entry.served)
        ]

    def resolve(self, name: str, version: str) -> ServedVersion:
        """The loaded version for a request's model and version fields ('' = default model / latest loaded).

        Raises InvalidRequest for a malformed name or version (checked before anything else; nothing
        here touches the filesystem), ModelNotFound for an unknown one, ModelLoadError for a version
        that failed to load, Unavailable while draining.
        """
        served = self._pick(name, version)[1]
        if self._draining:
            raise Unavailable(f"the server is shutting down; model {served.label} accepts no new requests")
        if self._unavailable:
            raise Unavailable(f"model {served.label} accepts no requests now: {self._unavailable}")
        return served

    def describe(self, name: str, version: str) -> ModelDescription:
        """GetModel: one version ('' = default model / latest loaded); same errors as resolve(), except
        that it still answers while draining (with ready=False)."""
        entry, served = self._pick(name, version)
        return self._description(entry, served)

    def describe_all(self) -> list[ModelDescription]:
        """ListModels: the latest loaded version of every model with one, by name."""
        return [self._description(entry, entry.latest) for _, entry in sorted(self._entries.items()) if entry.latest]

    def report(self) -> RegistryReport:
        """What is served now, for a front-end process (apply_report)."""
        return RegistryReport(
            default_model=self._default_model,
            draining=self._draining,
            models=[
                ModelReport(
                    name=name,
                    versions_on_disk=list(entry.versions_on_disk),
                    served=[
                        ServedVersionReport(
                            version, str(served.model.directory), served.model.provider, served.model.load_seconds
                        )
                        for version, served in sorted(entry.served.items())
                    ],
                    failures=dict(entry.failures),
                )
                for name, entry in sorted(self._entries.items())
            ],
        )

    # ----- writing (one writer per process) ---------------------------------------------------------

    def add_model(self, name: str, entry: ModelEntry) -> None:
        """Make a model name known (with the versions loaded into `entry` so far)."""
        self._entries[name] = entry

    def set_default_model(self, name: str) -> None:
        self._default_model = name

    def begin_draining(self) -> None:
        """From now on every version reports not ready and new translations raise Unavailable."""
        self._draining = True

    def set_unavailable(self, why: str) -> None:
        """Refuse every request with Unavailable(`why`) until called with '' (the engine process is away)."""
        self._unavailable = why

    def apply_report(self, report: RegistryReport, load: LoadTextSide) -> list[ServedVersion]:
        """Become what `report` says is served (a front-end process following the engine process). Versions
        already held from the same directory are kept; new ones are loaded with `load`, and one that fails
        to load is recorded as failed. Returns the newly served versions."""
        added: list[ServedVersion] = []
        entries: dict[str, ModelEntry] = {}
        for model in report.models:
            previous = self._entries.get(model.name)
            entry = ModelEntry(versions_on_disk=tuple(model.versions_on_disk), failures=dict(model.failures))
            for reported in model.served:
                known = previous.served.get(reported.version) if previous is not None else None
                if known is not None and str(known.model.directory) == reported.directory:
                    entry.served[reported.version] = known
                    continue
                try:
                    served = ServedVersion(model.name, reported.version, load(model.name, reported))
                except ModelLoadError as error:
                    entry.failures[reported.version] = error.message
                    continue
                entry.served[reported.version] = served
                added.append(served)
            entries[model.name] = entry
        self._entries = entries
        self._default_model = report.default_model
        self._draining = self._draining or report.draining
        return added

    # ----- lookups ------------------------------------------------------------------------------------

    def _pick(self, name: str, version: str) -> tuple[ModelEntry, ServedVersion]:
        """The one place a request's (name, version) becomes a served version; the errors say why not."""
        entry, name = self._named_entry(name)
        if not version:
            if entry.latest is None:
                raise ModelLoadError(f"model {name} has no loaded version: {self._failure_text(entry)}")
            return entry, entry.latest
        number = self._version_number(version)
        served = entry.served.get(number)
        if served is None:
            raise self._version_error(name, number, entry)
        return entry, served

    def _named_entry(self, name: str) -> tuple[ModelEntry, str]:
        name = name or self._default_model
        if not name:
            raise Unavailable("the server has not finished loading its models")
        if not is_valid_model_name(name):
            shown = name if len(name) <= 80 else name[:77] + "..."
            raise InvalidRequest(
                f"model name {shown!r} is not valid: use letters, digits, '_', '.', '-' (at most 64, "
                "starting with a letter or digit, no '..')"
            )
        entry = self._entries.get(name)
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
            ready=not (self._draining or self._unavailable),
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
            is_default=served.name == self._default_model,
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
