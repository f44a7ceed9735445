"""The guarded scenarios (``persist_c10000``): what they need from this machine, checked and
explained before anything starts, and the server they run against.

Theory of operation
-------------------
10,000 clients held at once need what a default Linux session does not give: a file
descriptor each in the load processes and in the server (RLIMIT_NOFILE, often 1024 soft),
and an accept queue long enough for them to connect at once (``net.core.somaxconn``; a SYN
that finds the queue full is retried after 1 s, then 3 s: the run would measure the
retries). So a guarded scenario runs only when asked by name (``--scenarios``), and
``check`` refuses, with what to change, when:

- a forkserve model other than hybrid is chosen (fork would hold 10,000 processes, about
  2 MB each; prefork and single serve one client per process or in all);
- the hard RLIMIT_NOFILE is below ``conns + FD_MARGIN`` (the soft limit is raised to it
  here, and the load processes and the server inherit it; only root can raise the hard one);
- ``somaxconn`` is below ``SOMAXCONN_NEEDED``.

The hybrid server of a guarded scenario is started apart (``many_spec``) with what 10,000
clients from one address need: ``worker_connections`` for all of them, a ``backlog`` of
``SOMAXCONN_NEEDED``, its own RLIMIT_NOFILE, and the defences against silent clients off
(every client is 127.0.0.1 and connects before it talks: the per-source cap and the early
drop would refuse most of them, as they should for a real flood).
"""

from __future__ import annotations

import resource
from pathlib import Path

from .runner import SCENARIOS
from .servers import BenchUsage, ServerSpec

#: Descriptors beyond one per client: the interpreter, logs, pipes, the listeners.
FD_MARGIN = 1024
#: The accept queue a burst of 10,000 connections needs (the backlog the server asks for).
SOMAXCONN_NEEDED = 4096
SOMAXCONN_PATH = Path("/proc/sys/net/core/somaxconn")


def guarded(scenarios: list[str]) -> list[str]:
    return [name for name in scenarios if SCENARIOS[name].guarded]


def check(specs: list[ServerSpec], scenarios: list[str]) -> None:
    """Refuse (``BenchUsage``, one line saying what to change) a guarded scenario this
    machine or these servers cannot run; raise the soft RLIMIT_NOFILE to what it needs."""
    names = guarded(scenarios)
    if not names:
        return
    what = ", ".join(names)
    conns = max(SCENARIOS[name].conns for name in names)
    models = [s.name for s in specs if s.model is not None and s.model != "hybrid"]
    if models:
        raise BenchUsage(f"{what} needs a server that holds {conns:,} connections: run it with "
                         f"--models hybrid (or --models '' and --server), not "
                         f"{', '.join(models)}")
    need = conns + FD_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        raise BenchUsage(f"{what} needs RLIMIT_NOFILE of at least {need} and the hard limit "
                         f"here is {hard}: raise it (as root: ulimit -Hn {need}; a systemd "
                         f"unit: LimitNOFILE={need}) and run again")
    somaxconn = read_somaxconn()
    if somaxconn is not None and somaxconn < SOMAXCONN_NEEDED:
        raise BenchUsage(f"{what} needs net.core.somaxconn of at least {SOMAXCONN_NEEDED} "
                         f"(here {somaxconn}: {conns:,} clients connecting at once would "
                         f"wait for SYN retries): sysctl -w net.core.somaxconn="
                         f"{SOMAXCONN_NEEDED}, and run again")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def read_somaxconn() -> int | None:
    try:
        return int(SOMAXCONN_PATH.read_text())
    except (OSError, ValueError):
        return None  # (not Linux, or no /proc: the kernel's own default applies)


def many_spec(spec: ServerSpec, conns: int) -> ServerSpec:
    """The hybrid server of a guarded scenario (see the module's doc)."""
    return ServerSpec(spec.name, (*spec.argv, "--worker-connections", str(conns),
                                  "--backlog", str(SOMAXCONN_NEEDED),
                                  "--limit-nofile", str(conns + FD_MARGIN),
                                  "--max-startups-per-source", "0", "--max-startups", "off"),
                      model=spec.model)


def plan(specs: list[ServerSpec], scenarios: list[str]) -> list[tuple[ServerSpec, list[str]]]:
    """Each server to start and its scenarios: a hybrid model runs the guarded ones on a
    server of its own (``many_spec``); a --server runs them as it is."""
    names = guarded(scenarios)
    ordinary = [name for name in scenarios if name not in names]
    runs: list[tuple[ServerSpec, list[str]]] = []
    for spec in specs:
        if spec.model is None or not names:
            runs.append((spec, scenarios))
            continue
        if ordinary:
            runs.append((spec, ordinary))
        conns = max(SCENARIOS[name].conns for name in names)
        runs.append((many_spec(spec, conns), names))
    return runs
