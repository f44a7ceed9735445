"""``forkserve bench``: its arguments, and the run from specs to table.

Theory of operation
-------------------
Everything the command line says is checked before anything starts (models, --server specs,
scenarios, matplotlib for --plot): bad input is one line and exit 2. Then each server in turn
is started on a free loopback port, measured idle, run through every chosen scenario (with a
settle between scenarios) and stopped, in a ``try/finally`` that stops it whatever happens.
A server that dies or never opens its port is one line and exit 1; the results so far are still
printed. Worst-case time: servers x scenarios x (warm-up + duration + settle <= 10 s) plus
start (<= 15 s) and stop (<= 8 s) per server.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..._version import __version__
from ...errors import ExitCode
from . import many, report
from .runner import DEFAULT_SCENARIOS, SCENARIOS, Window, run_scenario, settle
from .servers import (
    MODELS,
    BenchFailed,
    BenchUsage,
    RunningServer,
    ServerSpec,
    free_port,
    model_spec,
    parse_server,
)

#: Longest window accepted (a typo like 3000 should not hold the machine for an hour).
MAX_DURATION = 600.0
MAX_CLIENT_PROCESSES = 64


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser(
        "bench", help="measure forkserve's models (and your servers) on 127.0.0.1",
        description="Start each model of forkserve (and each --server) on a free loopback "
                    "port, run the standard scenarios against it (request ping, answer "
                    "Hello from server!), and print req/s, latency percentiles, errors, "
                    "timeouts and memory per connection.")
    bench.add_argument("--models", default=",".join(MODELS), metavar="LIST",
                       help=f"forkserve models to measure, comma-separated, or '' for none "
                            f"(default {','.join(MODELS)})")
    bench.add_argument("--server", action="append", default=[], metavar="'NAME=COMMAND {port}'",
                       help="also measure this server; {port} is replaced by the port it must "
                            "listen on 127.0.0.1 (repeatable)")
    bench.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS), metavar="LIST",
                       help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: all "
                            f"but persist_c10000, which runs only when named: it needs "
                            f"RLIMIT_NOFILE above 10,000 and somaxconn of "
                            f"{many.SOMAXCONN_NEEDED}, checked first)")
    bench.add_argument("--duration", type=float, default=3.0, metavar="SECONDS",
                       help="measured window per scenario (default 3)")
    bench.add_argument("--warmup", type=float, default=1.0, metavar="SECONDS",
                       help="unmeasured start of each scenario (default 1)")
    bench.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS",
                       help="a request unanswered this long is a timeout (default 2)")
    bench.add_argument("--client-processes", type=int, default=2, metavar="N",
                       help="load-generating processes, each an event loop (default 2)")
    bench.add_argument("--json", type=Path, metavar="FILE", help="write the raw results here")
    bench.add_argument("--plot", type=Path, metavar="FILE.png",
                       help="draw throughput and p99 per scenario (needs matplotlib)")
    bench.set_defaults(tool=run)


def specs_from(args: argparse.Namespace) -> list[ServerSpec]:
    specs = [model_spec(m.strip()) for m in args.models.split(",") if m.strip()]
    specs += [parse_server(text) for text in args.server]
    names = [s.name for s in specs]
    if not specs:
        raise BenchUsage("nothing to measure: give --models and/or --server")
    if len(set(names)) != len(names):
        raise BenchUsage(f"server names must differ: {', '.join(names)}")
    return specs


def check(args: argparse.Namespace) -> tuple[list[ServerSpec], list[str], Window]:
    """Validate everything up front; raises BenchUsage."""
    specs = specs_from(args)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown or not scenarios:
        raise BenchUsage(f"unknown scenario {', '.join(unknown) or '(none)'} "
                         f"(choose from {', '.join(SCENARIOS)})")
    if not 0 < args.duration <= MAX_DURATION or not 0 <= args.warmup <= MAX_DURATION:
        raise BenchUsage(f"--duration must be in (0, {MAX_DURATION:g}], --warmup >= 0")
    if not 0 < args.timeout <= MAX_DURATION:
        raise BenchUsage("--timeout must be above 0")
    if not 1 <= args.client_processes <= MAX_CLIENT_PROCESSES:
        raise BenchUsage(f"--client-processes must be 1..{MAX_CLIENT_PROCESSES}")
    if args.plot is not None:
        report.check_plot()
    many.check(specs, scenarios)
    return specs, scenarios, Window(args.warmup, args.duration, args.timeout,
                                    args.client_processes)


def measure(spec: ServerSpec, scenarios: list[str], w: Window, logdir: Path, *,
            progress: report.Progress, records: list[dict[str, Any]]) -> None:
    """Start ``spec``, run every scenario into ``records``, stop it (always)."""
    server = RunningServer(spec, free_port(), logdir / f"{spec.name}.log")
    try:
        progress.say(f"starting {spec.name}")
        server.start()
        time.sleep(0.3)  # let a pool finish forking before the idle sample
        idle = server.mem()
        for name in scenarios:
            progress.say(f"{spec.name}: {name}")
            r = run_scenario(server, SCENARIOS[name], w, idle.pss_kb)
            r["mem_idle"] = {"pss_kb": idle.pss_kb, "nprocs": idle.nprocs}
            r["cmd"] = server.argv
            records.append(r)
            progress.step(r)
            if not server.alive():
                raise server.died()
            settle(server, idle.nprocs)
    finally:
        server.stop()


def run(args: argparse.Namespace) -> int:
    """The bench command; returns the exit status (0, 1 when a server failed, 2 usage)."""
    try:
        specs, scenarios, w = check(args)
    except BenchUsage as exc:
        print(f"forkserve: bench: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    records: list[dict[str, Any]] = []
    status = 0
    try:
        runs = many.plan(specs, scenarios)
        with tempfile.TemporaryDirectory(prefix="forkserve-bench-") as logdir, \
                report.Progress(sum(len(names) for _, names in runs)) as progress:
            for spec, names in runs:
                measure(spec, names, w, Path(logdir), progress=progress, records=records)
    except BenchFailed as exc:
        print(f"forkserve: bench: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("forkserve: bench: interrupted; every server was stopped", file=sys.stderr)
        return 130
    finish(args, w, specs, records)
    return status


def finish(args: argparse.Namespace, w: Window, specs: list[ServerSpec],
           records: list[dict[str, Any]]) -> None:
    if not records:
        return
    report.print_table(records)
    for line in report.notes(records):
        print(line)
    meta = {"forkserve_version": __version__, "date": time.strftime("%Y-%m-%d"),
            "cpus": os.cpu_count(), "warmup_s": w.warmup, "duration_s": w.duration,
            "timeout_s": w.timeout, "client_processes": w.client_processes,
            "servers": {s.name: list(s.argv) for s in specs}}
    if args.json is not None:
        report.write_json(args.json, meta, records)
    if args.plot is not None:
        report.plot(args.plot, records, meta)
