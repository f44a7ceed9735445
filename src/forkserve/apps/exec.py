"""exec: one program per connection, the socket as its stdin and stdout (inetd, tcpserver).

Theory of operation
-------------------
``forkserve exec [OPTIONS] -- PROGRAM [ARGS...]`` is the fork model with a different child:
instead of calling a Python handler, the per-connection child turns itself into PROGRAM. This
module holds what is decided once in the master (``prepare``: the program, its environment);
what the child does before ``execve`` is ``serving.program`` (``run_program``); the master's
side of a running program (its stderr, its idle deadline, its exit line) is
``models.fork_exec``.

PROGRAM is resolved to an absolute path once, at start, on the program's ``PATH``: a
program that cannot be found is an operator error (exit 2 before anything is bound, like a
bad app name), and no child searches ``PATH`` per connection.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError

# Re-exported: models/fork_exec.py (issue 15 part 1's file) imports it from here until it
# merges; then it imports serving.program, and this line goes.
from ..serving.program import run_program as run_program  # noqa: PLC0414

if TYPE_CHECKING:
    from ..serving.connection import Connection

#: The program's PATH when the master has none.
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
#: Variables that forkserve sets per connection; ``--env`` and ``--pass-env`` may not name them.
CONNECTION_VARIABLES = frozenset({
    "PROTO", "TCPLOCALIP", "TCPLOCALPORT", "TCPREMOTEIP", "TCPREMOTEPORT", "TCPLOCALHOST",
    "TCPREMOTEHOST", "TCPREMOTEINFO", "UNIXLOCALPATH", "UNIXREMOTEPID", "UNIXREMOTEUID",
    "UNIXREMOTEGID",
})
#: A portable environment variable name (POSIX: letters, digits, underscore; no leading digit).
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: Models that can run a program per connection (see ``check_model``).
EXEC_MODELS = ("fork",)


@dataclass(frozen=True)
class Program:
    """The program to run per connection, checked in the master before anything is bound.

    It takes the place of the app: the supervisor hands it to the model, and the fork model
    (``models.fork_exec``) runs it. It is not a handler; calling it is a programming error.
    """

    path: str
    argv: tuple[str, ...]
    #: The environment shared by every connection (the connection's variables are added).
    env: Mapping[str, str]

    def __call__(self, conn: Connection) -> None:
        raise RuntimeError("exec programs run only under the fork model")


def check_model(model: str) -> None:
    """Refuse models that cannot give each program its own process; raise ``ConfigError``."""
    if model in EXEC_MODELS:
        return
    if model == "single":
        why = ("the single model serves in the master itself, and running a program there "
               "would replace the server; use --model fork (the default), with "
               "--max-children 1 to serve one connection at a time")
    else:
        why = (f"{model} workers serve many connections in turn, but a program per connection "
               "is fork-per-connection by nature; use --model fork (the default)")
    raise ConfigError("--model", f"exec cannot run under the {model} model: {why}")


def parse_env(item: str) -> tuple[str, str]:
    """``NAME=VALUE`` from ``--env``; raise ``ConfigError`` naming what is wrong."""
    name, sep, value = item.partition("=")
    if not sep:
        raise ConfigError("--env", f"{item!r}: expected NAME=VALUE")
    _check_name("--env", name)
    if "\0" in value:
        raise ConfigError("--env", f"{name}: a value cannot contain a NUL byte")
    return name, value


def _check_name(option: str, name: str) -> None:
    if not _NAME.match(name):
        raise ConfigError(option, f"{name!r} is not a variable name (letters, digits and _, "
                                  "not starting with a digit)")
    if name in CONNECTION_VARIABLES:
        raise ConfigError(option, f"{name} is set by forkserve for each connection")


def base_env(env_items: Iterable[str], pass_env: Iterable[str],
             master_env: Mapping[str, str]) -> dict[str, str]:
    """The environment every program gets before its connection's variables.

    ``PATH`` (the master's, else ``DEFAULT_PATH``), then each ``pass_env`` name the master has,
    then each ``NAME=VALUE`` of ``env_items``: later ones win.
    """
    env = {"PATH": master_env.get("PATH") or DEFAULT_PATH}
    for name in pass_env:
        _check_name("--pass-env", name)
        if name in master_env:
            env[name] = master_env[name]
    for item in env_items:
        name, value = parse_env(item)
        env[name] = value
    return env


def resolve(program: str, path: str, cwd: str) -> str:
    """The absolute path of ``program`` (searched on ``path`` unless it has a ``/``)."""
    if "/" in program:
        found: str | None = os.path.join(cwd, program)
        if not (os.path.isfile(found) and os.access(found, os.X_OK)):  # type: ignore[arg-type]
            raise ConfigError("PROGRAM", f"{program!r} is not an executable file")
    else:
        found = shutil.which(program, path=path)
        if found is None:
            raise ConfigError("PROGRAM", f"{program!r} is not an executable on PATH ({path})")
    assert found is not None
    return os.path.abspath(os.path.join(cwd, found))


def prepare(argv: Iterable[str], *, env_items: Iterable[str] = (),
            pass_env: Iterable[str] = (), master_env: Mapping[str, str] | None = None,
            chdir: str | None = None) -> Program:
    """Check the command line of ``forkserve exec``; raise ``ConfigError`` (exit 2) if unusable."""
    args = tuple(argv)
    if not args or not args[0]:
        raise ConfigError("PROGRAM", "missing: write forkserve exec [OPTIONS] -- PROGRAM [ARGS...]")
    if any("\0" in arg for arg in args):
        raise ConfigError("PROGRAM", "an argument cannot contain a NUL byte")
    env = base_env(env_items, pass_env, os.environ if master_env is None else master_env)
    cwd = os.path.abspath(chdir) if chdir else os.getcwd()
    return Program(resolve(args[0], env["PATH"], cwd), args, env)
