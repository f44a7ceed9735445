"""Reloading the configuration (SIGHUP): build the new state, or say why the old one stays.

Theory of operation
-------------------
A reload happens in the master's loop, so it must never raise out of it: everything that can
fail (reading and checking the file, importing a changed app, opening a changed access log,
reading the TLS certificates again) is done here, before anything running is touched. Only
when all of it worked does the supervisor swap the new state in and tell the model (the fork
model forks new children with it, prefork starts a new generation). A renewed certificate is
thus served to new connections; after a privilege drop, the key must be readable by the
server's user. Settings in ``RESTART_ONLY`` shape sockets and shared memory made at start: a
change to them is reported and the running value kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import gate, hooks
from .admission import Admission
from .apps import App
from .config import Config
from .handlers import load as load_handler
from .logs import AccessLog, open_access_log
from .privileges import check_limits
from .tls import make_context

if TYPE_CHECKING:
    import ssl  # only with TLS on: the module costs a forking master 6 MB

#: Settings that a reload cannot change: they shape sockets and shared memory made at start.
RESTART_ONLY = ("bind", "model", "backlog", "max_children", "max_workers", "pid_file",
                "control", "metrics_bind", "chdir", "user", "group", "umask")


@dataclass(frozen=True)
class Reloaded:
    config: Config
    app: App
    access_log: AccessLog | None
    #: A new TLS context (certificates read again: a renewed one is served), or None.
    tls: ssl.SSLContext | None
    #: Admission control for the new settings (in-flight counts carried over), or None.
    admission: Admission | None
    #: Settings whose change was ignored because it needs a restart.
    kept: tuple[str, ...]


def prepare(running: Config, app: App, access_log: AccessLog | None,
            read: Callable[[], Config], admission: Admission | None = None) -> Reloaded:
    """The state a reload would switch to. Raises ``ForkserveError`` saying what is wrong."""
    new = hooks.resolve(read())
    kept = tuple(name for name in RESTART_ONLY if getattr(new, name) != getattr(running, name))
    new = new.replace(**{name: getattr(running, name) for name in kept})
    check_limits(new)
    if new.app != running.app:
        app = load_handler(new.app, chdir=running.chdir)
    context = make_context(new)
    admitting = gate.build(new, previous=admission)
    return Reloaded(new, app, _access_log(running, new, access_log), context, admitting, kept)


def _access_log(old: Config, new: Config, current: AccessLog | None) -> AccessLog | None:
    if (new.access_log, new.access_log_format) == (old.access_log, old.access_log_format):
        return current
    return open_access_log(new)
