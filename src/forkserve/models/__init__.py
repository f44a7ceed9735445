"""Models decide how connections meet processes; the master does everything else.

The interface between the two is ``models.host`` (read it first): a model is built from
``Parts`` (the serving bundle, the kernel seam, the listeners, the admission gate and the
``Host`` it reports to) and answers the calls of ``Model``. Adding a model is one class in its
own module, one name in ``MODELS`` below and one in ``config.MODELS``.
"""

from __future__ import annotations

from ..apps.exec import Program, check_model
from ..errors import ConfigError
from ..serving.handlers import check_app
from .fork import ForkModel
from .fork_exec import ExecModel
from .host import Factory, Model, ModelStatus, Parts, Serving
from .hybrid import HybridModel
from .prefork import PreforkModel
from .single import SingleModel

__all__ = ["MODELS", "Model", "ModelStatus", "Parts", "Serving", "create"]


def _fork(p: Parts) -> Model:
    return ForkModel(p.serving, host=p.host, kernel=p.kernel, gate=p.gate)


def _exec(p: Parts) -> Model:
    return ExecModel(p.serving, host=p.host, kernel=p.kernel, gate=p.gate)


def _single(p: Parts) -> Model:
    return SingleModel(p.serving, host=p.host, kernel=p.kernel, gate=p.gate)


def _prefork(p: Parts) -> Model:
    return PreforkModel(p.serving, host=p.host, kernel=p.kernel, gate=p.gate,
                        listeners=p.listeners)


def _hybrid(p: Parts) -> Model:
    return HybridModel(p.serving, host=p.host, kernel=p.kernel, gate=p.gate,
                       listeners=p.listeners)


#: The models by their ``Config.model`` name: each takes from ``Parts`` what it uses.
MODELS: dict[str, Factory] = {"fork": _fork, "single": _single, "prefork": _prefork,
                              "hybrid": _hybrid}


def create(parts: Parts) -> Model:
    """The model that ``parts.serving.config.model`` names (a checked ``Config.model``).

    An exec ``Program`` in place of the app runs under the fork model only (``forkserve
    exec``); raises ``ConfigError`` for another model, or with TLS on.
    """
    name = parts.serving.config.model
    if isinstance(parts.serving.app, Program):
        check_model(name)
        if parts.serving.tls is not None:
            raise ConfigError("certfile", "exec hands the program the raw socket, so it "
                                          "cannot speak TLS for it; put a TLS terminator "
                                          "(HAProxy, stunnel) in front")
        return _exec(parts)
    check_app(parts.serving.app, parts.serving.config)
    return MODELS[name](parts)
