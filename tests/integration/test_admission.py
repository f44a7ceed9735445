"""Admission control: rules, per-IP and rate limits decide before any fork; clients come from
127.0.0.2 to 127.0.0.4 so that each test has several client addresses on loopback."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.harness import Server, recv_all, recv_exactly, run_cli, wait_until

HELLO = b"Hello from server!\n"
Factory = Callable[..., Server]
NO = b"no room for you\n"


def status(control: Path) -> dict:  # type: ignore[type-arg]
    result = run_cli(["status", "--control", f"unix:{control}", "--json"])
    assert result.returncode == 0, result.stderr
    snapshot: dict = json.loads(result.stdout)  # type: ignore[type-arg]
    return snapshot


def served(server: Server, source: str) -> bool:
    """Ask once from ``source``: True if answered, False if refused with the message."""
    with server.connect(source=source) as s:
        s.sendall(b"hi\n")
        s.shutdown(socket.SHUT_WR)  # the hello app answers, then closes at our end
        answer = recv_all(s)
    assert answer in (HELLO, NO), answer
    return answer == HELLO


def hold(server: Server, source: str) -> socket.socket:
    s = server.connect(source=source)
    s.sendall(b"hi\n")
    assert recv_exactly(s, len(HELLO)) == HELLO
    return s


def test_deny_and_allow_decide_without_a_fork(server_factory: Factory, tmp_path: Path) -> None:
    control = tmp_path / "c.sock"
    server = server_factory("--deny", "127.0.0.2", "--refuse-message", NO.decode().strip(),
                            "--control", f"unix:{control}")
    assert not served(server, "127.0.0.2")
    assert served(server, "127.0.0.3")
    snap = status(control)
    assert snap["counters"]["refused"] == {"denied": 1}
    assert snap["connections_total"] == 1, "the refused client cost no fork"
    server.wait_for_log(r"refused 127\.0\.0\.2 by deny 127\.0\.0\.2/32 .*: denied")


def test_a_rules_file_replaced_by_rename_takes_effect(server_factory: Factory,
                                                      tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.write_text("# loopback only, but not .3\nallow 127.0.0.0/8\ndeny 127.0.0.3\n")
    server = server_factory("--rules-file", str(rules), "--refuse-message",
                            NO.decode().strip())
    assert served(server, "127.0.0.2")
    assert not served(server, "127.0.0.3")
    new = tmp_path / "rules.new"
    new.write_text("allow 127.0.0.0/8\ndeny 127.0.0.2\n")
    new.replace(rules)
    assert wait_until(lambda: not served(server, "127.0.0.2"), 10)
    assert served(server, "127.0.0.3")
    broken = tmp_path / "rules.broken"
    broken.write_text("allow 127.0.0.0/8\npermit everyone\n")
    broken.replace(rules)
    server.wait_for_log(r"rules_file in .*:2: .*the rules in force stay")
    assert not served(server, "127.0.0.2"), "the rules in force stay"


def test_max_per_ip_is_exact_and_per_client(server_factory: Factory) -> None:
    server = server_factory("--max-per-ip", "2", "--refuse-message", NO.decode().strip())
    first, second = hold(server, "127.0.0.2"), hold(server, "127.0.0.2")
    try:
        assert not served(server, "127.0.0.2"), "the third from one client is refused"
        assert served(server, "127.0.0.3"), "another client is not"
        first.close()
        assert wait_until(lambda: served(server, "127.0.0.2"), 10), "one left: room again"
    finally:
        first.close()
        second.close()


def test_rate_per_ip_is_exact_and_has_a_penalty(server_factory: Factory) -> None:
    server = server_factory("--rate-per-ip", "3/30", "--rate-penalty", "2",
                            "--refuse-message", NO.decode().strip())
    assert [served(server, "127.0.0.4") for _ in range(4)] == [True, True, True, False]
    assert served(server, "127.0.0.2"), "other clients are not slowed"
    assert not served(server, "127.0.0.4"), "in the penalty box"
    time.sleep(2.2)  # the 2 s penalty runs out: the time is what is under test
    assert served(server, "127.0.0.4"), "after the penalty, a fresh start"


def test_on_full_refuse_refuses_instead_of_deferring(server_factory: Factory) -> None:
    server = server_factory("--max-children", "1", "--on-full", "refuse",
                            "--refuse-message", NO.decode().strip())
    held = hold(server, "127.0.0.2")
    try:
        start = time.monotonic()
        assert not served(server, "127.0.0.3")
        assert time.monotonic() - start < 5, "refused at once, not queued"
    finally:
        held.close()


def test_prefork_workers_apply_the_rules(server_factory: Factory) -> None:
    server = server_factory("--model", "prefork", "--workers", "2", "--deny", "127.0.0.2",
                            "--refuse-message", NO.decode().strip())
    assert not served(server, "127.0.0.2")
    assert served(server, "127.0.0.3")


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "prefork", "--max-per-ip", "2"], "invalid max_per_ip: needs the master"),
    (["--rate-per-ip", "ten"], "invalid --rate-per-ip: 'ten': write the rate as N/SECONDS"),
    (["--deny", "10.0.0.1/8"], "invalid --deny: '10.0.0.1/8' is not a network"),
    (["--rules-file", "/nonexistent/rules"], "rules_file"),
])
def test_bad_admission_settings_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = run_cli(["serve", "--bind", "127.0.0.1:0", *args])
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err
    assert "listening on" not in err


def test_unix_listeners_are_not_subject_to_ip_rules(server_factory: Factory,
                                                    tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    server_factory("--bind", f"unix:{path}", "--deny", "0.0.0.0/0")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
    assert os.path.exists(path)
