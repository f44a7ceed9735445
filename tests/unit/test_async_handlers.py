"""Async handlers: how they are adapted, which models may run them, what hybrid reads back."""

from __future__ import annotations

import importlib
import inspect

import pytest

from forkserve import AsyncHandler, ConfigError
from forkserve.apps import ASYNC_FORMS
from forkserve.apps import hello as hello_app
from forkserve.config import Config
from forkserve.models.hybrid import open_count, slot_figures
from forkserve.ops.scoreboard import Slot, SlotState
from forkserve.serving.aio_slots import OPEN_FORMAT, slot_counts, slot_text
from forkserve.serving.handlers import AsyncApp, adapt, check_app, is_async


async def handle(conn: object) -> None:
    pass


class Session:
    async def setup(self, conn: object) -> None:
        pass

    async def handle(self, conn: object) -> None:
        pass


class HalfAsync:
    def setup(self, conn: object) -> None:
        pass

    async def handle(self, conn: object) -> None:
        pass


def test_an_async_function_and_class_become_async_apps() -> None:
    assert isinstance(adapt(handle, "m:handle"), AsyncApp)
    app = adapt(Session, "m:Session")
    assert isinstance(app, AsyncApp)
    assert isinstance(Session(), AsyncHandler)


def test_an_async_handle_with_a_blocking_setup_is_refused() -> None:
    with pytest.raises(ConfigError, match="setup must be async def too"):
        adapt(HalfAsync, "m:HalfAsync")


def test_a_blocking_model_refuses_an_async_app_and_calling_it_says_why() -> None:
    app = adapt(handle, "m:handle")
    for model in ("fork", "prefork", "single"):
        with pytest.raises(ConfigError, match="async handlers need --model hybrid"):
            check_app(app, Config(model=model))
    check_app(app, Config(model="hybrid", threads=0))  # no thread needed
    with pytest.raises(TypeError, match="only the hybrid model runs it"):
        app(None)  # type: ignore[arg-type]


def test_hybrid_with_no_threads_refuses_a_blocking_handler_but_not_the_builtins() -> None:
    def blocking(conn: object) -> None:
        pass

    with pytest.raises(ConfigError, match="threads: 0 leaves no thread"):
        check_app(blocking, Config(model="hybrid", threads=0))
    assert is_async(hello_app.handle)  # its async form runs on the loop
    check_app(hello_app.handle, Config(model="hybrid", threads=0))


def test_every_builtin_async_form_is_a_coroutine_function() -> None:
    for blocking, spec in ASYNC_FORMS.items():
        for name in (blocking, spec):
            module, _, attr = name.partition(":")
            assert callable(getattr(importlib.import_module(module), attr))
        module, _, attr = spec.partition(":")
        assert inspect.iscoroutinefunction(getattr(importlib.import_module(module), attr))


@pytest.mark.parametrize(("peer", "state", "count"), [
    (OPEN_FORMAT.format(12), SlotState.WRITING, 12),
    (OPEN_FORMAT.format(0), SlotState.IDLE, 0),
    ("", SlotState.IDLE, 0),
    (OPEN_FORMAT.format(5), SlotState.STARTING, 0),
    ("127.0.0.1:5000", SlotState.WRITING, 0),
])
def test_the_status_reads_open_connections_from_a_slot(peer: str, state: SlotState,
                                                       count: int) -> None:
    slot = Slot(0, 42, 0, state, 0, 0, 0, 0.0, 0.0, peer)
    assert open_count(slot) == count


@pytest.mark.parametrize(("open_now", "in_threads"), [(0, None), (7, None), (0, 0), (12, 5),
                                                    (3, 3)])
def test_a_slots_text_says_the_connections_and_those_in_threads(
        open_now: int, in_threads: int | None) -> None:
    text = slot_text(open_now, in_threads)
    assert slot_counts(text) == (open_now, in_threads or 0)
    slot = Slot(0, 42, 0, SlotState.WRITING, 0, 0, 0, 0.0, 0.0, text)
    assert slot_figures(slot) == (open_now, in_threads or 0)
    assert open_count(slot) == open_now


def test_loop_uvloop_needs_uvloop_installed_and_unknown_loops_are_refused() -> None:
    with pytest.raises(ConfigError, match="loop"):
        Config(model="hybrid", loop="libuv")
    assert Config(model="hybrid", loop="uvloop").loop == "uvloop"  # (dev installs it)
