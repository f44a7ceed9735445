"""The ``forkserve`` command: ``serve``, ``exec``, ``check``, ``client``, ``signal``,
``status``, ``settings``, ``bench``, ``demo``.

Every operator error ends as one line on standard error and exit status 2, never a traceback.
No option may be abbreviated (``allow_abbrev=False``): ``--max-chil 3`` is an error, not
``--max-children 3``, and a new flag can never change what an old command line meant.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias, cast

from . import config as config_mod
from ._version import __version__
from .apps import exec as exec_app
from .config import Config
from .errors import ConfigError, ExitCode, ForkserveError
from .master.signals import signal_table
from .ops import check as check_mod
from .ops import control
from .ops import status as status_mod
from .ops.control import VERBS
from .ops.status import StatusFailed
from .server import run_server
from .tools.client import ClientFailed
from .tools.client import run as run_client

#: The ``app`` setting of an exec server (what status and a reload see).
EXEC_APP = "exec"


#: What ``add_subparsers`` returns: each ``add_*_parser`` step adds one command to it.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _positive_int(text: str) -> int:
    try:
        return config_mod.Int(minimum=1).convert(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        return config_mod.Seconds().convert(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_exec_parser(sub: Subparsers) -> None:
    ex = sub.add_parser(
        "exec", help="run a program per connection, the socket as its stdin and stdout",
        usage="forkserve exec [OPTIONS] -- PROGRAM [ARGS...]",
        description="Run PROGRAM for each connection (like tcpserver or inetd): the socket is "
                    "its stdin and stdout, its stderr goes to the log as [PID] lines, and it "
                    "gets PATH, the --pass-env and --env variables and the connection's PROTO, "
                    "TCPLOCALIP, TCPLOCALPORT, TCPREMOTEIP, TCPREMOTEPORT (PROTO=UNIX and "
                    "UNIX* on unix listeners), nothing else. Every setting of serve applies; "
                    "the model is fork.")
    ex.add_argument("--config", metavar="FILE", help="read settings from this TOML file "
                    "(command-line flags win over it)")
    config_mod.add_arguments(ex)
    ex.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="set NAME to VALUE in the program's environment (repeatable)")
    ex.add_argument("--pass-env", action="append", default=[], metavar="NAME",
                    help="pass the master's NAME, if set, to the program (repeatable)")
    ex.add_argument("program", metavar="PROGRAM", help="the program, on PATH or a path")
    ex.add_argument("args", nargs="*", default=[], metavar="ARGS",
                    help="its arguments (after --)")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that takes no abbreviation of an option (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """What ``serve`` and ``check`` both read: the app, the config file, every setting."""
    parser.add_argument("app_spec", nargs="?", metavar="APP",
                        help="the app: hello, echo or MODULE:ATTR (same as --app)")
    parser.add_argument("--config", metavar="FILE", help="read settings from this TOML file "
                        "(command-line flags win over it)")
    config_mod.add_arguments(parser)


def build_parser(*, tools: bool = True) -> argparse.ArgumentParser:
    """The ``forkserve`` command line, one named step per command (``tools``: with bench and
    demo, which a serving master must not import)."""
    parser = Parser(
        prog="forkserve", description="A multi-process TCP server: fork, prefork and single "
        "models, and a program per connection (exec).")
    parser.add_argument("--version", action="version", version=f"forkserve {__version__}")
    sub = cast("Subparsers", parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser))
    add_serve_and_check_parsers(sub)
    add_exec_parser(sub)
    add_client_parser(sub)
    add_signal_parser(sub)
    add_status_parser(sub)
    add_settings_parser(sub)
    if tools:
        add_tool_parsers(sub)
    return parser


def add_serve_and_check_parsers(sub: Subparsers) -> None:
    """``serve`` and ``check``: the same settings; check binds nothing."""
    serve = sub.add_parser("serve", help="serve an app (the seed's hello app by default)",
                           description="Serve an app until stopped by a signal.")
    add_serve_arguments(serve)
    check = sub.add_parser("check", help="load the settings and the app as serve would; "
                           "bind nothing", description="Load the flags, the --config file "
                           "and the app exactly as serve would, bind nothing, print the "
                           "effective settings (as TOML, or JSON) and exit 0; or print the "
                           "one-line error and exit 2. Run it before a reload.")
    add_serve_arguments(check)
    check.add_argument("--json", action="store_true", help="print the settings as JSON")


def add_client_parser(sub: Subparsers) -> None:
    """``client``: the tutorial's client."""
    client = sub.add_parser("client", help="the tutorial's client: send lines, print answers",
                            description="Connect, send lines, print what the server answers.")
    client.add_argument("address", metavar="ADDR", help="HOST:PORT, [IPV6]:PORT or unix:/path")
    client.add_argument("--message", metavar="TEXT",
                        help="send TEXT as a line --count times instead of reading stdin")
    client.add_argument("--count", type=_positive_int, default=1, metavar="N",
                        help="how many times to send --message (default 1)")
    client.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                        help="give up on connecting or on an answer after this long "
                             "(default 10)")


def add_signal_parser(sub: Subparsers) -> None:
    """``signal VERB``: a signal to a running master, by name."""
    sig = sub.add_parser("signal", help="send a running server a signal by name",
                         description="Send the master the signal for VERB: "
                         + ", ".join(f"{verb} ({s.name})" for verb, s in VERBS.items()) + ".")
    sig.add_argument("verb", choices=sorted(VERBS), metavar="VERB",
                     help="one of: " + ", ".join(sorted(VERBS)))
    who = sig.add_mutually_exclusive_group(required=True)
    who.add_argument("--pid-file", metavar="FILE", help="the server's --pid-file")
    who.add_argument("--pid", type=_positive_int, metavar="PID", help="the master's pid")


