"""http(s) Corpus sources against servers on 127.0.0.1 that misbehave on purpose: cut a body short, drip it over
TLS, compress it unasked, or want a login."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import gzip
import ipaddress
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cartridges.corpus import SourceError
from cartridges.store import Store
from cartridges_e2e.pki import Pki
from cartridges_operator.corpus import reconcile_corpus
from cartridges_operator.http_fetch import SourceUnavailable, _Guard, fetch
from cartridges_operator.redaction import redacted

Reply = Callable[[socket.socket, bytes], None]
"""Answers one request (its head as received) on its connection."""


@contextlib.contextmanager
def scripted_server(reply: Reply, tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """Serves every connection on 127.0.0.1 with ``reply``, over TLS with ``tls``; yields the server's base URL."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the client hung up
            if tls is not None:
                conn = tls.wrap_socket(conn, server_side=True)
            with conn:
                reply(conn, conn.recv(1 << 16))

    def serve() -> None:
        with contextlib.suppress(OSError):  # closed at the end of the test
            while True:
                threading.Thread(target=answer, args=(listener.accept()[0],), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield f"{'https' if tls else 'http'}://127.0.0.1:{listener.getsockname()[1]}"
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)
    listener.close()


def head(status: str, **headers: Any) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_body_cut_short_is_no_document() -> None:
    """urllib takes a connection closed before Content-Length as the end of the body: the part would be stored as the
    new version (and the Corpus go Ready on it) instead of keeping the last good one."""

    def cut(conn: socket.socket, request: bytes) -> None:
        conn.sendall(head("200 OK", Content_Length=5000) + b"Chapter 1. The first part of the hand")

    cut_short = "cannot fetch \\(the connection closed after 37 of 5000 bytes\\)"
    with scripted_server(cut) as base, pytest.raises(SourceUnavailable, match=cut_short):
        fetch(f"{base}/handbook.md", 1 << 20, 10, allow_loopback=True)


def test_a_body_compressed_unasked_is_refused_saying_so() -> None:
    """The operator asks for the body as it is; a gzip body would otherwise fail later as "not UTF-8 text"."""
    body = gzip.compress(b"Chapter 1.\n")

    def compressed(conn: socket.socket, request: bytes) -> None:
        conn.sendall(head("200 OK", Content_Length=len(body), Content_Encoding="gzip") + body)

    refused = "sent the body with Content-Encoding: gzip, .* serve it unencoded"
    with scripted_server(compressed) as base, pytest.raises(SourceError, match=refused):
        fetch(f"{base}/handbook.md", 1 << 20, 10, allow_loopback=True)


