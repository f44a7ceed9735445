"""Start a server from a checked ``Config``: load the app, open logs, bind, supervise."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import hooks
from .apps import App
from .config import Config
from .errors import ConfigError
from .master import devreload, gate, privileges, reload, systemd, upgrade
from .master.listeners import Listener, bind_all
from .master.supervisor import Launch, Operators, Supervisor
from .master.upgrade import CONTROL, METRICS
from .models import Serving
from .ops import pidfile
from .ops.logs import configure, log, open_access_log
from .ops.metrics import require_client as require_metrics_client
from .serving import limits
from .serving.handlers import adapt, check_app
from .serving.handlers import load as load_handler
from .serving.tls import make_context as make_tls_context

if TYPE_CHECKING:
    import ssl  # only with TLS on: the module costs a forking master 6 MB

    from .protocol.admission import Admission

#: The control socket serves a few operators' status readers, not clients.
CONTROL_BACKLOG = 16


def run_server(config: Config, app: App | None = None,
               reload_config: Callable[[], Config] | None = None, *,
               exits_after: bool = False) -> int:
    """Serve ``config`` (with ``app``, else the app it names) until stopped; return the status.
    ``exits_after``: the process exits then (the command line), and ignores the signals
    that come meanwhile (see ``Supervisor``).

    Everything an operator can get wrong is checked before any socket is bound, in this order:
    the directory, hooks, the user to become, limits, TLS files, admission rules, the app, the
    ``on_starting`` hook (each a ``ConfigError``); then the access log, the addresses
    (``ListenError``), the pid file and the privilege drop. Whatever was opened is closed again
    if a later step fails.
    """
    configure(config.log_level, config.log_file)
    # before anything imports user code or forks: these variables are for this process only
    notifier = systemd.Notifier.from_environ()
    inherited = systemd.inherited_listeners()
    upgrade_ready_fd = upgrade.take_ready_fd()
    started_in = os.getcwd()
    origin = reload.Origin(config, reload_config, app_by_name=app is None)
    config, app, identity, context, admission = prepare(config, app)
    if not hooks.call(config, "on_starting", config):
        raise ConfigError("on_starting", "the hook raised (its traceback is in the log above)")
    with contextlib.ExitStack() as undo:
        access_log = open_access_log(config)
        if access_log is not None:
            undo.callback(access_log.close)
        undo.callback(notifier.close)
        listeners, control, metrics = _bind_and_drop(config, inherited, identity, undo)
        supervisor = Supervisor(
            Serving(config, app, context, access_log), listeners, admission=admission,
            operators=Operators(control, metrics),
            launch=Launch(origin, started_in, notifier, upgrade_ready_fd, exits_after))
        if config.reload:  # last: nothing can fail after the watcher is started
            devreload.Watcher(supervisor, devreload.directories(config))
        undo.pop_all()  # from here on, the supervisor closes what it was given
    status = supervisor.run()
    hooks.call(supervisor.config, "on_exit", status)
    return status


def prepare(config: Config, app: App | None = None) -> tuple[
        Config, App, privileges.Identity | None, ssl.SSLContext | None, Admission | None]:
    """What serving needs before anything is bound, checked in this order: the directory
    (changed to), hooks (imported), the user to become, limits, TLS files, admission rules,
    the umask (set), the app (imported). Also ``forkserve check``. Raises ``ConfigError``."""
    _chdir(config)
    config = hooks.resolve(config)
    identity = privileges.resolve_identity(config)
    limits.check_limits(config)
    context = make_tls_context(config)  # before privileges are dropped: keys are often root's
    admission = gate.build(config)  # reads the rules file: a typo is exit 2, nothing bound
    if config.umask is not None:
        os.umask(config.umask)
    app = load_handler(config.app) if app is None else adapt(app, config.app)
    check_app(app, config)  # (an async handler needs hybrid; hybrid's threads a blocking one)
    if config.metrics_bind is not None:
        require_metrics_client()
    if config.reload:
        devreload.require_watchfiles()
        devreload.directories(config)
    return config, app, identity, context, admission


def _bind_and_drop(config: Config, inherited: list[systemd.InheritedSocket],
                   identity: privileges.Identity | None, undo: contextlib.ExitStack,
                   ) -> tuple[list[Listener], Listener | None, Listener | None]:
    """Bind (or take over) the listeners, write the pid file, then drop privileges: in that
    order, since ports below 1024 and /run are root's. Each is undone by ``undo``."""
    for item in inherited:
        undo.callback(item.sock.close)
    listeners, control, metrics = _listeners(config, inherited)
    for listener in (*listeners, control, metrics):
        if listener is not None:
            undo.callback(listener.close)
    if config.pid_file is not None:  # before privileges are dropped: /run is root's
        _write_pid_file(config.pid_file)
        undo.callback(pidfile.remove, config.pid_file, os.getpid())
    if identity is not None:
        _drop(identity, [*listeners, *(x for x in (control, metrics) if x)])
    return listeners, control, metrics


def _listeners(config: Config, inherited: list[systemd.InheritedSocket],
               ) -> tuple[list[Listener], Listener | None, Listener | None]:
    """The client listeners, the control socket and the metrics listener: inherited (systemd
    socket activation, or the master a USR2 upgrade replaces) where given, else bound."""
    by_name = {name: [i for i in inherited if i.name == name] for name in (CONTROL, METRICS)}
    served = [i for i in inherited if i.name not in (CONTROL, METRICS)]
    if served:
        log.info("serving %d inherited socket(s); the bind setting is not used", len(served))
        listeners = systemd.as_listeners(served)
    else:
        listeners = bind_all(config.bind, config.backlog)
    extra: list[Listener | None] = []
    for name, address in ((CONTROL, config.control), (METRICS, config.metrics_bind)):
        if address is None:
            extra.append(None)
        elif by_name[name]:
            extra.append(systemd.as_listeners(by_name[name][:1])[0])
        else:
            extra.append(bind_all((address,), CONTROL_BACKLOG)[0])
    return listeners, extra[0], extra[1]


def _drop(identity: privileges.Identity, listeners: list[Listener]) -> None:
    try:
        privileges.drop(identity, listeners)
    except OSError as exc:
        raise ConfigError("user", f"cannot become {identity.name}: {exc.strerror}") from None


def _chdir(config: Config) -> None:
    if config.chdir is not None:
        try:
            os.chdir(config.chdir)
        except OSError as exc:
            raise ConfigError("chdir", f"cannot change to {config.chdir}: "
                              f"{exc.strerror}") from None


def _write_pid_file(path: str) -> None:
    try:
        pidfile.write(path, os.getpid())
    except OSError as exc:
        raise ConfigError("pid_file", f"cannot write {path}: {exc.strerror}") from None
