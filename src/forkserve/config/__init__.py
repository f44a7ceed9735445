"""Settings: each one declared once, and everything else generated from the declaration.

Theory of operation
-------------------
``Config`` is a frozen dataclass. Each field is declared with :func:`setting`, which records the
default, the *kind* (how to read and check a value), the command-line flag and one line of
documentation. The CLI (:func:`add_arguments`), the TOML loader (:func:`load_toml`) and the
settings table of the README (:func:`markdown_table`) are all generated from these fields, so a
new setting is one declaration (STYLE rule 14).

A value may arrive as a string (command line), as a TOML value (int, float, str, list) or as a
Python keyword argument. Every path goes through the same ``Kind.convert``, so the checks and the
error messages are the same everywhere; a ``ConfigError`` names the setting as the operator
wrote it (``--max-children`` or ``max_children``) and the file it came from.

Precedence, lowest first: declared defaults, the ``--config`` file, command-line flags, and for
the Python API the keyword arguments of :func:`forkserve.serve`.

Three modules, one per seam: ``kinds`` (how a value is read and checked), ``settings`` (the
one declaration table, ``Config``, and the rules between settings), ``load`` (the front ends
generated from it: TOML, argparse, the README table). Every public name is importable from
``forkserve.config`` as before. The package is pure: it imports no runtime part
(import-linter's ``config-declares`` contract) and opens nothing but the config file.
"""


from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

# Every public name of the three modules, importable from ``forkserve.config`` as before the
# split (explicit re-exports: the redundant aliases tell mypy and ruff so).
from .kinds import MAX_PORT as MAX_PORT
from .kinds import MAX_SECONDS as MAX_SECONDS
from .kinds import MAX_UNIX_PATH as MAX_UNIX_PATH
from .kinds import MIN_SECONDS as MIN_SECONDS
from .kinds import Address as Address
from .kinds import Addresses as Addresses
from .kinds import Choice as Choice
from .kinds import Flag as Flag
from .kinds import Hook as Hook
from .kinds import Int as Int
from .kinds import IntOrUnset as IntOrUnset
from .kinds import Kind as Kind
from .kinds import Network as Network
from .kinds import Networks as Networks
from .kinds import OneAddress as OneAddress
from .kinds import Path as Path
from .kinds import Paths as Paths
from .kinds import PenaltiesKind as PenaltiesKind
from .kinds import RateKind as RateKind
from .kinds import Seconds as Seconds
from .kinds import StartupsKind as StartupsKind
from .kinds import Text as Text
from .kinds import Umask as Umask
from .kinds import UnixAddress as UnixAddress
from .settings import LOG_LEVELS as LOG_LEVELS
from .settings import MAX_SPARE_PER_MIN_SPARE as MAX_SPARE_PER_MIN_SPARE
from .settings import MAX_WORKERS as MAX_WORKERS
from .settings import MIN_SPARE as MIN_SPARE
from .settings import MODELS as MODELS
from .settings import START_WORKERS as START_WORKERS
from .settings import WORKER_PSS_MB as WORKER_PSS_MB
from .settings import Config as Config
from .settings import SettingInfo as SettingInfo
from .settings import flag_of as flag_of
from .settings import from_mapping as from_mapping
from .settings import setting as setting
from .settings import settings as settings

# ``load``'s front ends (argparse, tomllib: 1.7 MB and 5 ms of a process that imports them)
# load on first use (PEP 562): the zygote unpickles a ``Config`` and never parses a
# command line or a file (issue 16), the master and the tools do.
_LOADERS = frozenset({"add_arguments", "from_cli", "given_names", "ignored_by_model",
                      "load_toml", "markdown_table"})

if TYPE_CHECKING:
    from .load import add_arguments as add_arguments
    from .load import from_cli as from_cli
    from .load import given_names as given_names
    from .load import ignored_by_model as ignored_by_model
    from .load import load_toml as load_toml
    from .load import markdown_table as markdown_table


def __getattr__(name: str) -> object:
    if name in _LOADERS:
        from . import load  # noqa: PLC0415  (on first use: see _LOADERS)

        return getattr(load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__: Sequence[str] = ("Address", "Config", "from_mapping", "load_toml", "markdown_table")
