"""TLS: handshakes in the serving process, 1.2 at least, client certificates, reloads."""

from __future__ import annotations

import signal
import ssl
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.integration.harness import (
    Server,
    assert_took,
    recv_all,
    recv_exactly,
    run_cli,
    wait_until,
)

HELLO = b"Hello from server!\n"
Factory = Callable[..., Server]


@dataclass
class Pki:
    ca: trustme.CA
    cert: Path
    key: Path
    ca_file: Path

    def client(self, *, maximum: ssl.TLSVersion | None = None,
               minimum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if maximum is not None:
            context.maximum_version = maximum
        if minimum is not None:
            context.minimum_version = minimum
        return context


def make_pki(where: Path, name: str = "server") -> Pki:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = where / f"{name}.pem", where / f"{name}.key", where / f"{name}-ca.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    for extra in issued.cert_chain_pems[1:]:
        extra.write_to_path(str(cert), append=True)
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return Pki(ca, cert, key, ca_file)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


def tls_args(pki: Pki) -> list[str]:
    return ["--certfile", str(pki.cert), "--keyfile", str(pki.key)]


def tls_connect(server: Server, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = server.connect(timeout=10)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


@pytest.mark.parametrize("model", ["fork", "prefork", "single"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_12_and_13_serve_every_model(server_factory: Factory, pki: Pki, model: str,
                                         version: ssl.TLSVersion) -> None:
    server = server_factory("--model", model, "--workers", "2", *tls_args(pki))
    context = pki.client(minimum=version, maximum=version)
    with tls_connect(server, context) as s:
        assert s.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2",
                               ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        s.sendall(b"one\ntwo\n")
        assert recv_exactly(s, 2 * len(HELLO)) == 2 * HELLO


def test_tls_11_is_refused(server_factory: Factory, pki: Pki) -> None:
    server = server_factory(*tls_args(pki))
    server.traceback_expected = False
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        old = pki.client(minimum=ssl.TLSVersion.TLSv1_1, maximum=ssl.TLSVersion.TLSv1_1)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer 1.1: the server must say no
    with pytest.raises(ssl.SSLError, match=r"(?i)version|alert"):
        tls_connect(server, old).close()
    server.wait_for_log(r"closed before the handler: TLS handshake failed")
    with tls_connect(server, pki.client()) as s:  # and the server goes on
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO


def test_plaintext_and_silent_clients_cost_only_their_connection(server_factory: Factory,
                                                                 pki: Pki) -> None:
    server = server_factory(*tls_args(pki), "--handshake-timeout", "1")
    with server.connect() as plain:
        plain.sendall(b"hello?\n")
        try:
            answer = recv_all(plain)
        except ConnectionResetError:  # the handshake failed on unread plaintext: fine too
            answer = b""
        assert answer == b"", "no handler ran, no answer"
    with server.connect() as silent:
        start = time.monotonic()
        assert recv_all(silent) == b"", "closed at the handshake timeout"
        assert_took(time.monotonic() - start, 1.0, "handshake timeout")
    server.wait_for_log(r"no TLS handshake within 1 s")


def test_stalled_handshakes_do_not_hold_other_clients(server_factory: Factory,
                                                      pki: Pki) -> None:
    server = server_factory(*tls_args(pki), "--handshake-timeout", "30")
    stalled = [server.connect() for _ in range(20)]  # each holds a child, nothing else
    try:
        assert wait_until(lambda: len(server.children()) == 20, 10)
        start = time.monotonic()
        with tls_connect(server, pki.client()) as s:
            s.sendall(b"hi\n")
            assert recv_exactly(s, len(HELLO)) == HELLO
        assert time.monotonic() - start < 5, "served long before the stalled ones time out"
    finally:
        for raw in stalled:
            raw.close()


def refused_with(server: Server, context: ssl.SSLContext, alert: str, *,
                 request: bool = False) -> None:
    """The connection is refused with the TLS ``alert``: TLS 1.3 refuses a client certificate
    after the client's side of the handshake is done, so it shows on the first read. With
    ``request``, the client writes its request first, as a real one does at once: the server
    must still get the alert to it (it reads and drops the request before its close, or the
    close would be a reset that can overtake the alert)."""
    with tls_connect(server, context) as s:
        if request:
            s.sendall(b"hi\n")
        with pytest.raises(ssl.SSLError) as refusal:
            s.recv(100)
    assert refusal.value.reason == alert, refusal.value


def served(server: Server, context: ssl.SSLContext) -> None:
    with tls_connect(server, context) as s:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO


def test_required_client_certificates(server_factory: Factory, pki: Pki) -> None:
    server = server_factory(*tls_args(pki), "--ca-certs", str(pki.ca_file),
                            "--client-cert", "required")
    refused_with(server, pki.client(), "TLSV13_ALERT_CERTIFICATE_REQUIRED")
    refused_with(server, pki.client(), "TLSV13_ALERT_CERTIFICATE_REQUIRED", request=True)
    server.wait_for_log(r"closed before the handler: TLS handshake failed: "
                        r"PEER_DID_NOT_RETURN_A_CERTIFICATE")
    known = pki.client()
    pki.ca.issue_cert("client@example.org").configure_cert(known)
    served(server, known)


def test_optional_client_certificates(server_factory: Factory, pki: Pki) -> None:
    server = server_factory(*tls_args(pki), "--ca-certs", str(pki.ca_file),
                            "--client-cert", "optional")
    served(server, pki.client())  # no certificate: served
    known = pki.client()
    pki.ca.issue_cert("client@example.org").configure_cert(known)
    served(server, known)
    stranger = pki.client()  # a certificate, but from a CA the server does not trust
    trustme.CA().issue_cert("client@example.org").configure_cert(stranger)
    refused_with(server, stranger, "TLSV1_ALERT_UNKNOWN_CA")
    server.wait_for_log(r"closed before the handler: TLS handshake failed: "
                        r"CERTIFICATE_VERIFY_FAILED")


def test_reload_serves_a_renewed_certificate(server_factory: Factory, pki: Pki,
                                             tmp_path: Path) -> None:
    config = tmp_path / "forkserve.toml"
    config.write_text(f'certfile = "{pki.cert}"\nkeyfile = "{pki.key}"\n')
    server = server_factory("--config", str(config))
    with tls_connect(server, pki.client()) as s:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
    renewed = make_pki(tmp_path, "renewed")  # a new key, from another CA
    renewed.cert.replace(pki.cert)
    renewed.key.replace(pki.key)
    server.signal(signal.SIGHUP)
    server.wait_for_log("reloaded the config")
    with tls_connect(server, renewed.client()) as s:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
    pki.key.write_text("not a key\n")  # a broken renewal keeps the running certificate
    server.signal(signal.SIGHUP)
    server.wait_for_log(r"reload failed, still serving .*cannot load the certificate chain")
    with tls_connect(server, renewed.client()) as s:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO


@pytest.mark.parametrize(("args", "message"), [
    (["--certfile", "/nonexistent.pem"], "invalid certfile: cannot load the certificate chain"),
    (["--keyfile", "/x.key"], "invalid keyfile: needs certfile"),
    (["--client-cert", "required"], "invalid client_cert: needs certfile and ca_certs"),
])
def test_bad_tls_settings_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = run_cli(["serve", "--bind", "127.0.0.1:0", *args])
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


def test_exec_refuses_tls(pki: Pki) -> None:
    result = run_cli(["exec", "--bind", "127.0.0.1:0", *tls_args(pki), "--", "cat"])
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "exec hands the program the raw socket" in err


def test_idle_timeout_applies_under_tls(server_factory: Factory, pki: Pki) -> None:
    server = server_factory(*tls_args(pki), "--idle-timeout", "1", "--log-level", "debug")
    with tls_connect(server, pki.client()) as s:
        port = s.getsockname()[1]
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
        start = time.monotonic()
        assert s.recv(100) == b"", "a clean close (close_notify), not a reset"
        assert_took(time.monotonic() - start, 1.0, "idle timeout under TLS")
    server.wait_for_log(rf"127\.0\.0\.1:{port}: closed: client sent nothing within the idle "
                        "timeout")
    assert server.proc.poll() is None


def test_the_server_ends_tls_with_close_notify(server_factory: Factory, pki: Pki) -> None:
    server = server_factory(*tls_args(pki), "--app", "echo")
    raw = server.connect(timeout=10)
    context = pki.client()
    with context.wrap_socket(raw, server_hostname="127.0.0.1",
                             suppress_ragged_eofs=False) as s:  # a strict client
        s.sendall(b"one\n")
        assert recv_exactly(s, 4) == b"one\n"
        # our close_notify ends the echo; unwrap() then waits for the server's, and raises
        # an unexpected-EOF error if the server only closed the socket
        s.unwrap().close()
