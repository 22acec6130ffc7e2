"""The model manager: keeps the registry (service/registry.py) in step with the model repository.

At start it discovers the repository, loads the newest `settings.loaded_versions` versions of every
model (0 = all) that load, warms each up and starts one AsyncEngine per version. Lookups go to the
registry, which holds in-memory tables only; the engines are the manager's (`engine()`), and what uses them
is an engine client (service/engine_client/) or the engine process's server (service/ipc/engine_server.py).

Hot reload: every `settings.repository_poll_seconds` the repository is scanned again (a directory
listing, off the request path) and the served versions are reconciled with it. A new version is
loaded and warmed up while the current one keeps serving, then switched to in one step on the event
loop (new requests go to it; requests already queued on the old one finish there), and the old version
is retired: it drains, then its engine stops (after `acknowledge`, when given: the engine process waits
until every front-end process has heard that the version was replaced). A version that fails to load
(corrupt or missing file, mismatched tokenizer, failed warm-up) is logged, counted in
`attnserve_model_load_failures_total` and never served; the versions already serving go on. It is tried
again only when its files change. When the newest versions are removed from disk, the newest remaining one
is loaded (a rollback); the last served version of a model is never dropped because its files disappeared.

Loading and warm-up are blocking onnxruntime calls; they run in a worker thread so the event loop
(and the health service) stays responsive while a large repository loads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path

from service.engine import AsyncEngine
from service.errors import ModelLoadError, ModelNotFound
from service.metrics import ServerMetrics
from service.registry import ModelEntry, ModelEvent, ModelEventKind, ModelRegistry, ServedVersion, notify_listeners
from service.runtime.model import LoadedModel, OnnxStepModel, load_model
from service.runtime.repository import discover, is_valid_version, version_directory
from service.settings import Settings

log = logging.getLogger(__name__)


Fingerprint = tuple[tuple[str, int, int], ...]
"""A version directory's files as (name, size in bytes, mtime in ns): a failed version is retried when it changes."""


def _fingerprint(directory: Path) -> Fingerprint:
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError:
        return ()
    files: list[tuple[str, int, int]] = []
    for entry in entries:
        try:
            status = entry.stat()
        except OSError:
            continue
        files.append((entry.name, status.st_size, status.st_mtime_ns))
    return tuple(files)


