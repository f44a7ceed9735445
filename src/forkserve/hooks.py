"""Lifecycle hooks: plain callables, named in the config, called at fixed points.

Theory of operation
-------------------
A hook is a setting like any other: ``MODULE:ATTR`` in the TOML file or on the command line, or
the callable itself through ``forkserve.serve(..., post_fork=func)``. Names are resolved in the
master after ``chdir`` and before any socket is bound (``resolve``), so a typo costs one line
and exit status 2, as a bad app name does; a reload resolves the names again the same way
(their modules imported afresh, see ``reload``) and keeps the running ones if that fails.

Each hook runs in one process, and an exception in it is logged with its traceback and is
fatal only where this table says so:

============  ===================  ==============================  ===========================
hook          called in            with                            if it raises
============  ===================  ==============================  ===========================
on_starting   master, before bind  the ``Config``                  nothing starts (exit 2)
post_fork     each child/worker,   a ``Process`` (pid, role,       fork child: that connection
              before it serves     slot, generation)               is closed; prefork worker:
                                                                   a boot failure (crash-loop
                                                                   protection applies)
child_exit    master, on reaping   a ``ChildExited`` (pid, status  logged only
              a child or worker    text, exit code)
on_reload     master, after a      the new ``Config``              logged only
              reload took effect
on_exit       master, after the    the exit status (int)           logged only
              last child is gone
============  ===================  ==============================  ===========================

Hooks in the master run inside its loop: they must return quickly (no blocking I/O), as a
slow hook delays every signal, reap and accept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError
from .serving.lazylog import LazyLogger

if TYPE_CHECKING:
    from .config import Config

log = LazyLogger("forkserve")

#: The hook settings, in the order they happen.
HOOK_NAMES = ("on_starting", "post_fork", "child_exit", "on_reload", "on_exit")


@dataclass(frozen=True)
class Process:
    """What ``post_fork`` learns about the process it runs in."""

    pid: int
    #: ``"child"`` (fork model: one connection) or ``"worker"`` (prefork).
    role: str
    slot: int
    generation: int = 0


@dataclass(frozen=True)
class ChildExited:
    """What ``child_exit`` learns about a child or worker the master reaped."""

    pid: int
    #: ``"0"``, ``"1"`` ... or the signal's name, ``"SIGKILL"``; ``"unknown"`` when the
    #: zygote that reaped it died before it said how it ended.
    status: str
    #: The exit status, or minus the signal number (``Exited.UNSEEN`` when unknown).
    code: int


def resolve(config: Config) -> Config:
    """``config`` with every hook named ``MODULE:ATTR`` imported. Raises ``ConfigError``."""
    from .serving.handlers import import_object  # noqa: PLC0415  (handlers imports config)

    changes: dict[str, object] = {}
    for name in HOOK_NAMES:
        value = getattr(config, name)
        if isinstance(value, str):
            try:
                obj = import_object(value, chdir=config.chdir)
            except ConfigError as exc:
                raise ConfigError(name, exc.problem) from None
            if not callable(obj):
                raise ConfigError(name, f"{value} is not callable")
            changes[name] = obj
    return config.replace(**changes) if changes else config


def call(config: Config, name: str, *args: object) -> bool:
    """Run hook ``name`` if set; log what it raised. True if it ran without raising."""
    hook: Callable[..., object] | str | None = getattr(config, name)
    if hook is None:
        return True
    assert callable(hook), f"hook {name} was not resolved"
    try:
        hook(*args)
    except (Exception, SystemExit):
        log.exception("the %s hook %s raised", name, describe(hook))
        return False
    return True


def describe(hook: object) -> str:
    return f"{getattr(hook, '__module__', '?')}:{getattr(hook, '__qualname__', repr(hook))}"
