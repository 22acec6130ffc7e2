"""The model manager: which model versions the server serves, and looking one up by name and version.

At start it discovers the repository once, loads the newest `settings.loaded_versions` versions of
every model (0 = all), warms each up and starts one engine Scheduler per version. After that, every
lookup works on the in-memory tables only: a client-supplied name is checked against the strict
model-name pattern first and is never turned into a path.

Loading and warm-up are blocking onnxruntime calls; they run in a worker thread so the event loop
(and the health service) stays responsive while a large repository loads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.engine.scheduler import BatchingPolicy, EngineLimits, Scheduler
from service.errors import InvalidRequest, ModelLoadError, ModelNotFound, Unavailable
from service.metrics import ServerMetrics
from service.runtime.model import LoadedModel, load_model
from service.runtime.repository import discover, is_valid_model_name, is_valid_version, version_directory
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ServedVersion:
    """One loaded model version and the scheduler that decodes with it."""

    name: str
    version: int
    model: LoadedModel
    scheduler: Scheduler

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
class _ModelEntry:
    versions_on_disk: tuple[int, ...]
    served: dict[int, ServedVersion] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)  # version -> why it did not load


class ModelManager:
    """Loads the repository's models and resolves (name, version) to a ServedVersion.

    Use on the event-loop thread: `await start()`, lookups, `await stop(grace_s)`.
    `only` restricts loading to these model names (the offline client loads a single model).
    """

    def __init__(
        self,
        settings: Settings,
        metrics: ServerMetrics | None = None,
        *,
        only: Collection[str] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._only = set(only) if only is not None else None
        self._models: dict[str, _ModelEntry] = {}
        self._default = ""
        self._draining = False
        self._started = False

    # ----- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Discover, load, warm up and start every selected version. Raises ModelLoadError when the
        repository holds no model, or when not a single version loaded (ModelNotFound when `only`
        names none of the repository's models); a version that fails to load is
        logged and reported as not ready, and the others are served."""
        if self._started:
            raise RuntimeError("ModelManager.start() was already called")
        self._started = True
        root = self.settings.model_repository
        found = await asyncio.to_thread(discover, root)
        if self._only is not None:
            selected = {name: versions for name, versions in found.items() if name in self._only}
            if found and not selected:
                raise ModelNotFound(
                    f"no model named {', '.join(sorted(self._only))} in {root}; available models: {', '.join(sorted(found))}"
                )
            found = selected
        if not found:
            wanted = f" named {sorted(self._only)}" if self._only else ""
            raise ModelLoadError(f"no models{wanted} in the model repository {root} (expected NAME/VERSION/model.json)")
        keep = self.settings.loaded_versions
        for name, versions in sorted(found.items()):
            entry = _ModelEntry(versions_on_disk=tuple(versions))
            self._models[name] = entry
            for version in (versions if keep == 0 else versions[-keep:]):
                await self._load(name, version, entry)
        if not any(entry.served for entry in self._models.values()):
            failures = "; ".join(
                f"{name} version {version}: {why}" for name, entry in self._models.items() for version, why in entry.failures.items()
            )
            raise ModelLoadError(f"no model version could be loaded from {root}: {failures}")
        self._default = self._choose_default()

    async def _load(self, name: str, version: int, entry: _ModelEntry) -> None:
        directory = version_directory(self.settings.model_repository, name, version)
        started = time.monotonic()
        try:
            model = await asyncio.to_thread(
                load_model,
                directory,
                provider=self.settings.provider,
                intra_op_threads=self.settings.intra_op_threads,
                inter_op_threads=self.settings.inter_op_threads,
            )
            if model.config.name != name or model.config.version != version:
                log.warning(
                    "%s: model.json says name %r version %s; serving it as %s version %s (its folder)",
                    directory, model.config.name, model.config.version, name, version,
                )
            await asyncio.to_thread(model.warm_up)
        except ModelLoadError as error:
            entry.failures[version] = error.message
            log.error("model %s version %s is not served: %s", name, version, error.message)
            return
        except Exception as error:  # onnxruntime or tokenizer errors during warm-up: same outcome, plus a trace
            entry.failures[version] = f"{type(error).__name__}: {error}"
            log.exception("model %s version %s is not served: loading or warm-up failed", name, version)
            return
        recorder = self.metrics.recorder(name, str(version)) if self.metrics is not None else None
        scheduler = Scheduler(
            model.step_model,
            limits=EngineLimits(
                max_active_hypotheses=self.settings.max_active_hypotheses,
                max_padded_source_tokens=self.settings.max_padded_source_tokens,
                max_waiting_requests=self.settings.max_waiting_requests,
                batch_size=self.settings.batch_size,
                batch_delay_s=self.settings.batch_delay_ms / 1000.0,
            ),
            policy=BatchingPolicy(self.settings.batching),
            recorder=recorder,
            name=name,
            version=str(version),
        )
        await scheduler.start()
        entry.served[version] = ServedVersion(name, version, model, scheduler)
        if self.metrics is not None:
            self.metrics.model_loaded(name, str(version), model.provider, model.load_seconds)
            self.metrics.watch_queue(name, str(version), scheduler)
        log.info(
            "loaded model %s version %s on %s in %.2f s (ready after %.2f s with warm-up)",
            name, version, model.provider, model.load_seconds, time.monotonic() - started,
        )

    def _choose_default(self) -> str:
        configured = self.settings.default_model
        if configured:
            entry = self._models.get(configured)
            if entry is None or not entry.served:
                available = ", ".join(self.model_names) or "none"
                raise ModelLoadError(f"default_model={configured} is not a loaded model (loaded: {available})")
            return configured
        return self.model_names[0]

    def begin_draining(self) -> None:
        """From now on every version reports not ready and new translations raise Unavailable."""
        self._draining = True

    async def stop(self, grace_s: float) -> None:
        """Drain every scheduler (in-flight requests get up to `grace_s` seconds), then stop them."""
        self.begin_draining()
        served = [version for entry in self._models.values() for version in entry.served.values()]
        await asyncio.gather(*(version.scheduler.stop(grace_s) for version in served))
        if self.metrics is not None:
            for version in served:
                self.metrics.unwatch_queue(version.name, str(version.version))

    # ----- lookups ----------------------------------------------------------------------------------

    @property
    def default_model(self) -> str:
        """The model used when a request names none ('' before start)."""
        return self._default

    @property
    def model_names(self) -> list[str]:
        """Names with at least one loaded version, sorted."""
        return sorted(name for name, entry in self._models.items() if entry.served)

    @property
    def all_model_names(self) -> list[str]:
        """Every name found in the repository at start (loaded or not), sorted."""
        return sorted(self._models)

    @property
    def draining(self) -> bool:
        return self._draining

    def served_versions(self) -> list[ServedVersion]:
        """Every loaded version, by name then version."""
        served: list[ServedVersion] = []
        for name in sorted(self._models):
            entry = self._models[name]
            served.extend(entry.served[version] for version in sorted(entry.served))
        return served

    def resolve(self, name: str, version: str) -> ServedVersion:
        """The loaded version for a request's model and version fields ('' = default model / latest loaded).

        Raises InvalidRequest for a malformed name or version (checked before anything else; nothing
        here touches the filesystem), ModelNotFound for an unknown one, ModelLoadError for a version
        that failed to load, Unavailable while draining.
        """
        entry, name = self._entry(name)
        if not version:
            if not entry.served:
                raise ModelLoadError(f"model {name} has no loaded version: {self._failure_text(entry)}")
            served = entry.served[max(entry.served)]
        else:
            number = self._version_number(version)
            served_or_none = entry.served.get(number)
            if served_or_none is None:
                raise self._version_error(name, number, entry)
            served = served_or_none
        if self._draining:
            raise Unavailable(f"the server is shutting down; model {served.label} accepts no new requests")
        return served

    def describe(self, name: str, version: str) -> ModelDescription:
        """GetModel: one version ('' = default model / latest loaded); same errors as resolve(), except
        that it still answers while draining (with ready=False) and describes versions that failed."""
        entry, name = self._entry(name)
        if not version:
            if not entry.served:
                raise ModelLoadError(f"model {name} has no loaded version: {self._failure_text(entry)}")
            return self._description(name, entry, entry.served[max(entry.served)])
        number = self._version_number(version)
        served = entry.served.get(number)
        if served is None:
            raise self._version_error(name, number, entry)
        return self._description(name, entry, served)

    def describe_all(self) -> list[ModelDescription]:
        """ListModels: the latest loaded version of every model with one, by name."""
        return [
            self._description(name, entry, entry.served[max(entry.served)])
            for name, entry in sorted(self._models.items())
            if entry.served
        ]

    def _entry(self, name: str) -> tuple[_ModelEntry, str]:
        name = name or self._default
        if not name:
            raise Unavailable("the server has not finished loading its models")
        if not is_valid_model_name(name):
            shown = name if len(name) <= 80 else name[:77] + "..."
            raise InvalidRequest(
                f"model name {shown!r} is not valid: use letters, digits, '_', '.', '-' (at most 64, "
                "starting with a letter or digit, no '..')"
            )
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(f"model {name!r} not found; available models: {', '.join(self.all_model_names) or 'none'}")
        return entry, name

    @staticmethod
    def _version_number(version: str) -> int:
        if not is_valid_version(version):
            shown = version if len(version) <= 20 else version[:17] + "..."
            raise InvalidRequest(f"model version {shown!r} is not valid: use a positive integer, or leave it empty for the latest")
        return int(version)

    def _version_error(self, name: str, number: int, entry: _ModelEntry) -> Exception:
        loaded = ", ".join(str(v) for v in sorted(entry.served)) or "none"
        if number in entry.failures:
            return ModelLoadError(f"model {name} version {number} failed to load: {entry.failures[number]}")
        if number in entry.versions_on_disk:
            return ModelNotFound(
                f"model {name} version {number} is in the repository but not loaded (loaded: {loaded}; "
                f"the server loads the newest {self.settings.loaded_versions} versions, see --loaded-versions)"
            )
        return ModelNotFound(f"model {name} has no version {number}; loaded versions: {loaded}")

    @staticmethod
    def _failure_text(entry: _ModelEntry) -> str:
        return "; ".join(f"version {v}: {why}" for v, why in sorted(entry.failures.items())) or "none selected"

    def _description(self, name: str, entry: _ModelEntry, served: ServedVersion) -> ModelDescription:
        config = served.model.config
        task = config.task or {}
        return ModelDescription(
            name=name,
            version=served.version,
            versions=entry.versions_on_disk,
            loaded_versions=tuple(sorted(entry.served)),
            ready=not self._draining,
            attention=str(config.architecture.get("attention") or ""),
            architecture=_scalars_as_text(config.architecture),
            task_kind=str(task.get("kind") or ""),
            task_description=str(task.get("description") or ""),
            source_languages=tuple(str(language) for language in task.get("source_languages") or ()),
            target_language=str(task.get("target_language") or ""),
            test_metrics=_numbers(config.metrics.get("test") if isinstance(config.metrics, dict) else None),
            provider=served.model.provider,
            max_source_tokens=config.max_source_tokens,
            max_target_tokens=config.max_target_tokens,
            top_k=config.top_k,
            is_default=name == self._default,
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


def describe_repository_path(path: Path) -> tuple[Path, str | None, str | None]:
    """Split a path given to the offline client into (repository, model name or None, version or None).

    Accepts a repository (`models`), a model folder (`models/dates`) or a version folder
    (`models/dates/1`, the one holding model.json).
    """
    path = Path(path)
    if (path / "model.json").is_file() and is_valid_version(path.name):
        return path.parent.parent, path.parent.name, path.name
    if path.is_dir() and any((child / "model.json").is_file() for child in path.iterdir() if is_valid_version(child.name)):
        return path.parent, path.name, None
    return path, None, None
