"""``python -m forkserve``: the same as the ``forkserve`` command."""

from .cli import entry

entry()