@pytest.mark.timeout(60)  # without the deadline on the TLS socket, the download takes the whole drip
def test_the_deadline_cuts_an_https_download_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TLS replaces the connected socket with its own: the deadline must cut that one, or a server dripping a byte
    per read timeout holds the read slot for ever."""
    pki = Pki(tmp_path / "pki")
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca.cert))
    served = pki.issue("web", "127.0.0.1", server_names=("127.0.0.1",))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(served.cert, served.key)
    length, sent, hung_up = 100, [0], threading.Event()

    def drip(conn: socket.socket, request: bytes) -> None:
        conn.sendall(head("200 OK", Content_Length=length))
        try:
            for _ in range(length):  # 20 s in all
                time.sleep(0.2)
                conn.sendall(b"x")
                sent[0] += 1
        finally:
            hung_up.set()

    with scripted_server(drip, tls) as base:
        with pytest.raises(SourceUnavailable, match="did not finish within timeoutSeconds=1"):
            fetch(f"{base}/handbook.md", 1 << 20, 1, allow_loopback=True)
        assert hung_up.wait(30)
    assert sent[0] < length


def login(user: str, password: str) -> bytes:
    return b"Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode())


def test_a_login_in_the_url_is_sent_to_its_origin_only_and_shown_nowhere() -> None:
    """``user:password@`` goes as Basic authentication (percent-decoded), also after a redirect on the same origin;
    not to another origin, unless the redirect names a login of its own; and no error message quotes it."""
    seen: list[bytes] = []

    def members_only(conn: socket.socket, request: bytes) -> None:
        seen.append(request)
        path = request.split(b" ")[1].decode()
        if path.startswith("/redirect?to="):
            conn.sendall(head("302 Found", Location=urllib.parse.unquote(path.partition("=")[2]), Content_Length=0))
        elif login("alice", "Hunter2@S3cret") in request or login("bob", "0ther-S3cret") in request:
            conn.sendall(head("200 OK", Content_Length=14) + b"Members only.\n")
        else:
            conn.sendall(head("401 Unauthorized", Content_Length=0))

    with scripted_server(members_only) as base, scripted_server(members_only) as other:
        alice = base.replace("http://", "http://alice:Hunter2%40S3cret@")
        assert fetch(f"{alice}/doc", 1000, 10, allow_loopback=True) == b"Members only.\n"
        moved = urllib.parse.quote(f"{base}/doc")
        assert fetch(f"{alice}/redirect?to={moved}", 1000, 10, allow_loopback=True) == b"Members only.\n"
        with pytest.raises(SourceError, match="HTTP Error 401"):
            fetch(f"{alice}/redirect?to={urllib.parse.quote(f'{other}/doc')}", 1000, 10, allow_loopback=True)
        assert b"Authorization" not in seen[-1]
        bob = other.replace("http://", "http://bob:0ther-S3cret@")
        assert fetch(f"{base}/redirect?to={urllib.parse.quote(f'{bob}/doc')}", 1000, 10, allow_loopback=True)
        nowhere = urllib.parse.quote("http://bob:0ther-S3cret@127.0.0.1/doc")  # port 80: nothing listens
        with pytest.raises(SourceError, match="cannot fetch") as failed:
            fetch(f"{base}/redirect?to={nowhere}", 1000, 10, allow_loopback=True)
        assert "0ther" not in redacted(str(failed.value))  # as status shows it: the query (here its own) redacted


def test_the_reviewers_login_url_is_named_in_no_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib handed ``alice:Hunter2-S3cret@docs.example.com`` to http.client as host and port, and the error
    ("nonnumeric port: 'Hunter2-S3cret@docs.example.com'") reached every condition, so every Warning Event."""
    resolve = socket.getaddrinfo

    def here(host: str, *args: Any, **kwargs: Any) -> Any:
        return resolve("127.0.0.1" if host == "docs.example.com" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", here)  # port 443 there: nothing listens
    url = "https://alice:Hunter2-S3cret@docs.example.com/handbook.md"
    corpus = {"description": "d", "sources": [{"http": {"url": url, "timeoutSeconds": 5}}]}
    status = reconcile_corpus(corpus, {}, "ns", "c", 1, Store(), f"file://{tmp_path}/store")
    messages = [condition["message"] for condition in status["conditions"]]
    assert any("https://docs.example.com/handbook.md: cannot fetch" in message for message in messages), messages
    assert not any("Hunter2" in message or "S3cret" in message for message in messages), messages


@pytest.mark.timeout(60)
def test_the_deadline_covers_the_name_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolver that does not answer held the download through all its retries, past timeoutSeconds: the fetch
    must give up at the deadline, not when the lookup ends (here: only once the test lets it, after the fetch)."""
    resolve, released, outlived = socket.getaddrinfo, threading.Event(), threading.Event()

    def stuck(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "slow-dns.example.com" and not released.wait(10):
            outlived.set()
        return resolve("127.0.0.1" if host == "slow-dns.example.com" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", stuck)
    with pytest.raises(SourceUnavailable, match="did not finish within timeoutSeconds=1"):
        fetch("http://slow-dns.example.com/doc", 1000, 1, allow_loopback=True)
    assert not outlived.is_set()  # the fetch ended while the lookup still waited
    released.set()


@pytest.mark.parametrize("host", ["a..b.example.com", "a" * 64 + ".example.com"])
def test_a_host_name_no_resolver_takes_is_a_source_to_fix_at_once(host: str) -> None:
    """The lookup runs on a thread of its own: a name the idna codec refuses (an empty label, one over 63
    characters) must reach the caller as the bad URL it is, not wait out the deadline as a slow download."""
    with pytest.raises(SourceError, match="cannot fetch") as raised:
        fetch(f"http://{host}/doc.txt", 1000, 5)
    assert not isinstance(raised.value, SourceUnavailable)


SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address
INTERNAL = ["10.96.0.1", "10.244.1.7", "172.16.0.10", "192.168.1.1", "100.64.0.1", "fd00::2", "fc00::1", "224.0.0.1"]
EMBEDDED = ["64:ff9b::a9fe:a9fe", "::ffff:10.96.0.1", "64:ff9b::a00:1", "2002:a9fe:a9fe::1", "::169.254.169.254"]


@pytest.mark.parametrize("address", INTERNAL + EMBEDDED)
def test_private_shared_and_reserved_addresses_are_refused(address: str) -> None:
    """Cluster Services (10.96.0.1), pods, internal networks and NAT64 or mapped forms of them (or of metadata):
    any tenant who may create a Corpus would make the operator fetch them and read the answer in the stored corpus."""
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(SourceError, match="link-local|private, shared or reserved|own pod") as refused:
        fetch(f"http://{host}:8080/metrics", 1000, 2)
    assert not isinstance(refused.value, SourceUnavailable)


def test_an_allowed_block_lets_its_private_addresses_through_but_not_metadata() -> None:
    allowed = (ipaddress.ip_network("10.96.0.0/12"),)
    guard = _Guard("http://docs.internal/", False, time.monotonic() + 5, allowed)
    assert guard.refusal("10.96.0.1") is None and guard.refusal("::ffff:10.96.0.1") is None
    assert guard.refusal("10.244.1.7") is not None and guard.refusal("8.8.8.8") is None
    metadata = _Guard("http://m/", False, time.monotonic() + 5, (ipaddress.ip_network("169.254.0.0/16"),))
    assert metadata.refusal("169.254.169.254") is not None


def own_address() -> str:
    """An IPv4 address of this machine's first interface other than loopback."""
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe, contextlib.suppress(OSError):  # none there
            answer = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            address = socket.inet_ntoa(answer[20:24])
            if not ipaddress.ip_address(address).is_loopback:
                return address
    raise AssertionError("this test needs a network interface with an IPv4 address other than loopback")


def test_the_operators_own_address_is_refused_even_in_an_allowed_block() -> None:
    """Its pod IP is no loopback address, but reaches the operator's own ports (metrics) just the same."""

    def served(conn: socket.socket, request: bytes) -> None:
        conn.sendall(head("200 OK", Content_Length=9) + b"internal\n")

    address = own_address()
    listener = socket.create_server((address, 0))
    threading.Thread(target=lambda: served(listener.accept()[0], b""), daemon=True).start()
    url = f"http://{address}:{listener.getsockname()[1]}/metrics"
    try:
        with pytest.raises(SourceError, match="an address of the operator's own pod"):
            fetch(url, 1000, 2)
        with pytest.raises(SourceError, match="an address of the operator's own pod"):
            fetch(url, 1000, 2, allowed=(ipaddress.ip_network(address),))
        assert fetch(url, 1000, 2, allow_loopback=True) == b"internal\n"  # a local run: the user's own machine
    finally:
        listener.close()
