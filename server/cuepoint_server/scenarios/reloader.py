"""Hot reload of scenario files: watch the folder, swap the engine's set atomically.

Editing, adding, disabling or removing a scenario file takes effect on live
sessions without a restart. The folder is watched with `watchfiles` (native
change notification, debounced); on a change the whole folder is loaded again
off the event loop, and only a load without problems replaces the serving set,
in one assignment on the event loop (`Engine.swap`), so a batch is evaluated
wholly against the old set or wholly against the new one. A broken edit is
logged issue by issue (file, line, field), remembered in `last_error`, and the
previous version keeps serving.

Per-device state (context, event history) lives in `DeviceState` and survives
swaps. History is trimmed as events arrive, by the retention of the set
serving at that moment: a newly added scenario that needs a longer window (or
an event no earlier scenario listened to) sees only what the old set kept,
and its window fills up from the swap on.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
from watchfiles import DefaultFilter, awatch

from ..clock import Clock, SystemClock
from ..engine.engine import Engine
from ..engine.scenario_set import ScenarioSet
from .loader import ScenarioError, ScenarioIssue, scenario_files

__all__ = ["ReloadFailure", "ReloadResult", "ScenarioReloader", "ScenarioVersion", "folder_digest"]

log = structlog.get_logger("cuepoint.scenarios.reload")

# watchfiles yields once the folder has been quiet for STEP_MS, and at the
# latest DEBOUNCE_MS after the first change of a burst: an edit lands well
# within a second, and an editor's save-as-several-writes is one reload.
STEP_MS = 50
DEBOUNCE_MS = 400
# After the watcher itself fails (e.g. the folder was replaced), retry this often.
RETRY_SECONDS = 1.0


def folder_digest(directory: str | Path) -> str:
    """SHA-256 over the scenario files' relative paths and contents, in sorted order."""
    root = Path(directory)
    digest = hashlib.sha256()
    if not root.is_dir():
        return digest.hexdigest()
    for path in scenario_files(root):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError as exc:  # vanished between listing and reading
            digest.update(repr(exc).encode())
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class ScenarioVersion:
    """The set currently serving. `number` counts applied loads, from 1 at start-up."""

    number: int
    digest: str
    scenarios: int
    enabled: int
    loaded_at: float

    @property
    def short(self) -> str:
        return self.digest[:12]


@dataclass(frozen=True, slots=True)
class ReloadFailure:
    """The last rejected load: what was wrong, and with which folder content."""

    digest: str
    issues: tuple[ScenarioIssue, ...]
    at: float

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)


