"""The runtime: opens the four backends, runs the chosen roles in one asyncio loop, stops
them gracefully.

Every backend is an async context manager owned here; every role is a coroutine
``run(runtime, stop)`` that returns once ``stop`` is set and its in-flight work is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any, TypeVar

from dicomcloud.backends import backend_class
from dicomcloud.config import Settings
from dicomcloud.ingest import Ingestor
from dicomcloud.ports import Cache, Index, Queue, Storage
from dicomcloud.processes import RoleProcesses

_R = TypeVar("_R")

log = logging.getLogger(__name__)

RoleMain = Callable[["Runtime", asyncio.Event], Awaitable[None]]
_ROLE_MODULES = {
    "scp": "dicomcloud.roles.scp",
    "consumer": "dicomcloud.roles.consumer",
    "web": "dicomcloud.roles.web",
    "worker": "dicomcloud.roles.worker",
}


class Runtime:
    """Backends of one process, shared by its roles."""

    index: Index
    queue: Queue
    cache: Cache
    storage: Storage
    ingestor: Ingestor

    def __init__(self, settings: Settings, listening: Any = None) -> None:
        self.settings = settings
        self._stack = AsyncExitStack()
        #: Set (a multiprocessing.Event) once this process's listener accepts connections.
        self._listening = listening
        #: Extra readiness checks for /readyz, e.g. "the DIMSE listener processes are up".
        self.readiness: list[Callable[[], str | None]] = []

    async def __aenter__(self) -> Runtime:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.storage = await self._open("storage", s.resolved_storage_url, fsync=s.fsync)
            self.queue = await self._open("queue", s.resolved_queue_url)
            # The index (migrated here, before any role process starts) serves C-FIND too;
            # a DIMSE listener process needs no cache.
            self.index = await self._open("index", s.resolved_index_url)
            if set(s.roles) - {"scp"}:
                self.cache = await self._open("cache", s.resolved_cache_url)
        except BaseException:
            await self._stack.aclose()
            raise
        self.ingestor = Ingestor(self.storage, self.queue, s.node_id)
        return self

    async def _open(self, port: str, url: str, **kwargs: Any) -> Any:
        backend = backend_class(port, url)(url, **kwargs)
        return await self._stack.enter_async_context(backend)

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    @property
    def cache_shared(self) -> bool:
        """True when other processes see this cache (not the in-process one)."""
        return not self.settings.resolved_cache_url.startswith("memory:")

    def mark_listening(self) -> None:
        """Tell a supervising process that this one's listener is up."""
        if self._listening is not None:
            self._listening.set()

    def not_ready(self) -> list[str]:
        """Reasons this process is not ready yet (empty when ready)."""
        return [reason for check in self.readiness if (reason := check())]

    async def generation(self, tenant_id: str) -> str | None:
        """Version of a tenant's index content, bumped by the consumer (cache keys).

        An absent counter (a new or restarted cache, or one flushed after an outage)
        starts from the clock in nanoseconds, never from 0: a result computed before the
        loss and stored under an old number can then never match a later number."""
        key = f"gen:{tenant_id}"
        value = await self.cache.get(key)
        if value:
            return value.decode()
        await self.cache.set(key, str(time.time_ns()).encode())
        value = await self.cache.get(key)
        return value.decode() if value else None  # the cache is away

    async def bump_generation(self, tenant_id: str) -> None:
        """Invalidate cached query results of a tenant."""
        await self.cache.incr(f"gen:{tenant_id}")


def role_main(role: str) -> RoleMain:
    """The ``run`` coroutine of a role (imported on demand)."""
    module = importlib.import_module(_ROLE_MODULES[role])
    main: RoleMain = module.run
    return main


def run_loop(main: Coroutine[Any, Any, _R]) -> _R:
    """Run ``main`` on uvloop where it exists (its transports cost about a tenth less CPU
    per DICOMweb response than asyncio's selector loop), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # Windows
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def serve(settings: Settings, *, stop: asyncio.Event | None = None,
                on_ready: Callable[[], None] | None = None,
                parent_pid: int | None = None, listening: Any = None) -> None:
    """Run ``settings.roles`` until SIGTERM/SIGINT (or ``stop``), then drain and exit.

    With ``scp.processes`` / ``web.processes`` above 0 those roles run in that many
    processes of their own (``dicomcloud.processes``), supervised by this one.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, _request_stop, stop, sig)
    roles = list(settings.roles)
    groups: dict[str, RoleProcesses] = {}
    for role in ("scp", "web"):  # the roles that may run in processes of their own
        count = getattr(settings, role).processes
        if role in roles and count > 0:
            roles.remove(role)
            groups[role] = RoleProcesses(settings, role, count)
    async with Runtime(settings, listening) as runtime:
        for group_ in groups.values():
            runtime.readiness.append(group_.not_ready)
        mains = [role_main(role) for role in roles]
        log.info("dicomcloud starting roles %s (data in %s)", ",".join(settings.roles),
                 settings.data_dir.resolve())
        async with asyncio.TaskGroup() as group:
            for role, main in zip(roles, mains, strict=True):
                group.create_task(_guard(role, main, runtime, stop), name=f"role-{role}")
            for role, processes in groups.items():
                after = groups.get("scp") if role == "web" else None
                group.create_task(processes.run(stop, after), name=f"{role}-processes")
            if parent_pid is not None:
                group.create_task(_watch_parent(parent_pid, stop), name="watch-parent")
            if on_ready is not None:
                loop.call_soon(on_ready)
    log.info("dicomcloud stopped")


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """Stop when the supervising process is gone (backup for PR_SET_PDEATHSIG)."""
    while not stop.is_set():
        if os.getppid() != parent_pid:
            log.error("supervising process %d is gone; stopping", parent_pid)
            stop.set()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def _guard(role: str, main: RoleMain, runtime: Runtime, stop: asyncio.Event) -> None:
    """Run a role; if it fails, stop the others too (a half-running archive is worse)."""
    try:
        await main(runtime, stop)
    except Exception:
        log.exception("role %s failed; stopping", role)
        stop.set()
        raise


def _request_stop(stop: asyncio.Event, sig: signal.Signals) -> None:
    if stop.is_set():
        log.warning("second %s: stopping is already under way", sig.name)
    log.info("%s received: finishing in-flight work, then stopping", sig.name)
    stop.set()
