"""The master's identity: who the server runs as after binding. Runs in the master only.

Theory of operation
-------------------
- ``resolve_identity`` turns ``user``/``group`` (names or numbers) into ids before anything is
  bound, so an unknown user is a one-line error (exit 2), not a failure after binding.
- ``drop`` runs in the master after every socket is bound (ports below 1024 need root) and
  before any fork (CERT POS36-C order): ``setgroups([])``, so no supplementary group survives;
  ``setgid``; ``setuid``. Changing the uid away from 0 clears the permitted and effective
  capability sets (capabilities(7)), so nothing the master forks can regain root. Unix socket
  files are handed to the new owner first, so the master can still remove them at exit.
  Asking for another identity when not root is refused with a clear error, never ignored.

What each child may use (rlimits) is the child's side: ``serving.limits``.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from ..config import Config
from ..errors import ConfigError

# Re-exported for serving/worker.py and master/reload.py, which import them from here until
# issue 15 part 1 merges (then they import serving.limits and these lines go).
from ..serving.limits import apply_limits as apply_limits  # noqa: PLC0414
from ..serving.limits import check_limits as check_limits  # noqa: PLC0414
from .listeners import Listener


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    name: str


def resolve_identity(config: Config) -> Identity | None:
    """The identity ``user``/``group`` ask for, or None. Raises ``ConfigError``."""
    if config.user is None and config.group is None:
        return None
    if config.user is not None:
        try:
            entry = (pwd.getpwuid(int(config.user)) if config.user.isdigit()
                     else pwd.getpwnam(config.user))
        except (KeyError, OverflowError):
            raise ConfigError("user", f"no such user: {config.user!r}") from None
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    else:
        uid, gid, name = os.getuid(), os.getgid(), str(os.getuid())
    if config.group is not None:
        try:
            gid = (grp.getgrgid(int(config.group)).gr_gid if config.group.isdigit()
                   else grp.getgrnam(config.group).gr_gid)
        except (KeyError, OverflowError):
            raise ConfigError("group", f"no such group: {config.group!r}") from None
    if os.geteuid() != 0 and (uid != os.geteuid() or gid != os.getegid()):
        which = "user" if uid != os.geteuid() else "group"
        raise ConfigError(which, f"switching to {name} (uid {uid}, gid {gid}) needs root; "
                                 f"this server runs as uid {os.geteuid()}")
    return Identity(uid, gid, name)


def drop(identity: Identity, listeners: list[Listener]) -> None:
    """Become ``identity`` for good: supplementary groups, then gid, then uid."""
    if os.geteuid() != 0:
        return  # already this identity (resolve_identity refused anything else)
    for listener in listeners:
        if listener.unix_inode is not None:  # a file forkserve made (not systemd's)
            os.chown(listener.address.path, identity.uid, identity.gid)
    os.setgroups([])
    os.setgid(identity.gid)
    os.setuid(identity.uid)
    if identity.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise RuntimeError("privileges could be regained after setuid")  # never expected