def add_status_parser(sub: Subparsers) -> None:
    """``status``: what the master's control socket reports."""
    status = sub.add_parser("status", help="show a running server's workers and figures",
                            description="Show what the master's control socket reports: "
                            "uptime, connections, busy and idle counts, one row per process.")
    status.add_argument("--control", required=True, metavar="unix:PATH",
                        help="the server's --control socket")
    status.add_argument("--once", action="store_true", help="print once instead of live")
    status.add_argument("--json", action="store_true", help="print the raw snapshot as JSON")
    status.add_argument("--interval", type=_seconds, default=1.0, metavar="SECONDS",
                        help="refresh period of the live view (default 1)")


def add_settings_parser(sub: Subparsers) -> None:
    """``settings``: the settings table, or the signal table."""
    settings = sub.add_parser("settings", help="print the settings table (Markdown)",
                              description="Print every setting with its flag, default and "
                                          "meaning, or the table of signals.")
    settings.add_argument("--signals", action="store_true",
                          help="print the table of signals the master handles instead")


def add_tool_parsers(sub: Subparsers) -> None:
    """``bench`` and ``demo``: not for serve/exec, since a master forks, and every module it
    holds is copied."""
    from .tools import bench, demo  # noqa: PLC0415

    bench.add_parser(sub)  # each sets ``tool``: it prints its own errors, returns a status
    demo.add_parser(sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(tools=not words or words[0] not in ("serve", "exec", "check"))
    args, extra = parser.parse_known_args(words)
    if extra:  # the command's own usage, not the top level's
        _command_parser(parser, args.command).error(
            f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "tool", None) is not None:
        return int(args.tool(args))
    try:
        if args.command == "serve":
            given = {"app": args.app_spec} if args.app_spec else {}
            config = _settings(args, given)
            reload = ((lambda: config_mod.from_cli(args, args.config, given))
                      if args.config else None)
            return run_server(config, reload_config=reload, exits_after=True)
        if args.command == "exec":
            return _run_exec(args)
        if args.command == "check":
            given = {"app": args.app_spec} if args.app_spec else {}
            return check_mod.run(lambda: _settings(args, given), as_json=args.json)
        if args.command == "signal":
            pid = control.send(args.verb, pid_file=args.pid_file, pid=args.pid)
            print(f"forkserve: sent {VERBS[args.verb].name} to {pid}", file=sys.stderr)
            return 0
        if args.command == "status":
            address = _control_address(args.control)
            return status_mod.run(address.path, as_json=args.json, once=args.once,
                                  interval=args.interval)
        if args.command == "client":
            return run_client(args.address, message=args.message, count=args.count,
                              timeout=args.timeout)
        sys.stdout.write(signal_table() if args.signals else config_mod.markdown_table())
        return 0
    except (ClientFailed, control.SignalFailed, StatusFailed) as exc:
        print(f"forkserve: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, ForkserveError) as exc:
        print(f"forkserve: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return 130


def _settings(args: argparse.Namespace, given: Mapping[str, object]) -> Config:
    """The settings of ``serve``, ``exec`` or ``check``; a warning for each one given that
    the model ignores (``--workers`` with the fork model). Raises ``ConfigError``."""
    config = config_mod.from_cli(args, args.config, given)
    for line in config_mod.ignored_by_model(config, config_mod.given_names(args, args.config)):
        print(f"forkserve: warning: {line}", file=sys.stderr)
    return config


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            chosen: argparse.ArgumentParser = action.choices[command]
            return chosen
    return parser


def _control_address(text: str) -> config_mod.Address:
    """``status --control``'s address: a unix socket, or a usage error saying so."""
    wanted = "unix:PATH, the path of the server's --control socket"
    if not text.startswith("unix:"):
        raise ConfigError("--control", f"must be {wanted}; got {text!r}")
    try:
        return config_mod.Address.parse(text)
    except ValueError as exc:
        raise ConfigError("--control", f"must be {wanted}: {exc}") from None


def _run_exec(args: argparse.Namespace) -> int:
    """``forkserve exec``: everything is checked before anything is bound (exit 2 otherwise)."""
    given = {"app": EXEC_APP}
    config = _settings(args, given)
    exec_app.check_model(config.model)
    if config.reload:
        raise ConfigError("reload", "exec runs the program afresh for each connection: "
                                    "there is no app code to reload")
    program = exec_app.prepare([args.program, *args.args], env_items=args.env,
                               pass_env=args.pass_env, chdir=config.chdir)
    reload = (lambda: config_mod.from_cli(args, args.config, given)) if args.config else None
    return run_server(config, program, reload_config=reload, exits_after=True)


#: The exit status of a command whose reader went away: a shell's for a SIGPIPE (128 + 13).
BROKEN_PIPE_STATUS = 128 + signal.SIGPIPE


def entry() -> None:
    """The console script and ``python -m forkserve``: ``main()``, and a quiet end when the
    reader of standard output went away (``forkserve settings | head -1``)."""
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # the interpreter flushes stdout once more at exit: make that flush go nowhere
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        status = BROKEN_PIPE_STATUS
    sys.exit(status)
