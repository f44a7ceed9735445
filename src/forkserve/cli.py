"""The ``forkserve`` command: ``serve``, ``client`` and ``settings``.

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
from .client import ClientFailed
from .client import run as run_client
from .control import VERBS
from .errors import ConfigError, ExitCode, ForkserveError
from .server import run_server
from .status import StatusFailed
from .supervisor import signal_table


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forkserve", description="A multi-process TCP server (fork, single).")
    parser.add_argument("--version", action="version", version=f"forkserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve an app (the seed's hello app by default)",
                           description="Serve an app until stopped by a signal.")
    serve.add_argument("app_spec", nargs="?", metavar="APP",
                       help="the app: hello, echo or MODULE:ATTR (same as --app)")
    serve.add_argument("--config", metavar="FILE", help="read settings from this TOML file "
                       "(command-line flags win over it)")
    config_mod.add_arguments(serve)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            given = {"app": args.app_spec} if args.app_spec else {}
            config = config_mod.from_cli(args, args.config, given)
            reload = ((lambda: config_mod.from_cli(args, args.config, given))
                      if args.config else None)
            return run_server(config, reload_config=reload)
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


def entry() -> None:
    sys.exit(main())
