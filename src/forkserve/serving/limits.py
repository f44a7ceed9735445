"""What each child may use: resource limits, set right after the fork. Child side.

Theory of operation
-------------------
- ``apply_limits`` runs in each per-connection child and each pre-forked worker right after
  the fork, before any client byte is read (xinetd's ``rlimit_*``): address space, CPU
  seconds, open files, processes. Soft and hard limits are both set, so the handler (or an
  exec'd program) cannot raise them again.
- ``check_limits`` verifies in the master, before binding, that the values are allowed (an
  unprivileged master cannot raise a hard limit). The single model has no child to apply them
  to, and refuses them. It lives here, beside the one table both read.

Who the server runs as (the master's identity drop) is ``master.privileges``.
"""

from __future__ import annotations

import os
import resource

from ..config import Config
from ..errors import ConfigError

#: setting -> (resource, how many bytes or units one unit of the setting is)
LIMITS = {
    "limit_as": (resource.RLIMIT_AS, 1024 * 1024),
    "limit_cpu": (resource.RLIMIT_CPU, 1),
    "limit_nofile": (resource.RLIMIT_NOFILE, 1),
    "limit_nproc": (resource.RLIMIT_NPROC, 1),
}


def _wanted(config: Config) -> list[tuple[str, int, int]]:
    return [(name, res, getattr(config, name) * unit)
            for name, (res, unit) in LIMITS.items() if getattr(config, name)]


def check_limits(config: Config) -> None:
    """Refuse limits that cannot be applied here. Raises ``ConfigError``."""
    wanted = _wanted(config)
    if wanted and config.model == "single":
        raise ConfigError(wanted[0][0], "limits apply to each child or worker; the single "
                                        "model serves in the master and has none")
    for name, res, value in wanted:
        hard = resource.getrlimit(res)[1]
        if os.geteuid() != 0 and hard != resource.RLIM_INFINITY and value > hard:
            raise ConfigError(name, f"above the hard limit {hard} of this process, which "
                                    "only root may raise")


def any_limits(config: Config) -> bool:
    """Whether ``apply_limits`` has anything to set (asked once, before the forks)."""
    return bool(_wanted(config))


def apply_limits(config: Config) -> None:
    """In a child or worker: set soft and hard limits. Raises ``OSError``."""
    for _name, res, value in _wanted(config):
        resource.setrlimit(res, (value, value))
