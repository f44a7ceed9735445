"""The ``forkserve`` command: ``serve``, ``exec``, ``client``, ``signal``, ``status``,
``settings``, ``bench``, ``demo``.

Every operator error ends as one line on standard error and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import config as config_mod
from . import control
from . import status as status_mod
from ._version import __version__
from .apps import exec as exec_app
from .client import ClientFailed
from .client import run as run_client
from .control import VERBS
from .errors import ConfigError, ExitCode, ForkserveError
from .server import run_server
from .signals import signal_table
from .status import StatusFailed

#: The ``app`` setting of an exec server (what status and a reload see).
EXEC_APP = "exec"


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


def add_exec_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def build_parser(*, tools: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forkserve", description="A multi-process TCP server: fork, prefork and single "
        "models, and a program per connection (exec).")
    parser.add_argument("--version", action="version", version=f"forkserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve an app (the seed's hello app by default)",
                           description="Serve an app until stopped by a signal.")
    serve.add_argument("app_spec", nargs="?", metavar="APP",
                       help="the app: hello, echo or MODULE:ATTR (same as --app)")
    serve.add_argument("--config", metavar="FILE", help="read settings from this TOML file "
                       "(command-line flags win over it)")
    config_mod.add_arguments(serve)

    add_exec_parser(sub)

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

    sig = sub.add_parser("signal", help="send a running server a signal by name",
                         description="Send the master the signal for VERB: "
                         + ", ".join(f"{verb} ({s.name})" for verb, s in VERBS.items()) + ".")
    sig.add_argument("verb", choices=sorted(VERBS), metavar="VERB",
                     help="one of: " + ", ".join(sorted(VERBS)))
    who = sig.add_mutually_exclusive_group(required=True)
    who.add_argument("--pid-file", metavar="FILE", help="the server's --pid-file")
    who.add_argument("--pid", type=_positive_int, metavar="PID", help="the master's pid")

    status = sub.add_parser("status", help="show a running server's workers and figures",
                            description="Show what the master's control socket reports: "
                            "uptime, connections, busy and idle counts, one row per process.")
    status.add_argument("--control", required=True, metavar="unix:PATH",
                        help="the server's --control socket")
    status.add_argument("--once", action="store_true", help="print once instead of live")
    status.add_argument("--json", action="store_true", help="print the raw snapshot as JSON")
    status.add_argument("--interval", type=_seconds, default=1.0, metavar="SECONDS",
                        help="refresh period of the live view (default 1)")

    settings = sub.add_parser("settings", help="print the settings table (Markdown)",
                              description="Print every setting with its flag, default and "
                                          "meaning, or the table of signals.")
    settings.add_argument("--signals", action="store_true",
                          help="print the table of signals the master handles instead")
    if tools:  # not for serve/exec: a master forks, and every module it holds is copied
        from . import bench, demo  # noqa: PLC0415

        bench.add_parser(sub)  # each sets ``tool``: it prints its own errors, returns a status
        demo.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(tools=not words or words[0] not in ("serve", "exec")).parse_args(words)
    if getattr(args, "tool", None) is not None:
        return int(args.tool(args))
    try:
        if args.command == "serve":
            given = {"app": args.app_spec} if args.app_spec else {}
            config = config_mod.from_cli(args, args.config, given)
            reload = ((lambda: config_mod.from_cli(args, args.config, given))
                      if args.config else None)
            return run_server(config, reload_config=reload)
        if args.command == "exec":
            return _run_exec(args)
        if args.command == "signal":
            pid = control.send(args.verb, pid_file=args.pid_file, pid=args.pid)
            print(f"forkserve: sent {VERBS[args.verb].name} to {pid}", file=sys.stderr)
            return 0
        if args.command == "status":
            try:
                address = config_mod.UnixAddress(optional=False).convert(args.control)
            except ValueError as exc:
                raise StatusFailed(f"--control: {exc}") from None
            assert address is not None
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


def _run_exec(args: argparse.Namespace) -> int:
    """``forkserve exec``: everything is checked before anything is bound (exit 2 otherwise)."""
    given = {"app": EXEC_APP}
    config = config_mod.from_cli(args, args.config, given)
    exec_app.check_model(config.model)
    program = exec_app.prepare([args.program, *args.args], env_items=args.env,
                               pass_env=args.pass_env, chdir=config.chdir)
    reload = (lambda: config_mod.from_cli(args, args.config, given)) if args.config else None
    return run_server(config, program, reload_config=reload)


def entry() -> None:
    sys.exit(main())