class ModelManager:
    """The reconciler: loads the repository's models into `registry` and keeps it in step with the repository.

    Use on the event-loop thread: `await start()`, lookups through `registry` and `engine()`,
    `await stop(grace_s)`. `only` restricts loading to these model names (the offline client loads a single
    model). `acknowledge`, when given, is awaited after a version is retired and before its engine stops
    taking requests (see the module docstring). `loader(directory)` loads a version (default: onnxruntime
    with the settings' provider and threads; tests give one whose step model is a fake). `engines_on_loop`:
    step every engine on the event loop rather than on a worker thread of its own (AsyncEngine.on_loop).
    """

    def __init__(
        self,
        settings: Settings,
        metrics: ServerMetrics | None = None,
        *,
        only: Collection[str] | None = None,
        acknowledge: Callable[[], Awaitable[None]] | None = None,
        loader: Callable[[Path], LoadedModel] | None = None,
        engines_on_loop: bool = False,
    ) -> None:
        self.settings = settings
        self._engines_on_loop = engines_on_loop
        self._loader = loader if loader is not None else self._load_onnx
        self.metrics = metrics
        self._only = set(only) if only is not None else None
        self._acknowledge = acknowledge
        self.registry = ModelRegistry(settings.loaded_versions)
        # Every version's engine, from its load until it stopped (retired versions stay while they drain).
        self._engines: dict[tuple[str, int], AsyncEngine] = {}
        self._started = False
        self._listeners: list[Callable[[ModelEvent], None]] = []
        self._scan_lock = asyncio.Lock()
        self._scan_task: asyncio.Task[None] | None = None
        self._refreshes: set[asyncio.Task[None]] = set()  # scans asked for by refresh_soon(), until they end
        self._retiring: set[asyncio.Task[None]] = set()
        # (name, version) -> its files when it failed: it is tried again only once they change.
        self._failed_fingerprints: dict[tuple[str, int], Fingerprint] = {}
        # Models whose versions all vanished from disk while one still serves (logged once, not every scan).
        self._vanished_warned: set[str] = set()

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
                    f"no model named {', '.join(sorted(self._only))} in {root}; available models: "
                    f"{', '.join(sorted(found))}"
                )
            found = selected
        if not found:
            wanted = f" named {sorted(self._only)}" if self._only else ""
            raise ModelLoadError(f"no models{wanted} in the model repository {root} (expected NAME/VERSION/model.json)")
        entries = []
        for name, versions in sorted(found.items()):
            entry = ModelEntry(versions_on_disk=tuple(versions))
            self.registry.add_model(name, entry)
            await self._reconcile(name, entry)
            entries.append((name, entry))
        if not any(entry.served for _, entry in entries):
            failures = "; ".join(
                f"{name} version {version}: {why}" for name, entry in entries for version, why in entry.failures.items()
            )
            raise ModelLoadError(f"no model version could be loaded from {root}: {failures}")
        self.registry.set_default_model(self._choose_default())
        if self.settings.repository_poll_seconds > 0:
            self._scan_task = asyncio.get_running_loop().create_task(self._scan_loop(), name="repository scan")

    async def _load(self, name: str, version: int, entry: ModelEntry, fingerprint: Fingerprint | None = None) -> bool:
        """Load, warm up and start one version; True when it serves. A failure is recorded in `entry`
        (with the directory's fingerprint, so it is retried only when the files change), logged,
        counted and reported to the listeners."""
        directory = version_directory(self.settings.model_repository, name, version)
        if fingerprint is None:
            fingerprint = await asyncio.to_thread(_fingerprint, directory)
        started = time.monotonic()
        try:
            model = await asyncio.to_thread(self._loader, directory)
            if model.document.name != name or model.document.version != version:
                log.warning(
                    "%s: model.json says name %r version %s; serving it as %s version %s (its folder)",
                    directory,
                    model.document.name,
                    model.document.version,
                    name,
                    version,
                )
            await asyncio.to_thread(model.warm_up)
        except ModelLoadError as error:
            log.error("model %s version %s is not served: %s", name, version, error.message)
            self._record_failure(name, version, entry, error.message, fingerprint)
            return False
        except Exception as error:  # onnxruntime or tokenizer errors during warm-up: same outcome, plus a trace
            log.exception("model %s version %s is not served: loading or warm-up failed", name, version)
            self._record_failure(name, version, entry, f"{type(error).__name__}: {error}", fingerprint)
            return False
        served = ServedVersion(name, version, model)
        engine = AsyncEngine(
            model.step_model,
            limits=self.settings.engine_limits(),
            policy=self.settings.batching,
            recorder=self.metrics.recorder(name, version) if self.metrics is not None else None,
            label=served.label,
            on_loop=self._engines_on_loop,
            encoder_thread=model.threads.encoder_overlap,
        )
        await engine.start()
        self._engines[(name, version)] = engine
        entry.served[version] = served
        if self.metrics is not None:
            self.metrics.model_loaded(name, version, model.provider, model.load_seconds, model.threads)
            self.metrics.watch_queue(name, version, engine)
        log.info(
            "loaded model %s version %s on %s with %s in %.2f s (ready after %.2f s with warm-up)",
            name,
            version,
            model.provider,
            model.threads.describe(),
            model.load_seconds,
            time.monotonic() - started,
        )
        entry.failures.pop(version, None)
        self._failed_fingerprints.pop((name, version), None)
        self._emit(ModelEvent(ModelEventKind.LOADED, name, version))
        return True

    def _load_onnx(self, directory: Path) -> LoadedModel:
        return load_model(
            directory,
            provider=self.settings.provider,
            intra_op_threads=self.settings.intra_op_threads,
            inter_op_threads=self.settings.inter_op_threads,
            spinning=self.settings.onnx_spinning,
            cpus=self.settings.usable_cpus,
            encoder_overlap=self.settings.encoder_overlap,
            tf32=self.settings.cuda_tf32,
        )

    def _record_failure(self, name: str, version: int, entry: ModelEntry, why: str, fingerprint: Fingerprint) -> None:
        entry.failures[version] = why
        self._failed_fingerprints[(name, version)] = fingerprint
        if self.metrics is not None:
            self.metrics.model_load_failed(name, version)
        self._emit(ModelEvent(ModelEventKind.FAILED, name, version, why))

    # ----- hot reload -------------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[ModelEvent], None]) -> None:
        """Call `listener(event)` on the event-loop thread whenever a version loads, fails or retires
        (e.g. the health service marks a model that appeared SERVING). It must not block."""
        self._listeners.append(listener)

    def _emit(self, event: ModelEvent) -> None:
        notify_listeners(self._listeners, event)

    def refresh_soon(self, reason: str) -> None:
        """Scan the repository now, in the background (for SIGHUP); a scan that fails is logged with `reason`."""
        log.info("%s: scanning the model repository", reason)
        task = asyncio.get_running_loop().create_task(self.refresh(), name=f"repository scan ({reason})")
        self._refreshes.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._refreshes.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("the repository scan asked for by %s failed", reason, exc_info=task.exception())

        task.add_done_callback(done)

    async def refresh(self) -> None:
        """Scan the repository now and reconcile what is served with it (the periodic scan calls this).

        For every model on disk: keep serving the newest `loaded_versions` versions that load (0 = all),
        loading and warming up new ones before switching to them, and retire (drain, then stop) the
        versions no longer wanted. New model names are loaded too. Does nothing while draining."""
        async with self._scan_lock:
            if self.registry.draining:
                return
            found = await asyncio.to_thread(discover, self.settings.model_repository)
            if self._only is not None:
                found = {name: versions for name, versions in found.items() if name in self._only}
            for name in sorted(set(found) | set(self.registry.all_model_names)):
                if self.registry.draining:
                    return
                versions = tuple(found.get(name, ()))
                entry = self.registry.entry(name)
                if entry is None:
                    log.info("model %s appeared in the repository with versions %s", name, list(versions))
                    entry = ModelEntry(versions_on_disk=versions)
                    await self._reconcile(name, entry)
                    self.registry.add_model(name, entry)  # only now: until it loaded, the name was simply unknown
                    continue
                entry.versions_on_disk = versions
                await self._reconcile(name, entry)

    async def _reconcile(self, name: str, entry: ModelEntry) -> None:
        """Serve the newest `loaded_versions` versions of `entry.versions_on_disk` that load; retire the rest."""
        keep = self.settings.loaded_versions
        for version in list(entry.failures):
            if version not in entry.versions_on_disk:  # removed from disk: its failure is history
                entry.failures.pop(version, None)
                self._failed_fingerprints.pop((name, version), None)
        wanted: list[int] = []
        for version in sorted(entry.versions_on_disk, reverse=True):
            if keep and len(wanted) >= keep:
                break
            if version in entry.served:
                wanted.append(version)
                continue
            if self.registry.draining:
                return
            directory = version_directory(self.settings.model_repository, name, version)
            fingerprint = await asyncio.to_thread(_fingerprint, directory)
            if version in entry.failures and self._failed_fingerprints.get((name, version)) == fingerprint:
                continue  # still the files that failed; an older version serves instead
            if await self._load(name, version, entry, fingerprint):
                wanted.append(version)
        stale = sorted(version for version in entry.served if version not in wanted)
        if not wanted:
            if stale and name not in self._vanished_warned:
                log.warning(
                    "model %s: no version on disk loads any more; still serving version(s) %s from memory",
                    name,
                    ", ".join(str(version) for version in stale),
                )
                self._vanished_warned.add(name)
            return
        self._vanished_warned.discard(name)
        for version in stale:
            self._retire(entry, entry.served[version])

    def release_unused_memory(self) -> None:
        """Have every engine (retired ones still draining included) give back the memory it holds and does not use:
        what its batch holds beyond its needs, its onnxruntime sessions' arena chunks at their next run
        (service/runtime/memory.py)."""
        for engine in self._engines.values():
            engine.release_unused_memory()
            if isinstance(engine.model, OnnxStepModel):
                engine.model.shrink_arenas_at_next_run()

    def engine(self, name: str, version: int) -> AsyncEngine | None:
        """The engine of a loaded version, or of a retired one until it stopped (None otherwise)."""
        return self._engines.get((name, version))

    def _retire(self, entry: ModelEntry, served: ServedVersion) -> None:
        """Take a version out of the lookup tables now (new requests go to the others) and drain it in
        the background: its queued and running requests finish, then its engine stops."""
        del entry.served[served.version]
        engine = self._engines[(served.name, served.version)]
        log.info(
            "model %s: retiring version %s (serving %s); %d requests in it finish first",
            served.name,
            served.version,
            sorted(entry.served),
            engine.outstanding,
        )
        task = asyncio.get_running_loop().create_task(self._drain_retired(served), name=f"retire {served.label}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        self._emit(ModelEvent(ModelEventKind.RETIRED, served.name, served.version))

    async def _drain_retired(self, served: ServedVersion) -> None:
        if self._acknowledge is not None:
            await self._acknowledge()
        await self._engines[(served.name, served.version)].stop(self.settings.drain_grace_seconds)
        self._forget(served.name, served.version)
        if self.metrics is not None:
            self.metrics.model_unloaded(served.name, served.version)
        log.info("model %s: version %s drained and stopped", served.name, served.version)

    def _forget(self, name: str, version: int) -> None:
        """Drop a stopped engine (idempotent: a stop and a retirement's drain may both end it)."""
        if self._engines.pop((name, version), None) is not None and self.metrics is not None:
            self.metrics.unwatch_queue(name, version)

    async def _scan_loop(self) -> None:
        interval = self.settings.repository_poll_seconds
        while not self.registry.draining:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:  # e.g. the repository is on a volume that went away; try again next time
                log.exception("scanning the model repository failed; trying again in %.1f s", interval)

    def _choose_default(self) -> str:
        configured = self.settings.default_model
        if configured:
            entry = self.registry.entry(configured)
            if entry is None or not entry.served:
                available = ", ".join(self.registry.model_names) or "none"
                raise ModelLoadError(f"default_model={configured} is not a loaded model (loaded: {available})")
            return configured
        return self.registry.model_names[0]

    def begin_draining(self) -> None:
        """From now on every version reports not ready and new translations raise Unavailable."""
        self.registry.begin_draining()

    async def stop(self, grace_s: float) -> None:
        """Drain every engine, retired ones still draining included (in-flight requests get up to `grace_s`
        seconds), then stop them."""
        self.begin_draining()
        if self._scan_task is not None:
            self._scan_task.cancel()  # a load in progress is abandoned: its version was never served
            await asyncio.gather(self._scan_task, return_exceptions=True)
        engines = dict(self._engines)
        await asyncio.gather(*(engine.stop(grace_s) for engine in engines.values()))
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for name, version in engines:
            self._forget(name, version)


def describe_repository_path(path: Path) -> tuple[Path, str | None, str | None]:
    """Split a path given to the offline client into (repository, model name or None, version or None).

    Accepts a repository (`models`), a model folder (`models/dates`) or a version folder
    (`models/dates/1`, the one holding model.json).
    """
    path = Path(path)
    if (path / "model.json").is_file() and is_valid_version(path.name):
        return path.parent.parent, path.parent.name, path.name
    if path.is_dir() and any(
        (child / "model.json").is_file() for child in path.iterdir() if is_valid_version(child.name)
    ):
        return path.parent, path.name, None
    return path, None, None
