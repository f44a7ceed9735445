"""What a connection does to its socket at the kernel's level: its timeouts as the kernel's
``struct timeval``, and how it ends (``Connection.close``, rule 6 of ``connection``): TLS
close_notify, then lingering (shut the write side, read and drop what the client still sends
until it closes, bounded in time and bytes) or, when the client is owed nothing, draining
what is queued without waiting. Runs in the process that serves the connection.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
import time

from .stopsignal import Waiter, Woke

#: Bytes asked of the kernel per read: large enough for many pipelined lines at once.
RECV_SIZE = 65536
#: How long ``close()`` drains a client that has not closed its side yet, by default (the
#: ``linger_timeout`` setting; Apache's 2 s).
LINGER_SECONDS = 2.0
#: ...and how much it reads at most while doing so, so lingering is bounded in bytes too.
LINGER_MAX_BYTES = 1 << 20
#: The shortest receive timeout: a read returns what is queued and never waits.
NO_WAIT = 0.000_001
#: Longest timeout the kernel's timeval takes without overflow that we will ever set.
MAX_TIMEOUT = 1e6


def timeval(seconds: float) -> bytes:
    """A ``struct timeval``; never all-zero, which the kernel reads as "no timeout"."""
    seconds = min(max(seconds, NO_WAIT), MAX_TIMEOUT)
    whole = int(seconds)
    return struct.pack("@ll", whole, max(int((seconds - whole) * 1_000_000), 0 if whole else 1))


def timed_out(began: float, timeout: float | None) -> bool:
    """Has a kernel timeout of ``timeout`` seconds, started at ``began``, run out?"""
    return timeout is not None and time.monotonic() - began >= timeout * 0.99


def family_of(sock: socket.socket) -> int:
    """``sock.family`` as a plain int: the property turns it into an ``AddressFamily`` member
    through enum's Python code, whose pages each child of the zygote would copy (issue 16).
    Compare it with ``socket.AF_UNIX`` as usual."""
    return super(socket.socket, sock).family


def set_blocking_mode(sock: socket.socket) -> bool:
    """Put ``sock`` in the mode its deadlines need (rule 4 of ``connection``); True for TLS."""
    # (ssl is loaded only when TLS is on; without it no socket can be an SSLSocket)
    ssl = sys.modules.get("ssl")
    tls = ssl is not None and isinstance(sock, ssl.SSLSocket)
    if tls:
        sock.settimeout(0.0)  # OpenSSL reports a kernel timeout instead of retrying ...
        os.set_blocking(sock.fileno(), True)  # ... which the blocking fd gives it
    else:
        sock.settimeout(None)
    return tls


def set_timeouts(sock: socket.socket, read: float | None, write: float | None) -> None:
    """The kernel's receive and send timeouts (``SO_RCVTIMEO``, ``SO_SNDTIMEO``); None: unset."""
    if read is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(read))
    if write is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(write))


def close_notify(sock: socket.socket, linger_timeout: float) -> None:
    """TLS: send close_notify, so the client can tell the end from a truncation. Whatever
    OpenSSL says next (it would wait for the client's close_notify) is ignored."""
    with contextlib.suppress(OSError, ValueError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(linger_timeout))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(NO_WAIT))
        sock.unwrap()  # type: ignore[attr-defined]


def drain_queued(sock: socket.socket) -> None:
    """Read (and drop) what the client has sent already, without waiting, so that the
    close sends a FIN, not a reset."""
    drained = 0
    with contextlib.suppress(OSError, ValueError):  # (ValueError: TLS still on)
        while drained < LINGER_MAX_BYTES:
            chunk = sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            if not chunk:
                return
            drained += len(chunk)


def linger(sock: socket.socket, linger_timeout: float, waiter: Waiter | None) -> None:
    """Shut the write side, then read (and drop) what the client still sends until it
    closes its side, for ``linger_timeout`` and ``LINGER_MAX_BYTES`` at most. A stop does
    not cut it short (see ``Connection.interrupt``)."""
    deadline = time.monotonic() + linger_timeout
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(linger_timeout))
        drained = 0
        while drained < LINGER_MAX_BYTES and (left := deadline - time.monotonic()) > 0:
            if waiter is not None:
                woke = waiter.wait(left)
                if woke is Woke.SIGNAL:
                    continue
                if woke is Woke.TIMEOUT:
                    break
            chunk = sock.recv(RECV_SIZE)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass  # reset, timeout or already shut: the client had its chance
