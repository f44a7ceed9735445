"""The seam between supervisor logic and the operating system (STYLE rule 6).

The supervisor calls these few operations through a ``Kernel`` object instead of ``os`` and
``time`` directly, so its unit tests run on a fake kernel with a virtual clock and injected
failures, while the real-process tests exercise ``OsKernel``.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # (no stub: CPython's C half of signal)
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import FrameType
from typing import ClassVar, Protocol

#: ``signal.pthread_sigmask`` and ``signal.signal`` without their Python wrappers, which turn
#: every signal number in and out into an enum member (microseconds each). For the
#: per-connection path: a forking master and a fresh child pay a copy-on-write page fault for
#: every page those conversions touch (see docs/benchmarks.md).
Handler = Callable[[int, FrameType | None], object] | int
#: ``set_handler`` takes these (plain ints), not ``signal.SIG_DFL``/``SIG_IGN`` (enum members).
SIG_DFL: int = _signal.SIG_DFL
SIG_IGN: int = _signal.SIG_IGN
pthread_sigmask: Callable[[int, Iterable[int]], set[int]] = _signal.pthread_sigmask
set_handler: Callable[[int, Handler], object] = _signal.signal
#: A signal's disposition as a number or a function, without ``signal.getsignal``'s enum
#: conversion (Python code run per call; a program's child asks for every signal).
get_handler: Callable[[int], object] = _signal.getsignal


class Kernel(Protocol):
    def fork(self) -> int: ...
    def spawn(self, path: str, argv: list[str], env: dict[str, str]) -> int: ...
    def kill(self, pid: int, sig: int) -> None: ...
    def waitpid(self, pid: int, options: int) -> tuple[int, int]: ...
    def monotonic(self) -> float: ...


class OsKernel:
    """The real thing."""

    fork = staticmethod(os.fork)
    kill = staticmethod(os.kill)

    @staticmethod
    def spawn(path: str, argv: list[str], env: dict[str, str]) -> int:
        """A new program in a child (``posix_spawn``), with no signal blocked: its pid."""
        return os.posix_spawn(path, argv, env, setsigmask=())

    waitpid = staticmethod(os.waitpid)
    monotonic = staticmethod(time.monotonic)


@dataclass(frozen=True)
class Exited:
    """A reaped child: ``code`` is the exit status, or minus the signal that killed it, or
    ``UNSEEN``: the process is gone, but how it ended was lost (its parent, a zygote, reaped
    it and died before it could say)."""

    pid: int
    code: int

    UNSEEN: ClassVar[int] = -(1 << 16)

    @property
    def signal(self) -> int | None:
        return -self.code if self.code < 0 and self.code != self.UNSEEN else None

    def describe(self) -> str:
        """``0``, ``1`` ... for an exit; ``SIGKILL`` ... for a signal; ``unknown``."""
        if self.code == self.UNSEEN:
            return "unknown"
        if self.code >= 0:
            return str(self.code)
        try:
            return signal.Signals(-self.code).name
        except ValueError:
            return f"signal {-self.code}"


def reap(kernel: Kernel) -> list[Exited]:
    """Collect every child that has ended, without blocking (STYLE rule 7: the one reaper).

    SIGCHLDs coalesce, so this loops until ``waitpid`` reports no more (0) or no children at
    all (``ChildProcessError``). Children the caller does not know are returned too.
    """
    done: list[Exited] = []
    while True:
        try:
            pid, status = kernel.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done.append(Exited(pid, os.waitstatus_to_exitcode(status)))