@dataclass(frozen=True, slots=True)
class ReloadResult:
    # applied: a new version serves; unchanged: the files are what already
    # serves; rejected: the files have problems and the old version serves.
    status: Literal["applied", "unchanged", "rejected"]
    version: ScenarioVersion
    issues: tuple[ScenarioIssue, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    # Scenarios in both versions whose `enabled` changed.
    enabled: tuple[str, ...] = ()
    disabled: tuple[str, ...] = ()


def _counts(scenarios: ScenarioSet) -> tuple[int, int]:
    return len(scenarios.scenarios), sum(1 for s in scenarios.scenarios if s.enabled)


class ScenarioReloader:
    """Keeps `engine`'s scenario set in step with the files in `directory`."""

    def __init__(
        self,
        engine: Engine,
        directory: str | Path,
        *,
        clock: Clock | None = None,
        step_ms: int = STEP_MS,
        debounce_ms: int = DEBOUNCE_MS,
    ) -> None:
        self.engine = engine
        self.directory = str(directory)
        self.clock: Clock = clock or SystemClock()
        self.step_ms = step_ms
        self.debounce_ms = debounce_ms
        # Version 1 is what the engine serves now (loaded from this folder at start-up).
        total, enabled = _counts(engine.scenarios)
        self.version = ScenarioVersion(1, folder_digest(self.directory), total, enabled, self.clock.now())
        self.last_error: ReloadFailure | None = None
        # Called on the event loop right after each swap with (old, new), e.g.
        # to re-arm per-device timers for the new set's time-driven scenarios.
        self.swap_listeners: list[Callable[[ScenarioSet, ScenarioSet], None]] = []
        # Called after every reload attempt with (result, reason, version serving before), e.g. to audit it.
        self.result_listeners: list[Callable[[ReloadResult, str, ScenarioVersion], None]] = []
        self._lock = asyncio.Lock()
        self._changed = asyncio.Condition()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def watching(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self, *, watch: bool = True) -> None:
        """Start watching the folder (when `watch`); reload_now() works either way."""
        if not watch or self._task is not None:
            return
        self._stop.clear()
        self._task = asyncio.create_task(self._watch(), name=f"cuepoint-watch:{self.directory}")
        # One turn of the loop runs the task up to its first wait, by which
        # time watchfiles has registered the folder; then catch any change
        # made between the initial load and now.
        await asyncio.sleep(0)
        await self.reload_now(reason="watch-start")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        try:
            # watchfiles checks the stop event every step; cancel if it is stuck.
            await asyncio.wait_for(task, timeout=2.0)
        except TimeoutError:
            log.warning("scenarios.watch_stop_timeout", directory=self.directory)
        except Exception:
            log.exception("scenarios.watch_failed", directory=self.directory)

    async def wait_until(self, predicate: Callable[[ScenarioReloader], bool]) -> None:
        """Wait until `predicate(self)` holds; checked again after every reload attempt.

        E.g. `await reloader.wait_until(lambda r: r.version.number > 3)`, in an
        `asyncio.timeout()` block.
        """
        async with self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def reload_now(self, *, reason: str = "explicit") -> ReloadResult:
        """Load the folder again; apply it when it is valid and differs from what serves."""
        before = self.version
        result = await self._reload(reason)
        for listener in self.result_listeners:
            try:
                listener(result, reason, before)
            except Exception:
                log.exception("scenarios.result_listener_failed", directory=self.directory)
        async with self._changed:
            self._changed.notify_all()
        return result

    async def _reload(self, reason: str) -> ReloadResult:
        async with self._lock:
            current = self.version
            try:
                digest, loaded = await asyncio.to_thread(self._read, current.digest)
            except ScenarioError as exc:
                return self._reject(exc.digest if isinstance(exc, _DigestedError) else "", exc.issues, reason)
            except Exception as exc:  # a loader bug must not kill the watcher or the old set
                log.exception("scenarios.reload_crashed", directory=self.directory, reason=reason)
                issue = ScenarioIssue(self.directory, 1, "", f"unexpected error while loading: {exc!r}")
                return self._reject("", [issue], reason)
            if loaded is None:
                if self.last_error is not None:
                    log.info(
                        "scenarios.reload_recovered",
                        version=current.number,
                        digest=current.short,
                        reason=reason,
                    )
                self.last_error = None
                return ReloadResult("unchanged", current)
            return self._apply(digest, loaded, reason)

    # -- internals --------------------------------------------------------

    def _read(self, current_digest: str) -> tuple[str, ScenarioSet | None]:
        """Off the loop: digest, then load; retried while files change underneath."""
        before = folder_digest(self.directory)
        loaded: ScenarioSet | None = None
        for _ in range(3):
            if before == current_digest:
                return before, None
            try:
                loaded = ScenarioSet.load(self.directory)
            except ScenarioError as exc:
                raise _DigestedError(exc.issues, before) from None
            after = folder_digest(self.directory)
            if after == before:
                return before, loaded
            before = after
        # Still churning: apply what we read; the watcher reports the rest.
        return before, loaded

    def _apply(self, digest: str, scenarios: ScenarioSet, reason: str) -> ReloadResult:
        old = self.engine.scenarios
        old_ids = set(old.by_id)
        self.engine.swap(scenarios)  # one assignment: atomic for the event loop
        for listener in self.swap_listeners:
            try:
                listener(old, scenarios)
            except Exception:
                log.exception("scenarios.swap_listener_failed", directory=self.directory)
        total, enabled = _counts(scenarios)
        self.version = ScenarioVersion(self.version.number + 1, digest, total, enabled, self.clock.now())
        self.last_error = None
        added = tuple(sorted(set(scenarios.by_id) - old_ids))
        removed = tuple(sorted(old_ids - set(scenarios.by_id)))
        kept = [(old.by_id[i].enabled, scenarios.by_id[i].enabled, i) for i in sorted(old_ids & set(scenarios.by_id))]
        switched_on = tuple(i for was, now, i in kept if now and not was)
        switched_off = tuple(i for was, now, i in kept if was and not now)
        log.info(
            "scenarios.reloaded",
            directory=self.directory,
            version=self.version.number,
            digest=self.version.short,
            scenarios=total,
            enabled=enabled,
            added=list(added),
            removed=list(removed),
            reason=reason,
        )
        return ReloadResult(
            "applied", self.version, added=added, removed=removed, enabled=switched_on, disabled=switched_off
        )

    def _reject(self, digest: str, issues: list[ScenarioIssue], reason: str) -> ReloadResult:
        self.last_error = ReloadFailure(digest, tuple(issues), self.clock.now())
        for issue in issues:
            log.warning(
                "scenarios.reload_issue",
                file=issue.file,
                line=issue.line,
                field=issue.field,
                message=issue.message,
            )
        log.warning(
            "scenarios.reload_rejected",
            directory=self.directory,
            problems=len(issues),
            serving_version=self.version.number,
            serving_digest=self.version.short,
            reason=reason,
        )
        return ReloadResult("rejected", self.version, issues=tuple(issues))

    async def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                async for changes in awatch(
                    self.directory,
                    watch_filter=DefaultFilter(),
                    debounce=self.debounce_ms,
                    step=self.step_ms,
                    stop_event=self._stop,
                ):
                    log.debug("scenarios.changed", directory=self.directory, paths=len(changes))
                    await self.reload_now(reason="file-change")
            except Exception:
                log.exception("scenarios.watch_failed", directory=self.directory)
                try:
                    await asyncio.wait_for(self._stop.wait(), RETRY_SECONDS)
                except TimeoutError:
                    await self.reload_now(reason="watch-restart")


class _DigestedError(ScenarioError):
    """A ScenarioError carrying the digest of the folder content it describes."""

    def __init__(self, issues: list[ScenarioIssue], digest: str) -> None:
        super().__init__(issues)
        self.digest = digest
