"""``forkserve bench``: forkserve's models (and any server) measured on loopback, in one run.

Theory of operation
-------------------
``command`` checks the command line and runs each server (``servers``: started in its own
session, probed until its port accepts, stopped with SIGTERM then SIGKILL and reaped) through
the standard scenarios (``runner``), whose load comes from ``loadclient`` processes (one
selectors event loop each; results back as one JSON line each, merged by summing histograms).
``report`` prints progress, the table, the JSON and the plot. Nothing here runs inside a
forkserve master; the bench is a separate tool that only talks to servers over 127.0.0.1.

The shared C ``loadgen`` (``../shared/bench``) remains the reference for absolute figures: a
Python client spends several microseconds of CPU per request, so it saturates before fast
servers do; the bench says so when a client process nears a full core.
"""

from __future__ import annotations

from .command import add_parser, run

__all__ = ["add_parser", "run"]
