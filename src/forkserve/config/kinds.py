"""How each setting's value is read and checked: addresses and the *kinds* of settings.

A value may arrive as a string (command line), as a TOML value (int, float, str, list) or as a
Python keyword argument. Every path goes through the same ``Kind.convert``, so the checks and
the error messages are the same everywhere; ``convert`` raises ``ValueError`` and the
declaration (``settings.Config``) names the setting. Pure: nothing here opens anything.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..protocol.admission import parse_rate
from ..protocol.defence import parse_penalties, parse_startups

# --------------------------------------------------------------------------- addresses

MAX_PORT = 65535
#: sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_UNIX_PATH = 107


@dataclass(frozen=True)
class Address:
    """A place to listen on: ``HOST:PORT``, ``[IPV6]:PORT`` or ``unix:/path``."""

    kind: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse an address as written on the command line; raise ``ValueError`` if malformed."""
        text = text.strip()
        if text.startswith("unix:"):
            path = text[len("unix:") :]
            if not path:
                raise ValueError(f"{text!r}: unix: needs a path, as in unix:/run/app.sock")
            if len(path.encode()) > MAX_UNIX_PATH:
                raise ValueError(f"{text!r}: unix socket path longer than {MAX_UNIX_PATH} bytes")
            return cls("unix", path=path)
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
            if not sep:
                raise ValueError(f"{text!r}: an IPv6 address is written [ADDR]:PORT")
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
        else:
            host, sep, port = text.rpartition(":")
            if not sep or not host:
                raise ValueError(f"{text!r}: expected HOST:PORT, [IPV6]:PORT or unix:/path")
            if ":" in host:
                raise ValueError(f"{text!r}: write IPv6 addresses in brackets, as [::1]:8080")
        if not port.isdigit() or int(port) > MAX_PORT:
            raise ValueError(f"{text!r}: the port must be a number from 0 to {MAX_PORT}")
        return cls("tcp", host=host, port=int(port))

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


# --------------------------------------------------------------------------- kinds


class Kind:
    """How a setting's values are read, checked and shown."""

    metavar: ClassVar[str] = "VALUE"
    repeat: ClassVar[bool] = False
    choices: tuple[str, ...] | None = None

    def convert(self, value: object) -> Any:
        """Return the checked, canonical value; raise ``ValueError`` with a person's sentence."""
        raise NotImplementedError

    def show(self, value: object) -> str:
        """The value as an operator would write it (for the docs table)."""
        return "" if value is None else str(value)


@dataclass(frozen=True)
class Int(Kind):
    minimum: int = 0
    metavar: ClassVar[str] = "N"

    def convert(self, value: object) -> int:
        if isinstance(value, bool):
            raise ValueError(f"must be a whole number, got {value!r}")
        if isinstance(value, str):
            try:
                value = int(value.strip().replace("_", ""))
            except ValueError:
                raise ValueError(f"must be a whole number, got {value!r}") from None
        if not isinstance(value, int):
            raise ValueError(f"must be a whole number, got {value!r}")
        if value < self.minimum:
            raise ValueError(f"must be at least {self.minimum}, got {value}")
        return value


@dataclass(frozen=True)
class IntOrUnset(Kind):
    """A whole number, or None: not set, for a default that depends on other settings."""

    minimum: int = 0
    metavar: ClassVar[str] = "N"

    def convert(self, value: object) -> int | None:
        return None if value is None else Int(self.minimum).convert(value)


#: Shortest and longest durations a setting may have: the kernel's timers need a non-zero
#: value, and more than about eleven days is a typo, not a timeout.
MIN_SECONDS = 0.001
MAX_SECONDS = 1e6


@dataclass(frozen=True)
class Seconds(Kind):
    minimum: float = MIN_SECONDS
    metavar: ClassVar[str] = "SECONDS"

    def convert(self, value: object) -> float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number of seconds, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"must be a number of seconds, got {value!r}") from None
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"must be a number of seconds, got {value!r}")
        if not self.minimum <= value <= MAX_SECONDS:
            raise ValueError(f"must be from {self.minimum:g} to {MAX_SECONDS:g} seconds, "
                             f"got {value:g}")
        return float(value)

    def show(self, value: object) -> str:
        return f"{value:g}" if isinstance(value, float) else super().show(value)


@dataclass(frozen=True)
class Choice(Kind):
    options: tuple[str, ...] = ()
    metavar: ClassVar[str] = "NAME"

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.options

    def convert(self, value: object) -> str:
        if not isinstance(value, str) or value.strip().lower() not in self.options:
            raise ValueError(f"must be one of {', '.join(self.options)}; got {value!r}")
        return value.strip().lower()


@dataclass(frozen=True)
class Text(Kind):
    optional: bool = False
    metavar: ClassVar[str] = "TEXT"

    def convert(self, value: object) -> str | None:
        if value is None and self.optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"must be a non-empty string, got {value!r}")
        return value.strip()


@dataclass(frozen=True)
class Path(Text):
    metavar: ClassVar[str] = "PATH"


@dataclass(frozen=True)
class Paths(Kind):
    """Paths; repeat the flag for more."""

    metavar: ClassVar[str] = "DIR"
    repeat: ClassVar[bool] = True

    def convert(self, value: object) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ValueError(f"must be a path or a list of paths, got {value!r}")
        return tuple(str(Path().convert(item)) for item in items)

    def show(self, value: object) -> str:
        return ", ".join(str(v) for v in value) if isinstance(value, tuple | list) else ""


