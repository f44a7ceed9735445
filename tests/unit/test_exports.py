"""The public surface is small and explicit (STYLE rule 13)."""

from __future__ import annotations

import forkserve


def test_public_names_are_pinned() -> None:
    assert sorted(forkserve.__all__) == [
        "AsyncConnection", "AsyncHandler", "Config", "ConfigError", "Connection",
        "ForkserveError", "Handler", "ListenError",
        "__version__",
        "serve",
    ]
    for name in forkserve.__all__:
        assert hasattr(forkserve, name)


def test_errors_form_one_tree() -> None:
    assert issubclass(forkserve.ConfigError, forkserve.ForkserveError)
    assert issubclass(forkserve.ConfigError, ValueError)
    assert issubclass(forkserve.ListenError, forkserve.ForkserveError)


def test_hook_arguments_are_pinned() -> None:
    import dataclasses  # noqa: PLC0415

    from forkserve import hooks  # noqa: PLC0415

    assert hooks.HOOK_NAMES == ("on_starting", "post_fork", "child_exit", "on_reload",
                                "on_exit")
    assert [f.name for f in dataclasses.fields(hooks.Process)] == [
        "pid", "role", "slot", "generation"]
    assert [f.name for f in dataclasses.fields(hooks.ChildExited)] == ["pid", "status", "code"]
