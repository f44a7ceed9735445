"""Start a server from a checked ``Config``: load the app, open logs, bind, supervise."""

from __future__ import annotations

from collections.abc import Callable

from .apps import App, load_app
from .config import Config
from .errors import ConfigError
from .listeners import bind_all
from .logs import AccessLog, configure
from .supervisor import Supervisor


def run_server(config: Config, app: App | None = None,
               reload_config: Callable[[], Config] | None = None) -> int:
    """Serve ``config`` (with ``app``, else the app it names) until stopped; return the status.

    Everything an operator can get wrong is checked before any socket is bound: the app
    (``ConfigError``), the access log file (``ConfigError``), then the addresses
    (``ListenError``).
    """
    configure(config.log_level)
    if app is None:
        app = load_app(config.app)
    access_log = None
    if config.access_log is not None:
        try:
            access_log = AccessLog(config.access_log, config.access_log_format)
        except OSError as exc:
            raise ConfigError("access_log", f"cannot open {config.access_log}: "
                              f"{exc.strerror}") from None
    try:
        listeners = bind_all(config.bind, config.backlog)
    except BaseException:
        if access_log is not None:
            access_log.close()
        raise
    try:
        supervisor = Supervisor(config, app, listeners, access_log=access_log,
                                reload_config=reload_config)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return supervisor.run()
