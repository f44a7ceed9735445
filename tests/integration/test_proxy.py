"""PROXY protocol: the real client reaches the handler, the access log and exec programs;
untrusted, malformed and late headers cost only their connection."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from tests.integration.harness import Server, recv_all, recv_exactly, run_cli, wait_until

Factory = Callable[..., Server]

WHO = "def handle(conn):\n    conn.write(f'{conn.peer} {conn.local}\\n'.encode())\n"
V1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n"
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command: int, family: int, addresses: bytes) -> bytes:
    return SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(addresses)) \
        + addresses


V2_TCP6 = v2(1, 0x21, ipaddress.IPv6Address("2001:db8::7").packed
             + ipaddress.IPv6Address("2001:db8::1").packed + struct.pack("!HH", 40000, 8443))
V2_LOCAL = v2(0, 0x00, b"")


@pytest.fixture
def who(tmp_path: Path) -> Path:
    (tmp_path / "who.py").write_text(WHO)
    return tmp_path


def ask(server: Server, preamble: bytes) -> bytes:
    with server.connect() as s:
        s.sendall(preamble + b"hi\n")
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


@pytest.mark.parametrize("model", ["fork", "prefork", "single"])
def test_the_handler_sees_the_client_the_header_names(server_factory: Factory, who: Path,
                                                      model: str) -> None:
    server = server_factory("who:handle", "--chdir", str(who), "--model", model,
                            "--workers", "1", "--proxy-protocol",
                            "--trusted-proxy", "127.0.0.0/8")
    assert ask(server, V1) == b"203.0.113.7:56324 192.0.2.1:443\n"
    assert ask(server, V2_TCP6) == b"[2001:db8::7]:40000 [2001:db8::1]:8443\n"
    own = ask(server, V2_LOCAL).decode()  # the proxy's health check: the socket's addresses
    assert own.startswith("127.0.0.1:")


def test_the_access_log_names_the_real_client(server_factory: Factory, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    server = server_factory("--proxy-protocol", "--trusted-proxy", "127.0.0.1",
                            "--access-log", str(log))
    assert ask(server, V1) == b"Hello from server!\n"
    assert wait_until(lambda: log.exists() and "203.0.113.7:56324" in log.read_text(), 10)


@pytest.mark.parametrize(("preamble", "why"), [
    (b"GET / HTTP/1.0\r\n\r\n", "not a PROXY protocol header"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 99999 443\r\n", "PROXY v1"),
    (SIGNATURE + b"\x99", "PROXY v2"),
])
def test_a_bad_header_ends_the_connection_before_the_handler(
        server_factory: Factory, who: Path, preamble: bytes, why: str) -> None:
    server = server_factory("who:handle", "--chdir", str(who), "--proxy-protocol",
                            "--trusted-proxy", "127.0.0.1")
    try:
        answer = ask(server, preamble)
    except ConnectionResetError:
        answer = b""
    assert answer == b""
    server.wait_for_log(rf"(closed before the handler|refused \S+): {why}")


def test_an_untrusted_peer_is_refused_without_reading_its_header(
        server_factory: Factory, who: Path) -> None:
    server = server_factory("who:handle", "--chdir", str(who), "--proxy-protocol",
                            "--trusted-proxy", "127.0.0.2")
    try:
        answer = ask(server, V1)
    except ConnectionResetError:
        answer = b""
    assert answer == b""
    server.wait_for_log(r"127\.0\.0\.1 is not a trusted proxy")


def test_a_late_header_is_dropped_at_the_handshake_timeout(server_factory: Factory) -> None:
    server = server_factory("--proxy-protocol", "--trusted-proxy", "127.0.0.1",
                            "--handshake-timeout", "1")
    with server.connect() as s:
        s.sendall(V1[:10])  # and then nothing
        assert recv_all(s) == b""
    server.wait_for_log(r"no whole PROXY header within 1 s")


def test_proxy_header_then_tls(server_factory: Factory, who: Path) -> None:
    import ssl  # noqa: PLC0415

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = who / "c.pem", who / "c.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    server = server_factory("who:handle", "--chdir", str(who), "--proxy-protocol",
                            "--trusted-proxy", "127.0.0.1", "--certfile", str(cert_path),
                            "--keyfile", str(key_path))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with server.connect() as raw:
        raw.sendall(V1)  # the proxy speaks first, in the clear, then the client's TLS
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(b"hi\n")
            assert recv_all(s) == b"203.0.113.7:56324 192.0.2.1:443\n"


def test_exec_programs_see_the_real_client(server_factory: Factory) -> None:
    server = server_factory("--bind", "127.0.0.1:0", "--proxy-protocol", "--trusted-proxy",
                            "127.0.0.1", "--", "sh", "-c",
                            "echo $TCPREMOTEIP $TCPREMOTEPORT $TCPLOCALIP $TCPLOCALPORT; cat",
                            command="exec")
    assert ask(server, V1) == b"203.0.113.7 56324 192.0.2.1 443\nhi\n"


def test_proxy_protocol_needs_trusted_proxies() -> None:
    result = run_cli(["serve", "--bind", "127.0.0.1:0", "--proxy-protocol"])
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "invalid --trusted-proxy: proxy_protocol needs the proxies' addresses" in err


def v1_from(ip: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {ip} 192.0.2.1 {port} 443\r\n".encode()


@pytest.mark.parametrize("model", ["fork", "single", "prefork"])
def test_admission_rules_see_the_real_client(server_factory: Factory, model: str) -> None:
    server = server_factory("--model", model, "--workers", "1", "--proxy-protocol",
                            "--trusted-proxy", "127.0.0.1", "--deny", "203.0.113.0/24",
                            "--refuse-message", "go away")
    assert ask(server, v1_from("203.0.113.7")) == b"go away\n"
    assert ask(server, v1_from("198.51.100.7")) == b"Hello from server!\n"


def test_per_ip_limits_count_the_real_client(server_factory: Factory) -> None:
    server = server_factory("--proxy-protocol", "--trusted-proxy", "127.0.0.1",
                            "--max-per-ip", "1", "--refuse-message", "one at a time")
    with server.connect() as held:  # from 198.51.100.7, through the same proxy address
        held.sendall(v1_from("198.51.100.7") + b"hi\n")
        assert recv_exactly(held, 19) == b"Hello from server!\n"
        assert ask(server, v1_from("198.51.100.7", 40001)) == b"one at a time\n"
        assert ask(server, v1_from("198.51.100.8")) == b"Hello from server!\n"
