"""The front ends generated from the declarations: the TOML file, the command line (argparse),
the settings table of the README. Precedence, lowest first: declared defaults, the
``--config`` file, command-line flags (and for the Python API the keyword arguments of
:func:`forkserve.serve`, through ``settings.from_mapping``).
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ConfigError
from .kinds import Flag
from .settings import Config, flag_of, from_mapping, settings


def load_toml(path: str) -> dict[str, object]:
    """Read a TOML config file into raw setting values (checked later, naming the file)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    values = {key.replace("-", "_"): value for key, value in data.items()}
    from_mapping(values, source=path)  # check now, so the error names the file
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one option per setting. Defaults are suppressed so that absent flags stay absent."""
    for name, info, _default in settings():
        flag = info.flag or flag_of(name)
        kwargs: dict[str, Any] = {
            "dest": name, "default": argparse.SUPPRESS, "help": info.doc.replace("%", "%%"),
            "metavar": info.kind.metavar,
        }
        if info.kind.repeat:
            kwargs["action"] = "append"
        if isinstance(info.kind, Flag):
            kwargs["action"] = "store_const"
            kwargs["const"] = True
            del kwargs["metavar"]
        parser.add_argument(flag, **kwargs)


def from_cli(namespace: argparse.Namespace, config_file: str | None = None,
             overrides: Mapping[str, object] | None = None) -> Config:
    """Merge defaults, the config file and command-line values (in that order)."""
    values: dict[str, object] = load_toml(config_file) if config_file else {}
    cli = {name: getattr(namespace, name) for name, _, _ in settings() if hasattr(namespace, name)}
    values.update(cli)
    values.update(overrides or {})
    file_keys = set(values) - set(cli)

    def naming(key: str) -> str:
        return key if key in file_keys and config_file else flag_of(key)

    source = None
    try:
        return from_mapping(values, naming=naming)
    except ConfigError as exc:
        if config_file and exc.setting in file_keys:
            source = config_file
        raise ConfigError(exc.setting, exc.problem, source) from None


def given_names(namespace: argparse.Namespace, config_file: str | None) -> set[str]:
    """The settings an operator set: on the command line or in the config file."""
    names = {name for name, _, _ in settings() if hasattr(namespace, name)}
    return names | set(load_toml(config_file) if config_file else ())


def ignored_by_model(config: Config, given: Iterable[str]) -> list[str]:
    """One sentence for each setting in ``given`` that ``config.model`` does not use."""
    infos = {name: info for name, info, _ in settings()}
    return [f"{flag_of(name)} ({name}) applies to the {' and '.join(infos[name].models)} "
            f"model{'s' if len(infos[name].models) > 1 else ''} only; the {config.model} "
            "model ignores it"
            for name in sorted(given)
            if name in infos and infos[name].models and config.model not in infos[name].models]


def markdown_table() -> str:
    """The settings table of the README, generated from the declarations."""
    rows = ["| setting (TOML key) | flag | default | meaning |", "|---|---|---|---|"]
    for name, info, default in settings():
        shown = info.kind.show(info.kind.convert(default)) if default is not None else ""
        metavar = f" {info.kind.metavar}" if info.kind.metavar else ""
        flag = f"`{info.flag or flag_of(name)}{metavar}`"
        if info.kind.repeat:
            flag += " (repeatable)"
        rows.append(f"| `{name}` | {flag} | {f'`{shown}`' if shown else ''} | {info.doc} |")
    return "\n".join(rows) + "\n"
