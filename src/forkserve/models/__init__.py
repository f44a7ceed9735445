"""Models decide how connections meet processes; the supervisor does everything else.

Every model implements ``Model``. The supervisor owns the listeners, the signals, reaping and
the stop checklist; it calls the model when a listener is readable (``on_readable``), when a
child has been reaped (``on_exit``), and asks it which processes to signal on a stop
(``pids``). Adding a model is one class here and one name in ``config.MODELS``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..kernel import Exited
    from ..listeners import Listener
    from ..supervisor import Supervisor


class Model(Protocol):
    name: str
    #: Whether the master accepts connections (fork, single) or the workers do (prefork).
    accepts: bool

    @property
    def full(self) -> bool:
        """True while the model can take no more connections (accepting pauses)."""

    def start(self) -> None:
        """Called once in the master before the first accept."""

    def reconfigure(self) -> None:
        """The supervisor's ``config`` or ``app`` was reloaded: use them from now on."""

    def manage(self) -> None:
        """Called after every turn of the master's loop: keep the processes up to target."""

    def next_deadline(self) -> float | None:
        """The monotonic time at which ``manage`` has something to do, if any."""

    def scale(self, delta: int) -> None:
        """TTIN (+1) or TTOU (-1)."""

    def on_readable(self, listener: Listener) -> None:
        """``listener`` has connections waiting: take what the model can."""

    def on_exit(self, exited: Exited) -> bool:
        """A child was reaped; return False if it was not this model's."""

    def interrupt(self, fast: bool) -> None:
        """A stop was asked for. Called from the signal handler: at most a couple of system
        calls on a connection served in this process, no locks, no logging."""

    def pids(self) -> Collection[int]:
        """Processes that a stop must wait for (and may have to kill)."""

    def close(self) -> None:
        """Release what the model holds; called once, after the last child is reaped."""


def create(name: str, supervisor: Supervisor) -> Model:
    """The model called ``name`` (a checked ``Config.model``)."""
    return _MODELS[name](supervisor)


from .fork import ForkModel  # noqa: E402  (the models need the protocol above)
from .prefork import PreforkModel  # noqa: E402
from .single import SingleModel  # noqa: E402

_MODELS: dict[str, Callable[[Supervisor], Model]] = {
    "fork": ForkModel, "single": SingleModel, "prefork": PreforkModel,
}
