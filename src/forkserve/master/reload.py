"""Reloading (SIGHUP): the settings and the app's code again, or say why the old ones stay.

Theory of operation
-------------------
A HUP always starts over with the current settings *and the current code* (DESIGN decision
16, as gunicorn, Apache ``graceful`` and Unicorn do): with a config file, the file is read
again; without one, the settings given at start are used again. Either way the app's own
modules are imported afresh and every model forks from the new state (prefork: a new
generation of workers, which retires the old one as its workers become ready; fork: the next
children; single: the next connection).

Where the code is re-imported: in the master, before anything is forked from it. forkserve
always imports the app in the master at start (there is no ``--preload`` switch: it is always
on, so a typo is exit 2 and the code is shared copy-on-write); a reload does the same, so a
broken new version is found once, in one place, and the running processes keep serving the
old code. Rejected: importing in each new worker (gunicorn without ``--preload``), which finds
a broken version only after the old workers were told to go, once per worker, and cannot
serve the fork model, whose children are forked for a connection already accepted.

What is re-imported (``_own_code``): the package of the app named ``MODULE:ATTR`` and of each
hook named so (``myapp`` for ``myapp.web:handle``, with all of ``myapp.*``), and every module
loaded from a ``.py`` file under the app directory (``--chdir`` or the working directory),
so that ``app.py`` importing its sibling ``views.py`` gets both fresh. Never re-imported:
forkserve itself (the built-in apps ``hello`` and ``echo`` included: their code changes with
an upgrade, USR2), the standard library, installed packages (``site-packages``), the script
that called ``forkserve.serve()``, an app given to ``serve()`` as an object (kept as it is:
there is no name to import it by) and an ``exec`` program (run afresh per connection anyway).

Failing safely: the reload happens in the master's loop, so it must never raise out of it.
Everything that can fail (reading and checking the file, importing, opening a changed access
log, reading the TLS certificates again, the rules file) is done here, before anything running
is touched. If any of it fails, ``sys.modules`` is put back as it was (the modules taken out
return, half-imported new ones go) and the error is one line; any ``Exception`` or
``SystemExit`` raised by the app's import counts. Only when all of it worked does the
supervisor swap the new state in. A renewed certificate is thus served to new connections;
after a privilege drop, the key must be readable by the server's user. Settings in
``RESTART_ONLY`` shape sockets and shared memory made at start: a change to them is reported
and the running value kept.

Worst case: the import runs in the master's loop, like a hook: an app that takes a second to
import holds accepting (the fork model) and reaping for that second; one that hangs while
importing hangs the master, as it would at start.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from .. import hooks
from ..apps import BUILTIN, App
from ..config import Config
from ..ops.logs import AccessLog, open_access_log
from ..protocol.admission import Admission
from ..serving.handlers import app_dir, check_app
from ..serving.handlers import load as load_handler
from ..serving.limits import check_limits
from ..serving.tls import make_context
from . import gate

if TYPE_CHECKING:
    import ssl  # only with TLS on: the module costs a forking master 6 MB

#: Settings that a reload cannot change: they shape sockets and shared memory made at start.
RESTART_ONLY = ("bind", "model", "backlog", "max_children", "max_workers", "pid_file",
                "control", "metrics_bind", "chdir", "user", "group", "umask", "log_file",
                "reload", "reload_dir")
#: Top-level modules a reload never re-imports: forkserve (the master runs its classes; a
#: second copy would make ``except ForkserveError`` miss) and the program that embeds it.
NEVER_REIMPORTED = frozenset({"forkserve", "__main__", "__mp_main__"})
#: Where installed packages live: not the app's own code, even inside the app directory.
INSTALLED_DIRS = frozenset({"site-packages", "dist-packages"})


@dataclass(frozen=True)
class Origin:
    """Where a reload finds the settings and the app again (built by ``run_server``)."""

    #: The settings as given at start, hook names not yet imported: a reload without a
    #: config file starts over from them.
    given: Config
    #: Reads the config file again; None when the server was started without one.
    read_file: Callable[[], Config] | None = None
    #: True when the app was imported from the ``app`` setting; False for an object given to
    #: ``forkserve.serve()`` or an exec program, which a reload keeps as it is.
    app_by_name: bool = False


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
    #: What was read and imported again, for the reload's one log line.
    summary: str


def prepare(running: Config, app: App, access_log: AccessLog | None, origin: Origin,
            admission: Admission | None = None) -> Reloaded:
    """The state a reload would switch to. Runs in the master; raises ``ForkserveError``
    saying what is wrong, with ``sys.modules`` as it was before the call."""
    new = origin.read_file() if origin.read_file is not None else origin.given
    kept = tuple(name for name in RESTART_ONLY if getattr(new, name) != getattr(running, name))
    new = new.replace(**{name: getattr(running, name) for name in kept})
    check_limits(new)
    with _fresh(_own_code(_top_names(new, origin), app_dir(running.chdir))):
        new = hooks.resolve(new)
        if origin.app_by_name:
            app = load_handler(new.app, chdir=running.chdir)
        check_app(app, new)  # (an async handler needs hybrid; hybrid's threads a blocking one)
        context = make_context(new)
        admitting = gate.build(new, previous=admission)
        access = _access_log(running, new, access_log)  # last: nothing can fail after it
    done = "reloaded the config file; " if origin.read_file is not None else "reload: "
    return Reloaded(new, app, access, context, admitting, kept, done + _what(new, origin))


def refreeze() -> None:
    """After a reload: let the collector free the old code, then freeze the new state.

    The start froze everything (``gc.freeze``, so that children never write to shared pages);
    frozen objects are never collected, so the old modules' reference cycles would stay for
    good. The cost, once per reload: the master's own copy of the pages it collects.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _what(config: Config, origin: Origin) -> str:
    if not origin.app_by_name:
        return "kept the app given as an object (there is no name to import it by)"
    if _top(config.app) in NEVER_REIMPORTED:
        return f"{config.app} is built in: nothing to re-import"
    return f"re-imported {config.app}"


