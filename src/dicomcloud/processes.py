"""Extra OS processes for a role: DIMSE listeners (``scp.processes``) and HTTP servers
(``web.processes``).

pynetdicom decodes PDUs in Python threads, STOW-RS parses multipart bodies; in the process
that also indexes they would all compete for one interpreter lock. Role processes bind the
same port with SO_REUSEPORT (the kernel spreads connections over them) and share the
embedded queue file and storage with the main process, which stays their supervisor:

- a listener that dies is restarted (with a pause if it keeps dying);
- on SIGTERM the main process forwards it and waits for running associations to finish;
- if the main process dies, even by ``kill -9``, the kernel kills its listeners
  (PR_SET_PDEATHSIG), so no orphan keeps answering on the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.process import BaseProcess
from typing import Any

from dicomcloud.config import Settings

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1
_RESTART_PAUSE = 2.0


def role_settings(settings: Settings, role: str) -> Settings:
    """Settings of one role process: only ``role``, on a port shared with its siblings."""
    section = getattr(settings, role)
    shared = dataclasses.replace(section, processes=0, reuse_port=True)
    return dataclasses.replace(settings, roles=(role,), **{role: shared})


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when ``parent`` dies (Linux), even by kill -9."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the watchdog in serve() remains
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _child_main(settings: Settings, parent: int, listening: Any) -> None:
    die_with_parent(parent)
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    from dicomcloud.runtime import run_loop, serve

    run_loop(serve(settings, parent_pid=parent, listening=listening))


class RoleProcesses:
    """Starts, watches and stops the processes of one role for the main process."""

    def __init__(self, settings: Settings, role: str, count: int) -> None:
        self.settings = role_settings(settings, role)
        self.role = role
        self.count = count
        self._context = multiprocessing.get_context("spawn")
        self._procs: list[BaseProcess] = []
        self._listening: list[Any] = []

    def not_ready(self) -> str | None:
        """Why the listeners are not all accepting associations yet, or None."""
        up = sum(1 for p, e in zip(self._procs, self._listening, strict=True)
                 if p.is_alive() and e.is_set())
        return None if up == self.count else f"{up} of {self.count} {self.role} processes up"

    async def wait_ready(self, stop: asyncio.Event) -> None:
        """Return once every process listens (or ``stop`` is set)."""
        # the readiness flags are multiprocessing Events, which cannot be awaited
        while self.not_ready() and not stop.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    def _spawn(self, slot: int) -> BaseProcess:
        listening = self._context.Event()
        proc = self._context.Process(target=_child_main,
                                     args=(self.settings, os.getpid(), listening),
                                     name=f"dicomcloud-{self.role}", daemon=False)
        proc.start()  # from the loop thread: PDEATHSIG follows the thread that forked
        log.info("started %s process %d", self.role, proc.pid)
        if slot < len(self._procs):
            self._procs[slot], self._listening[slot] = proc, listening
        else:
            self._procs.append(proc)
            self._listening.append(listening)
        return proc

    async def run(self, stop: asyncio.Event, after: RoleProcesses | None = None) -> None:
        """Keep ``count`` processes alive until ``stop``; then stop them gracefully.

        With ``after``, start only once those are ready: the web processes answer /readyz,
        so they come up after the DIMSE listeners.
        """
        if after is not None:
            await after.wait_ready(stop)
        for slot in range(self.count):
            self._spawn(slot)
        last_restart = 0.0
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
                for i, proc in enumerate(self._procs):
                    if not stop.is_set() and not proc.is_alive():
                        log.error("%s process %s exited with %s; restarting", self.role,
                                  proc.pid, proc.exitcode)
                        if time.monotonic() - last_restart < _RESTART_PAUSE:
                            await asyncio.sleep(_RESTART_PAUSE)
                        last_restart = time.monotonic()
                        self._spawn(i)
        finally:
            await self._stop_all()

    async def _stop_all(self) -> None:
        for proc in self._procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.web.graceful_timeout + 5
        for proc in self._procs:
            await asyncio.to_thread(proc.join, max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("%s process %s did not stop; killing it", self.role, proc.pid)
                proc.kill()
                await asyncio.to_thread(proc.join, 5)
