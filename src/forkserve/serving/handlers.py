"""Load an application by name and adapt it to the one handler contract.

Theory of operation
-------------------
Every model calls the same thing: ``app(conn)``, one call per connection, in the process that
serves it (STYLE rule 2). This module turns what a user names into that callable, in the
master, before any socket is bound, so a typo costs one line and exit status 2, not a crash
loop:

- a built-in name (``hello``, ``echo``);
- ``module:attr`` (``attr`` may be dotted), imported with the working directory (or
  ``--chdir``) on the import path, like gunicorn and uvicorn;

and the object may be:

- a function ``handle(conn)``;
- a class whose instances have ``handle(conn)`` and optionally ``setup(conn)`` and
  ``finish(conn)`` (one instance per connection; ``finish`` runs even if ``handle`` raised);
- a ``socketserver.BaseRequestHandler`` subclass, run unchanged: it gets ``request`` (the
  socket), ``client_address`` and a ``server`` with ``server_address``, so code written for
  ``socketserver.ForkingTCPServer`` moves by changing one line. Such a handler reads the socket
  itself, so ``max_line`` does not apply to it and the access log cannot count its bytes; the
  idle and write timeouts still do, and a client that times out or vanishes ends quietly.

Anything else is refused with a message that says what a handler is.

Async handlers (the hybrid model): an ``async def handle(conn)`` or a class whose ``handle``
(and optional ``setup``/``finish``) are ``async def``, given an ``AsyncConnection``. ``adapt``
wraps them in an ``AsyncApp``: still an ``App`` to the code that carries apps around, but a
blocking model that would call one is refused at start (``check_app``), and calling it is an
error that says why. The hybrid model awaits ``AsyncApp.run``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..apps import ASYNC_FORMS, BUILTIN, App
from ..config import Config
from ..errors import ConfigError, IdleTimeout, PeerGone
from .connection import Connection

if TYPE_CHECKING:  # asyncio is loaded only where a loop runs (hybrid workers)

    from .aio_connection import AsyncConnection

#: The models that can await an async handler.
ASYNC_MODELS = ("hybrid",)


@runtime_checkable
class Handler(Protocol):
    """A class-based handler: one instance per connection."""

    def handle(self, conn: Connection) -> None: ...


@runtime_checkable
class AsyncHandler(Protocol):
    """A class-based async handler (hybrid model): one instance per connection; ``setup``
    and ``finish``, if present, are ``async def`` too."""

    async def handle(self, conn: AsyncConnection) -> None: ...


class AsyncApp:
    """An async handler, adapted: ``await app.run(conn)`` once per connection."""

    def __init__(self, run: Callable[[AsyncConnection], Awaitable[None]], name: str) -> None:
        self.run = run
        self.name = name
        self.__qualname__ = name

    def __call__(self, conn: Connection) -> None:
        raise TypeError(f"{self.name} is an async handler: only the hybrid model runs it")


def is_async(app: object) -> bool:
    """Does ``app`` run as async code on the hybrid model (an async handler, or a built-in
    app that has an async form)?"""
    if isinstance(app, AsyncApp):
        return True
    name = f"{getattr(app, '__module__', '')}:{getattr(app, '__qualname__', '')}"
    return name in ASYNC_FORMS


def check_app(app: object, config: Config) -> None:
    """Refuse an app that ``config``'s model cannot run: an async handler under a blocking
    model, a blocking one under hybrid with ``threads`` 0. Raises ``ConfigError``."""
    if isinstance(app, AsyncApp) and config.model not in ASYNC_MODELS:
        raise ConfigError("app", f"{app.name} is async: async handlers need --model hybrid")
    if config.model in ASYNC_MODELS and config.threads == 0 and not is_async(app):
        raise ConfigError("threads", "0 leaves no thread for a blocking handler: give the "
                                     "hybrid model an async handler, or threads 1 or more")


def load(spec: str, *, chdir: str | None = None) -> App:
    """Resolve ``spec`` to a handler callable; raise ``ConfigError`` naming what is wrong."""
    if spec == "exec":
        raise ConfigError("app", "exec runs a program per connection: use "
                                 "forkserve exec [OPTIONS] -- PROGRAM [ARGS...]")
    target = BUILTIN.get(spec, spec)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        known = ", ".join(sorted(BUILTIN))
        raise ConfigError("app", f"{spec!r} is neither a built-in app ({known}) nor "
                                 "MODULE:ATTRIBUTE, as in myapp:handle")
    obj = _import(module_name, attr, chdir)
    return adapt(obj, spec)


def import_object(spec: str, *, chdir: str | None = None) -> object:
    """The object ``MODULE:ATTR`` names; raise ``ConfigError("app", ...)`` saying what failed."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError("app", f"{spec!r} is not MODULE:ATTRIBUTE, as in myhooks:post_fork")
    return _import(module_name, attr, chdir)


def app_dir(chdir: str | None = None) -> str:
    """The directory put first on the import path for apps and hooks (``--chdir`` or cwd)."""
    return os.path.abspath(chdir) if chdir else os.getcwd()


def _import(module_name: str, attr: str, chdir: str | None) -> object:
    path = app_dir(chdir)
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if getattr(exc, "name", None) == module_name:
            raise ConfigError("app", f"cannot import {module_name!r} (looked in {path} and "
                                     "the Python path)") from None
        raise ConfigError("app", _import_failed(module_name, exc, path)) from None
    except (Exception, SystemExit) as exc:  # the module itself raised (or exit()ed) importing
        raise ConfigError("app", _import_failed(module_name, exc, path)) from None
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError("app", f"{module_name!r} has no attribute {attr!r}") from None
    return obj