@dataclass(frozen=True)
class Flag(Kind):
    """On or off; on the command line, the flag alone turns it on."""

    metavar: ClassVar[str] = ""

    def convert(self, value: object) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
        raise ValueError(f"must be true or false, got {value!r}")

    def show(self, value: object) -> str:
        return "true" if value else "false"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Networks(Kind):
    """Networks in CIDR notation (an address alone is one host); repeat for more."""

    metavar: ClassVar[str] = "CIDR"
    repeat: ClassVar[bool] = True

    def convert(self, value: object) -> tuple[Network, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ValueError(f"must be a network or a list of networks, got {value!r}")
        out: list[Network] = []
        for item in items:
            if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
                out.append(item)
                continue
            if not isinstance(item, str):
                raise ValueError(f"a network is written as 10.0.0.0/8, got {item!r}")
            try:
                out.append(ipaddress.ip_network(item.strip(), strict=True))
            except ValueError as exc:
                raise ValueError(f"{item!r} is not a network: {exc}") from None
        return tuple(out)

    def show(self, value: object) -> str:
        if isinstance(value, tuple | list):
            return ", ".join(str(v) for v in value)
        return super().show(value)


@dataclass(frozen=True)
class RateKind(Kind):
    """``N/SECONDS``: N new connections per SECONDS."""

    metavar: ClassVar[str] = "N/SECONDS"

    def convert(self, value: object) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(f"write the rate as N/SECONDS, as in 10/1, got {value!r}")
        return str(parse_rate(value))


@dataclass(frozen=True)
class StartupsKind(Kind):
    """``START:RATE:FULL``, ``auto`` or ``off`` (see ``defence.Startups``)."""

    metavar: ClassVar[str] = "START:RATE:FULL"

    def convert(self, value: object) -> str:
        text = str(value).strip().lower()
        return text if text in ("auto", "off") else str(parse_startups(text))


@dataclass(frozen=True)
class PenaltiesKind(Kind):
    """``CAUSE:SECONDS ... max:SECONDS`` or ``off`` (see ``defence.parse_penalties``)."""

    metavar: ClassVar[str] = "CAUSE:SECONDS..."

    def convert(self, value: object) -> str:
        text = " ".join(str(value).split())
        parse_penalties(text)  # (its ValueError names the problem; __post_init__ the setting)
        return text


@dataclass(frozen=True)
class Umask(Kind):
    """A file mode creation mask, written in octal (``022``) or given as a number."""

    metavar: ClassVar[str] = "OCTAL"

    def convert(self, value: object) -> int | None:
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            mask = value
        elif isinstance(value, str):
            try:
                mask = int(value.strip(), 8)
            except ValueError:
                raise ValueError(f"must be an octal mask such as 022, got {value!r}") from None
        else:
            raise ValueError(f"must be an octal mask such as 022, got {value!r}")
        if mask is not None and not 0 <= mask <= 0o777:
            raise ValueError(f"must be between 000 and 777, got {mask:o}")
        return mask

    def show(self, value: object) -> str:
        return "" if value is None else f"{value:03o}"


@dataclass(frozen=True)
class Hook(Kind):
    """A callable, or its name ``MODULE:ATTR`` (imported later, by ``hooks.resolve``)."""

    metavar: ClassVar[str] = "MODULE:ATTR"

    def convert(self, value: object) -> Callable[..., object] | str | None:
        if value is None or callable(value):
            return value
        if isinstance(value, str):
            module, sep, attr = value.strip().partition(":")
            if sep and module and attr:
                return value.strip()
        raise ValueError(f"must be MODULE:ATTR naming a function, got {value!r}")


@dataclass(frozen=True)
class UnixAddress(Kind):
    optional: bool = True
    metavar: ClassVar[str] = "unix:PATH"

    def convert(self, value: object) -> Address | None:
        if value is None and self.optional:
            return None
        if isinstance(value, str):
            value = Address.parse(value)
        if not isinstance(value, Address) or value.kind != "unix":
            shown = str(value) if isinstance(value, Address) else repr(value)
            raise ValueError(f"must be a unix socket address such as unix:/run/fs.ctl, "
                             f"got {shown}")
        return value


@dataclass(frozen=True)
class OneAddress(Kind):
    metavar: ClassVar[str] = "ADDR"

    def convert(self, value: object) -> Address | None:
        if value is None or isinstance(value, Address):
            return value
        if not isinstance(value, str):
            raise ValueError(f"must be an address such as 127.0.0.1:9100, got {value!r}")
        return Address.parse(value)


@dataclass(frozen=True)
class Addresses(Kind):
    metavar: ClassVar[str] = "ADDR"
    repeat: ClassVar[bool] = True

    def convert(self, value: object) -> tuple[Address, ...]:
        items: Iterable[object] = [value] if isinstance(value, str | Address) else value  # type: ignore[assignment]
        try:
            items = list(items)
        except TypeError:
            raise ValueError(f"must be an address or a list of addresses, got {value!r}") from None
        if not items:
            raise ValueError("needs at least one address")
        out = []
        for item in items:
            if isinstance(item, Address):
                out.append(item)
            elif isinstance(item, str):
                out.append(Address.parse(item))
            else:
                raise ValueError(f"an address is a string such as 127.0.0.1:8080, got {item!r}")
        if len(set(out)) != len(out):
            raise ValueError("the same address is listed twice")
        return tuple(out)

    def show(self, value: object) -> str:
        if isinstance(value, tuple | list):
            return ", ".join(str(v) for v in value)
        return super().show(value)
