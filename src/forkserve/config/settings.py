"""The one declaration table: ``Config``, one field per setting, each declared with
:func:`setting` (default, kind, one doc line, CLI flag, the models that use it), and the
cross-setting rules checked when a ``Config`` is made. ``from_mapping`` is the way in for
keyword arguments and for the other front ends (``load``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..protocol.defence import DEFAULT_PENALTIES
from .kinds import (
    Address,
    Addresses,
    Choice,
    Flag,
    Hook,
    Int,
    IntOrUnset,
    Kind,
    Network,
    Networks,
    OneAddress,
    Path,
    Paths,
    PenaltiesKind,
    RateKind,
    Seconds,
    StartupsKind,
    Text,
    Umask,
    UnixAddress,
)

_META = "forkserve"


@dataclass(frozen=True)
class SettingInfo:
    """What :func:`setting` records about one field."""

    kind: Kind
    doc: str
    flag: str
    #: The models that use it; empty: every model.
    models: tuple[str, ...] = ()


def setting(default: object, kind: Kind, doc: str, *, flag: str = "",
            models: tuple[str, ...] = ()) -> Any:
    """Declare one setting: its default, kind, one doc line, (optionally) its CLI flag and
    the only models that use it."""
    return field(default=default, metadata={_META: SettingInfo(kind, doc, flag, models)})


MODELS = ("fork", "single", "prefork", "hybrid")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOOPS = ("auto", "asyncio", "uvloop")

#: prefork, unless the operator fixed the pool: Apache prefork's defaults out of the box
#: (StartServers 5, MinSpareServers 5, MaxSpareServers 10, MaxRequestWorkers 256), so that a
#: handful of clients that connect and stay silent cannot take every worker.
START_WORKERS = 5
MIN_SPARE = 5
#: max_spare, when not set, is this many times min_spare (Apache's 10 for its 5): a band wide
#: enough that a pool at its edge does not grow and shrink by turns.
MAX_SPARE_PER_MIN_SPARE = 2
MAX_WORKERS = 256
#: What an idle prefork worker of the hello app costs, measured (PSS from
#: /proc/PID/smaps_rollup, nearly all of it private: 256 workers after 15,000 connections,
#: 2.74 MB each, 690 MB in all; Python 3.11, x86-64). The docs quote it.
WORKER_PSS_MB = 2.7


@dataclass(frozen=True, kw_only=True)
class Config:
    """All settings of one forkserve server, checked. Construct it with keyword arguments.

    Raises ``ConfigError`` naming the first setting whose value cannot work.
    """

    bind: tuple[Address, ...] = setting(
        ("127.0.0.1:8080",), Addresses(),
        "Address to listen on: HOST:PORT, [IPV6]:PORT or unix:/path; repeat for more. "
        "Port 0 picks a free port (the ready line tells which).",
    )
    model: str = setting(
        "fork", Choice(options=MODELS),
        "How connections meet processes: fork (a child per connection), prefork (a pool of "
        "workers forked ahead, each serving one connection at a time), hybrid (pre-forked "
        "workers, each an event loop over many connections) or single (the master serves one "
        "connection at a time).",
    )
    app: str = setting(
        "hello", Text(),
        "The application: a built-in name (hello, echo) or MODULE:ATTR (a function "
        "handle(conn), a handler class, or a socketserver handler class). Also the first "
        "argument of `forkserve serve`.",
    )
    chdir: str | None = setting(
        None, Path(optional=True), "Change to this directory before loading the app."
    )
    backlog: int = setting(1024, Int(minimum=1), "Length of the kernel's accept queue.")
    workers: int = setting(
        0, Int(minimum=0),
        f"prefork: 0 (the default): an adaptive pool that starts with {START_WORKERS} workers "
        "and keeps between min_spare and max_spare of them idle, up to max_workers; N alone: a "
        "fixed pool of N; N with min_spare or max_spare: N to start with, then adaptive. "
        "TTIN/TTOU add or remove one. hybrid: N workers; 0: one per CPU.",
        models=("prefork", "hybrid"),
    )
    max_workers: int = setting(
        MAX_WORKERS, Int(minimum=1),
        "prefork: the pool never grows beyond this (Apache's MaxRequestWorkers; TTIN stops "
        f"there too). An idle worker of the hello app costs about {WORKER_PSS_MB:g} MB "
        f"(PSS), so {MAX_WORKERS} cost about {MAX_WORKERS * WORKER_PSS_MB / 1024:.1f} GB, and "
        "more with a bigger app: lower it to what the machine can hold.",
        models=("prefork", "hybrid"),
    )
    min_spare: int | None = setting(
        None, IntOrUnset(minimum=0),
        "prefork: grow the pool when fewer workers than this are idle (1, 2, 4 ... up to 32 "
        f"a second, up to max_workers). Unset: {MIN_SPARE} when the pool adapts; 0: never "
        "grow by itself.",
        models=("prefork",),
    )
    max_spare: int | None = setting(
        None, IntOrUnset(minimum=0),
        "prefork: retire one idle worker a second while more than this are idle. Unset: "
        f"{MAX_SPARE_PER_MIN_SPARE} x min_spare when the pool adapts; 0: never shrink.",
        models=("prefork",),
    )
    timeout: float = setting(
        30.0, Seconds(),
        "prefork: a worker whose own code makes no progress for this long (waiting on a "
        "client does not count) gets SIGABRT, which logs its Python stack, then SIGKILL. "
        "hybrid: the same for a worker whose event loop is blocked this long.",
        models=("prefork", "hybrid"),
    )
    max_worker_memory: int = setting(
        0, Int(minimum=0),
        "prefork: a worker whose resident memory passes this many MB is replaced after its "
        "connection (0: never).",
        models=("prefork", "hybrid"),
    )
    max_requests: int = setting(
        0, Int(minimum=0),
        "prefork: a worker is replaced after serving this many connections (0: never).",
        models=("prefork", "hybrid"),
    )
    max_requests_jitter: int = setting(
        0, Int(minimum=0),
        "prefork: add a random 0..N to each worker's max_requests, so they do not all "
        "restart at once.",
        models=("prefork", "hybrid"),
    )
    worker_connections: int = setting(
        1000, Int(minimum=1),
        "hybrid: connections one worker serves at once; at the cap it stops accepting and "
        "new clients wait in the backlog (or in another worker).",
        models=("hybrid",),
    )
    threads: int = setting(
        4, Int(minimum=0),
        "hybrid: threads per worker that run blocking handlers (a plain handle(conn) or a "
        "socketserver handler); 0: async handlers only.",
        models=("hybrid",),
    )
    loop: str = setting(
        "auto", Choice(options=LOOPS),
        "hybrid: the event loop: asyncio, uvloop (the `fast` extra) or auto (uvloop when "
        "installed).",
        models=("hybrid",),
    )
    max_children: int = setting(
        512, Int(minimum=1),
        "fork: connections served at once; at the cap the master stops accepting and new "
        "clients wait in the backlog.",
        models=("fork",),
    )
    max_line: int = setting(
        65536, Int(minimum=1),
        "Longest line a client may send, in bytes; a longer one gets `ERR line too long`.",
    )
    idle_timeout: float = setting(
        300.0, Seconds(), "A client silent this long is disconnected."
    )
    write_timeout: float = setting(
        60.0, Seconds(),
        "A client that accepts no data for this long while an answer is being written is "
        "disconnected.",
    )
    first_byte_timeout: float = setting(
        10.0, Seconds(minimum=0.0),
        "A client that has sent nothing this long after connecting is disconnected (Apache's "
        "mod_reqtimeout). 0: off, for apps that speak first; exec programs read the socket "
        "themselves, so it does not apply to them.",
    )
    stress_idle_timeout: float = setting(
        10.0, Seconds(minimum=0.0),
        "While the server is at its capacity (Postfix's stress mode), idle_timeout shrinks "
        "to this, for idle connections already open too (0: no stress mode).",
    )
    stress_first_byte_timeout: float = setting(
        2.0, Seconds(minimum=0.0),
        "...and first_byte_timeout to this.",
    )
    linger_timeout: float = setting(
        2.0, Seconds(minimum=0.0),
        "After the last answer, how long closing waits for the client to close its side "
        "(lingering, so a reset cannot destroy an answer it has not read; Apache's 2 s). A "
        "connection that was sent nothing closes at once; 0: never wait.",
    )
    max_connection_time: float = setting(
        0.0, Seconds(minimum=0.0),
        "A connection open this long is ended at its next read or write, however busy, and "
        "its process 5 s later if it neither reads nor writes (0: no limit). exec: the "
        "program is killed.",
    )
    graceful_timeout: float = setting(
        30.0, Seconds(minimum=0.0),
        "On a graceful stop, how long connections in flight may take before they are killed.",
    )
    control: Address | None = setting(
        None, UnixAddress(),
        "Serve the status (`forkserve status`) on this unix socket, from the master's loop.",
    )
    metrics_bind: Address | None = setting(
        None, OneAddress(),
        "Serve Prometheus metrics on this address (HOST:PORT or unix:/path), from the "
        "master's loop; needs the `metrics` extra.",
    )
    pid_file: str | None = setting(
        None, Path(optional=True),
        "Write the master's pid to this file (removed on exit); `forkserve signal` reads it.",
    )
    allow: tuple[Network, ...] = setting(
        (), Networks(),
        "Admit clients from this network (CIDR); repeat for more. With any allow rule, a "
        "client no rule matches is refused. Checked in the master before any fork.",
    )
    deny: tuple[Network, ...] = setting(
        (), Networks(),
        "Refuse clients from this network (CIDR); repeat for more. The longest matching "
        "prefix among allow, deny and rules_file wins; on a tie, deny.",
    )
    rules_file: str | None = setting(
        None, Path(optional=True),
        "A file of `allow CIDR` / `deny CIDR` lines (# comments), added to allow and deny; "
        "re-read on reload and within a second of being replaced (by rename).",
    )
    max_per_ip: int = setting(
        0, Int(minimum=0),
        "Connections in flight from one client (IPv4 address, IPv6 /64) at most (0: no "
        "limit); more are refused at once.",
    )
    max_startups_per_source: int | None = setting(
        None, IntOrUnset(minimum=0),
        "Unproven connections (no whole first line yet) from one client (IPv4 address, IPv6 "
        "/64) at most, as sshd's PerSourceMaxStartups; more are refused (fork: after 0.25 s "
        "in which a first line still proves them). Unset: an "
        "eighth of the capacity (max_children; prefork: max_workers), at least 8; 0: no "
        "limit. Behind a NAT, or a proxy that sends no PROXY header, its clients count as one.",
    )
    rate_per_ip: str | None = setting(
        None, RateKind(),
        "New connections from one client at most, as N/SECONDS (xinetd cps); a client over "
        "it is refused for rate_penalty.",
    )
    rate_penalty: float = setting(
        0.0, Seconds(minimum=0.0),
        "How long a client over rate_per_ip is refused (0: the rate's SECONDS).",
    )
    max_startups: str = setting(
        "auto", StartupsKind(),
        "Early drop of unproven connections (sshd's MaxStartups START:RATE:FULL; unproven: "
        "no whole first line yet): from START held, a new one from a client that already "
        "has an unproven one is refused with a chance rising from RATE % to 100 % at FULL; "
        "a client with none is never dropped, and at FULL the oldest unproven connection "
        "makes room for it. auto: an eighth of the capacity (at least 10), 30, half of it; "
        "off."
    )
    penalties: str = setting(
        DEFAULT_PENALTIES, PenaltiesKind(),
        "Per-source penalties (sshd's PerSourcePenalties): seconds a client is refused, "
        "before any fork, after a connection of its ended by first_byte (silent past "
        "first_byte_timeout), handshake (PROXY/TLS too slow), line_too_long or crash (its "
        "process killed by a signal such as SIGSEGV); they add up to max and are enforced "
        "once min has accrued (one slip costs nothing); off.",
    )
    penalty_exempt: tuple[Network, ...] = setting(
        (), Networks(),
        "Clients never penalised (CIDR; repeat for more), such as health checkers.",
    )
    refuse_message: str | None = setting(
        None, Text(optional=True),
        "Sent (with a newline) to a refused client before the connection is closed.",
    )
    on_full: str = setting(
        "defer", Choice(options=("defer", "refuse")),
        "At max_children: defer (new clients wait in the kernel backlog) or refuse (closed "
        "at once, after refuse_message).",
    )
    proxy_protocol: bool = setting(
        False, Flag(),
        "Every connection starts with a PROXY protocol header (v1 or v2, as HAProxy sends), "
        "read before the handler within handshake_timeout: the handler, the access log and "
        "exec programs see the real client. Needs trusted_proxy.",
    )
    trusted_proxy: tuple[Network, ...] = setting(
        (), Networks(),
        "With proxy_protocol: the only peers whose header is believed (CIDR; repeat for "
        "more); any other peer is disconnected before the handler.",
    )
    certfile: str | None = setting(
        None, Path(optional=True),
        "TLS: the server's certificate chain (PEM); with it, every listener speaks TLS "
        "(1.2 at least). Loaded before privileges are dropped, again on reload.",
    )
    keyfile: str | None = setting(
        None, Path(optional=True), "TLS: the private key (PEM), if not in certfile."
    )
    ca_certs: str | None = setting(
        None, Path(optional=True), "TLS: CA certificates (PEM) that client certificates must "
        "chain to.",
    )
    client_cert: str = setting(
        "none", Choice(options=("none", "optional", "required")),
        "TLS: ask clients for a certificate: none, optional or required (needs ca_certs).",
    )
    handshake_timeout: float = setting(
        5.0, Seconds(), "A client that has not sent its whole PROXY header and completed its "
        "TLS handshake by then is disconnected, before any handler runs.",
    )
    user: str | None = setting(
        None, Text(optional=True),
        "Run as this user (name or uid) once the sockets are bound: supplementary groups are "
        "dropped, then the group and user set, before any fork. Needs root.",
    )
    group: str | None = setting(
        None, Text(optional=True),
        "Run as this group (name or gid); default: the user's primary group.",
    )
    umask: int | None = setting(
        None, Umask(), "File mode creation mask of the master and everything it forks (octal)."
    )
    limit_as: int = setting(
        0, Int(minimum=0),
        "Per child or worker: address space limit in MB (RLIMIT_AS; 0: unchanged).",
    )
    limit_cpu: int = setting(
        0, Int(minimum=0),
        "Per child or worker: CPU seconds before the kernel ends it (RLIMIT_CPU; 0: unchanged).",
    )
    limit_nofile: int = setting(
        0, Int(minimum=0), "Per child or worker: open files (RLIMIT_NOFILE; 0: unchanged)."
    )
    limit_nproc: int = setting(
        0, Int(minimum=0),
        "Per child or worker: processes of its user (RLIMIT_NPROC; 0: unchanged).",
    )
    log_level: str = setting("info", Choice(options=LOG_LEVELS), "Least severe log level shown.")
    log_file: str | None = setting(
        None, Path(optional=True),
        "Write the log to this file too, beside standard error (reopened on USR1).",
    )
    access_log: str | None = setting(
        None, Path(optional=True),
        "Write one line per connection (time, peer, pid, duration, bytes, exit status) to "
        "this file; `-` means standard error. The time is the log's (text) or ISO 8601 (json).",
    )
    access_log_format: str = setting(
        "text", Choice(options=("text", "json")), "Format of the access log: text or json."
    )
    on_starting: Callable[..., object] | str | None = setting(
        None, Hook(), "Hook: called in the master with the Config before anything is bound; "
        "if it raises, nothing starts (exit 2).",
    )
    post_fork: Callable[..., object] | str | None = setting(
        None, Hook(), "Hook: called in each new child or worker with a forkserve.hooks.Process "
        "(pid, role, slot, generation) before it serves; if it raises, a child closes its "
        "connection and a worker counts as failed while booting.",
    )
    child_exit: Callable[..., object] | str | None = setting(
        None, Hook(), "Hook: called in the master with a forkserve.hooks.ChildExited (pid, "
        "status, code) for each child or worker it reaps.",
    )
    on_reload: Callable[..., object] | str | None = setting(
        None, Hook(), "Hook: called in the master with the new Config after a reload.",
    )
    on_exit: Callable[..., object] | str | None = setting(
        None, Hook(), "Hook: called in the master with the exit status, after the last child "
        "is gone.",
    )

    reload: bool = setting(
        False, Flag(),
        "Development: watch the app's source files (the .py files under the app directory, "
        "and reload_dir) and reload as SIGHUP does when one changes; needs the `reload` "
        "extra (watchfiles). Not with user, nor with exec.",
    )
    reload_dir: tuple[str, ...] = setting(
        (), Paths(), "With reload: watch this directory too; repeat for more.",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            info: SettingInfo = f.metadata[_META]
            try:
                value = info.kind.convert(getattr(self, f.name))
            except ValueError as exc:
                raise ConfigError(f.name, str(exc)) from None
            object.__setattr__(self, f.name, value)
        if self.proxy_protocol and not self.trusted_proxy:
            raise ConfigError("trusted_proxy", "proxy_protocol needs the proxies' addresses "
                                               "(CIDR): a header from anyone else is a lie")
        if self.max_spare and self.min_spare is not None and self.max_spare <= self.min_spare:
            # Apache prefork's rule: with max <= min, a pool at the edge would grow and
            # shrink by turns every second
            raise ConfigError("max_spare", f"must be above min_spare ({self.min_spare}), or "
                                           "0 to never shrink")
        if self.reload and self.user is not None:
            raise ConfigError("reload", "a development reload is not for a server that "
                                        "changes user: drop --reload or --user")
        if self.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise ConfigError("loop", "uvloop is not installed (pip install "
                                      "'forkserve[fast]'), or use auto or asyncio")
        if self.workers > self.max_workers:
            raise ConfigError("workers", f"must be at most max_workers ({self.max_workers}), "
                                         f"got {self.workers}")

    def replace(self, **changes: object) -> Config:
        """A copy with ``changes`` applied and checked."""
        return from_mapping({**self.as_dict(), **changes})

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def settings() -> tuple[tuple[str, SettingInfo, object], ...]:
    """Every declared setting as ``(name, info, default)``, in declaration order."""
    return tuple(
        (f.name, f.metadata[_META], f.default) for f in dataclasses.fields(Config)
    )


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def from_mapping(values: Mapping[str, object], *, source: str | None = None,
                 naming: Callable[[str], str] = str) -> Config:
    """Build a ``Config`` from ``values``; errors name settings with ``naming`` and ``source``."""
    known = [name for name, _, _ in settings()]
    for key in values:
        if key not in known:
            import difflib  # noqa: PLC0415  (an error's hint: not in every zygote, 1.3 MB)

            near = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {naming(near[0])}?" if near else "`forkserve settings` lists them"
            raise ConfigError(naming(key), f"unknown setting; {hint}", source)
    try:
        return Config(**values)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise ConfigError(naming(exc.setting), exc.problem, source) from None