def _top(spec: str) -> str:
    """The top-level package of an app or hook named ``spec`` (a built-in name included)."""
    return BUILTIN.get(spec, spec).partition(":")[0].partition(".")[0]


def _top_names(config: Config, origin: Origin) -> frozenset[str]:
    """The top-level packages named by the app and the hooks, forkserve's own left out."""
    specs = [value for name in hooks.HOOK_NAMES
             if isinstance(value := getattr(config, name), str)]
    if origin.app_by_name:
        specs.append(config.app)
    return frozenset(_top(spec) for spec in specs) - NEVER_REIMPORTED


def _own_code(tops: frozenset[str], base: str) -> Callable[[str, ModuleType], bool]:
    """Which loaded modules are the app's own code (see the module doc); none without a name."""
    def chosen(name: str, module: ModuleType) -> bool:
        top = name.partition(".")[0]
        if not tops or top in NEVER_REIMPORTED or top in sys.stdlib_module_names:
            return False
        if top in tops:
            return True
        file = getattr(module, "__file__", None)
        return (isinstance(file, str) and file.endswith(".py")
                and file.startswith(base + os.sep)
                and not INSTALLED_DIRS.intersection(file.split(os.sep)))
    return chosen


@contextlib.contextmanager
def _fresh(chosen: Callable[[str, ModuleType], bool]) -> Iterator[None]:
    """Inside: the ``chosen`` modules are out of ``sys.modules``, so imports load them from
    their files again. If the block raises, ``sys.modules`` is put back as it was."""
    old = _take(chosen)
    importlib.invalidate_caches()  # a module file new since start must be found
    try:
        yield
    except BaseException:
        _take(chosen)  # what the failed attempt imported (or half-imported)
        sys.modules.update(old)
        raise


def _take(chosen: Callable[[str, ModuleType], bool]) -> dict[str, ModuleType]:
    taken = {name: module for name, module in sys.modules.items() if chosen(name, module)}
    for name in taken:
        del sys.modules[name]
    return taken


def _access_log(old: Config, new: Config, current: AccessLog | None) -> AccessLog | None:
    if (new.access_log, new.access_log_format) == (old.access_log, old.access_log_format):
        return current
    return open_access_log(new)
