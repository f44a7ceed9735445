"""Settings: one declaration drives checks, CLI, TOML and the docs table."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from forkserve.config import Address, Config, add_arguments, from_cli, markdown_table
from forkserve.errors import ConfigError
from forkserve.master.signals import signal_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:8080", Address("tcp", "127.0.0.1", 8080)),
    ("localhost:0", Address("tcp", "localhost", 0)),
    ("[::1]:9", Address("tcp", "::1", 9)),
    ("unix:/run/x.sock", Address("unix", path="/run/x.sock")),
])
def test_addresses_parse_and_print_back(text: str, expected: Address) -> None:
    assert Address.parse(text) == expected
    assert str(Address.parse(text)) == text


@pytest.mark.parametrize("text", [
    "8080", ":80", "host:", "host:port", "host:-1", "host:65536", "::1:80", "[::1]80",
    "[zz]:80", "unix:", "unix:/" + "x" * 200,
])
def test_malformed_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text.strip())[:10])):
        Address.parse(text)


def test_defaults_are_the_documented_ones() -> None:
    config = Config()
    assert config.bind == (Address("tcp", "127.0.0.1", 8080),)
    assert (config.model, config.app, config.backlog) == ("fork", "hello", 1024)
    assert (config.max_children, config.max_line) == (512, 65536)
    assert (config.idle_timeout, config.graceful_timeout) == (300.0, 30.0)


def test_values_are_converted_from_strings_and_checked() -> None:
    config = Config(max_children="10", idle_timeout="2.5", bind="127.0.0.1:0", model="SINGLE")  # type: ignore[arg-type]
    assert (config.max_children, config.idle_timeout, config.model) == (10, 2.5, "single")
    assert config.bind == (Address("tcp", "127.0.0.1", 0),)
    with pytest.raises(ConfigError, match="invalid max_children: must be at least 1, got 0"):
        Config(max_children=0)
    with pytest.raises(ConfigError, match="must be a whole number, got True"):
        Config(backlog=True)
    with pytest.raises(ConfigError, match="the same address is listed twice"):
        Config(bind=("127.0.0.1:1", "127.0.0.1:1"))  # type: ignore[arg-type]
    assert isinstance(ConfigError("x", "y"), ValueError)


def test_replace_checks_again() -> None:
    assert Config().replace(max_line=5).max_line == 5
    with pytest.raises(ConfigError):
        Config().replace(max_line=-5)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_arguments(parser)
    return parser.parse_args(argv)


def test_precedence_defaults_then_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text('max_children = 7\nmax-line = 9\napp = "echo"\n')
    config = from_cli(parse(["--max-line", "11", "--bind", "127.0.0.1:1", "--bind",
                             "unix:/tmp/s"]), str(path))
    assert (config.max_children, config.max_line, config.app) == (7, 11, "echo")
    assert len(config.bind) == 2


def test_errors_name_the_flag_or_the_file_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid --max-line: must be at least 1"):
        from_cli(parse(["--max-line", "0"]))
    path = tmp_path / "f.toml"
    path.write_text("max_line = 0\n")
    with pytest.raises(ConfigError, match=f"invalid max_line in {re.escape(str(path))}"):
        from_cli(parse([]), str(path))


def test_readme_settings_table_is_generated_from_the_declarations() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- settings-table:start -->")
    end = readme.index("<!-- settings-table:end -->")
    assert readme[start:end].split("\n", 1)[1].strip() == markdown_table().strip(), (
        "README's settings table is stale: regenerate it with `forkserve settings`"
    )


def test_readme_signal_table_is_generated_from_the_signal_table() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- signal-table:start -->")
    end = readme.index("<!-- signal-table:end -->")
    assert readme[start:end].split("\n", 1)[1].strip() == signal_table().strip(), (
        "README's signal table is stale: regenerate it with `forkserve settings --signals`"
    )


def test_hooks_are_callables_or_module_attr_names() -> None:
    def hook(config: Config) -> None:
        pass

    assert Config(on_starting=hook).on_starting is hook
    assert Config(post_fork=" mod:func ").post_fork == "mod:func"
    for bad in ("mod", ":func", "mod:", 3):
        with pytest.raises(ConfigError, match="post_fork: must be MODULE:ATTR"):
            Config(post_fork=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("command", ["serve", "check", "exec", "client", "signal", "status",
                                     "settings", "bench", "demo"])
def test_every_command_prints_its_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """argparse formats each help line with %: a setting's doc that says "RATE %" must not
    turn --help into a traceback."""
    from forkserve import cli  # noqa: PLC0415

    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: forkserve {command}")
    if command in ("serve", "check", "exec"):
        assert "from RATE % to 100 % at FULL" in out
