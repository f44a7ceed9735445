"""``forkserve check``: load a configuration exactly as ``serve`` would, bind nothing.

The flags, the ``--config`` file and the app go through the same path as ``serve``
(``config.from_cli``, then ``server.prepare``: directory, hooks, user, limits, TLS files,
admission rules, the app's import), so what passes here starts, short of a socket that
cannot be bound. Nothing is bound, no pid file or log file is written and no hook is called.
The effective settings are printed as a TOML file that ``--config`` would read (unset
settings as comments), or as JSON; an error is one line and exit 2, as with ``serve``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from .. import config as config_mod
from ..config import Config
from ..server import prepare


def _value(value: object) -> object:
    """A setting's value as TOML and JSON can both write it."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return [str(item) for item in value]
    if callable(value):
        return f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', value)}"
    return str(value)


def effective(config: Config) -> dict[str, object]:
    """Every setting's effective value, in declaration order."""
    return {name: _value(getattr(config, name)) for name, _, _ in config_mod.settings()}


def toml_lines(values: dict[str, object]) -> list[str]:
    return [f"# {name}: not set" if value is None
            else f"{name} = {json.dumps(value)}"
            for name, value in values.items()]


def run(build: Callable[[], Config], *, as_json: bool) -> int:
    """Build the settings, prepare the server from them, print them; return 0. Raises
    ``ConfigError`` (exit 2 in the CLI)."""
    config, _app, _identity, _tls, _admission = prepare(build())
    values = effective(config)
    if as_json:
        print(json.dumps(values, indent=2))
    else:
        print("\n".join(toml_lines(values)))
    print(f"forkserve: the configuration is valid (app {config.app}, model {config.model}); "
          "nothing was bound", file=sys.stderr)
    return 0