def _import_failed(module_name: str, exc: BaseException, base: str) -> str:
    """One line saying what broke the import and where: ``importing 'myapp' failed:
    SyntaxError: invalid syntax (myapp.py, line 3)``; no traceback (the operator's log and a
    reload's error line stay one line each)."""
    if isinstance(exc, SyntaxError):  # (its own str() names only the file's base name)
        what, where = exc.msg, (exc.filename, exc.lineno)
    else:
        what, where = str(exc), _where(exc, base)
    if where[0] is None:
        return f"importing {module_name!r} failed: {type(exc).__name__}: {what}"
    shown = os.path.relpath(where[0], base) if where[0].startswith(base + os.sep) else where[0]
    return (f"importing {module_name!r} failed: {type(exc).__name__}: {what} "
            f"({shown}, line {where[1]})")


def _where(exc: BaseException, base: str) -> tuple[str | None, int | None]:
    """Where ``exc`` was raised: the innermost line of the user's own code (under ``base``),
    else the innermost line outside the import machinery."""
    import traceback  # noqa: PLC0415  (a failed import only: the zygote does without it)

    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<frozen ")]
    own = [f for f in frames if f.filename.startswith(base + os.sep)] or frames[-1:]
    return (own[-1].filename, own[-1].lineno) if own else (None, None)


def adapt(obj: object, name: str = "the app") -> App:
    """Turn a function, a handler class or a socketserver handler into ``app(conn)``."""
    # (socketserver imports threading, whose after-fork handler every child of the zygote
    # would run: a socketserver handler's module has imported it already, so look there)
    socketserver = sys.modules.get("socketserver")
    if inspect.isclass(obj):
        if socketserver is not None and issubclass(obj, socketserver.BaseRequestHandler):
            if issubclass(obj, socketserver.DatagramRequestHandler):
                raise ConfigError("app", f"{name}: datagram handlers are not supported")
            return _socketserver_app(obj)
        handle = getattr(obj, "handle", None)
        if inspect.iscoroutinefunction(handle):
            return _async_class_app(obj)
        if callable(handle):
            return _class_app(obj)
        raise ConfigError("app", f"{name} is a class without a handle(conn) method")
    if inspect.iscoroutinefunction(obj):
        _check_arity(obj, name)
        return AsyncApp(obj, name)
    if callable(obj):
        _check_arity(obj, name)
        app: App = obj
        return app
    raise ConfigError("app", f"{name} is not a handler: give a function handle(conn), a "
                             "class with handle(conn), or a socketserver handler class")


def _check_arity(func: Callable[..., object], name: str) -> None:
    try:
        inspect.signature(func).bind(None)
    except TypeError:
        raise ConfigError("app", f"{name} must take one argument, the connection") from None
    except ValueError:
        pass  # no signature (a builtin): let the call decide


def _class_app(cls: type[Any]) -> App:
    def run(conn: Connection) -> None:
        handler = cls()
        setup = getattr(handler, "setup", None)
        if setup is not None:
            setup(conn)
        try:
            handler.handle(conn)
        finally:
            finish = getattr(handler, "finish", None)
            if finish is not None:
                finish(conn)

    run.__qualname__ = f"{cls.__qualname__}()"
    return run


def _async_class_app(cls: type[Any]) -> AsyncApp:
    for hook in ("setup", "finish"):
        method = getattr(cls, hook, None)
        if method is not None and not inspect.iscoroutinefunction(method):
            raise ConfigError("app", f"{cls.__qualname__}.handle is async, so {hook} must be "
                                     "async def too")

    async def run(conn: AsyncConnection) -> None:
        handler = cls()
        setup = getattr(handler, "setup", None)
        if setup is not None:
            await setup(conn)
        try:
            await handler.handle(conn)
        finally:
            finish = getattr(handler, "finish", None)
            if finish is not None:
                await finish(conn)

    return AsyncApp(run, f"{cls.__qualname__}()")


class _ServerShim:
    """What a socketserver handler sees as ``self.server``."""

    def __init__(self, conn: Connection) -> None:
        self.socket = conn.sock
        self.address_family = conn.sock.family
        self.socket_type = socket.SOCK_STREAM
        self.server_address = _address(conn.sock.getsockname(), conn.sock.family)


def _address(addr: Any, family: int) -> Any:
    return addr if family != socket.AF_UNIX else (addr or "")


def _socketserver_app(cls: type[Any]) -> App:  # (a socketserver.BaseRequestHandler)
    def run(conn: Connection) -> None:
        sock = conn.sock
        # it reads and writes the socket itself, past the connection's deadlines and watchdog
        # marks: the first byte is awaited before (first_byte_timeout)
        conn._hand_over()
        try:
            client = _address(sock.getpeername(), sock.family)
            cls(sock, client, _ServerShim(conn))
        except BlockingIOError:  # SO_RCVTIMEO or SO_SNDTIMEO expired inside the handler
            raise IdleTimeout("client idle or not reading (timeout)") from None
        except (ConnectionError, TimeoutError) as exc:
            raise PeerGone(f"client went away: {exc}") from None

    run.__qualname__ = f"{cls.__qualname__}(socketserver)"
    return run
