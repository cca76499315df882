"""Download an http(s) Corpus source inside hard limits: a byte limit enforced while reading, one deadline for the
whole download (``timeout`` alone bounds each socket operation, so a server dripping a byte at a time would hold a
worker forever), and no connection to the pod's own addresses, link-local ones (cloud metadata at 169.254.169.254),
or private, shared and reserved ones (cluster Services and pods, internal networks) outside the CIDRs the cluster
admin allows (chart value corpus.httpAllowedCidrs), also in IPv6 forms that embed an IPv4 address: checked on the
address actually connected to, for redirects too, so DNS cannot swap it after the check. A URL's
``user:password@`` is sent as Basic authentication (to the same origin only, also after redirects) and named in no
message.

A download that may succeed when tried again unchanged fails with ``SourceUnavailable``; one whose source needs a fix
with a plain ``SourceError``."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import errno
import functools
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from cartridges.corpus import SourceError
from cartridges_operator.redaction import redacted_url, without_login

CHUNK = 1 << 16
AUTHORIZATION = "Authorization"
RETRIED_STATUSES = (408, 429)  # Request Timeout, Too Many Requests; and every 5xx
UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}  # a route lost for now
LINK_LOCAL = (
    ipaddress.ip_network("169.254.0.0/16"),  # cloud metadata services, link-local
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS metadata over IPv6
)
LOOPBACK = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
    ipaddress.ip_network("0.0.0.0/32"),  # connects to the host itself
    ipaddress.ip_network("::/128"),
)
INTERNAL = (
    ipaddress.ip_network("100.64.0.0/10"),  # shared (carrier-grade NAT): not is_private, not on the internet either
    ipaddress.ip_network("64:ff9b:1::/48"),  # local-use NAT64
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the IPv4 address in its last 32 bits, reached through a NAT64
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SourceUnavailable(SourceError):
    """The source could not be read this time, for a reason that may pass by itself (the server down or overloaded,
    the connection refused, cut or too slow): a retry, not a fix to the spec, is what it needs."""


@dataclass
class _Guard:
    """Connects only to allowed addresses and cuts every connection it made once the deadline passes."""

    url: str
    allow_loopback: bool  # and the host's own addresses: an operator run locally, whose servers are the user's
    deadline: float  # time.monotonic()
    allowed: tuple[IPNetwork, ...] = ()  # private, shared or reserved addresses that may be fetched from all the same
    sockets: list[socket.socket] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    expired: bool = False

    def refusal(self, address: str) -> str | None:
        """Why the operator may not connect to ``address`` (None: it may). Metadata and its own pod are refused
        whatever the allowed CIDRs say."""
        ip = _embedded_ipv4(ipaddress.ip_address(address.split("%", 1)[0]))
        if any(ip in net for net in LINK_LOCAL):
            return "a link-local address (where cloud metadata services answer)"
        if any(ip in net for net in LOOPBACK):
            return None if self.allow_loopback else "a loopback address (the operator's own pod)"
        if _own(ip):
            return None if self.allow_loopback else "an address of the operator's own pod"
        if _internal(ip) and not any(ip in net for net in self.allowed):
            return (
                "a private, shared or reserved address (the cluster's Services and pods, internal servers) outside "
                "the blocks the cluster admin allows (chart value corpus.httpAllowedCidrs)"
            )
        return None

    def addresses(self, host: str, port: int) -> list[tuple[Any, ...]]:
        """Every address ``host`` resolves to; refused if any is forbidden (no picking among them)."""
        infos = self.lookup(host, port)
        for info in infos:
            address = str(info[4][0])
            reason = self.refusal(address)
            if reason is not None:
                where = host if address == host else f"{host} resolves to {address},"
                raise SourceError(
                    f"{self.url}: {where} {reason}, from which the operator fetches no Corpus sources; serve the "
                    "document from another host"
                )
        return infos

    def lookup(self, host: str, port: int) -> list[tuple[Any, ...]]:
        """``getaddrinfo`` given up at the deadline (a resolver that does not answer would hold the download through
        all its retries), on a thread of its own that may outlive it."""
        answer: concurrent.futures.Future[list[tuple[Any, ...]]] = concurrent.futures.Future()

        def resolve() -> None:
            try:
                answer.set_result(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
            except Exception as err:  # every failure is the caller's, a host name idna refuses too
                answer.set_exception(err)

        threading.Thread(target=resolve, daemon=True).start()
        try:
            return answer.result(timeout=max(0.0, self.deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            self.expire()  # the timer may not have fired yet
            raise

    def check_url(self, url: str) -> None:
        parts = urlsplit(url)
        self.addresses(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))

    def connect(self, address: tuple[str, int], timeout: Any = None, source_address: Any = None) -> socket.socket:
        """``socket.create_connection`` to the addresses just checked (no second lookup)."""
        error: OSError = OSError(f"{address[0]} has no address")
        for family, kind, proto, _, sockaddr in self.addresses(*address):
            sock = socket.socket(family, kind, proto)
            self.sockets.append(sock)
            try:
                if isinstance(timeout, (int, float)):
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                if self.expired:
                    raise TimeoutError("deadline passed")
                return sock
            except OSError as err:
                sock.close()
                error = err
        raise error

    def track(self, sock: socket.socket) -> None:
        """Cut ``sock`` too at the deadline (one that passed already: now)."""
        self.sockets.append(sock)
        if self.expired:  # after the append: ``expire`` either saw the socket or set this before
            raise TimeoutError("deadline passed")

    def login(self, url: str) -> tuple[str, str | None]:
        """``url`` without its ``user:password@``, and the Authorization header that carries them instead (``None``:
        none); the two are kept to be scrubbed from error text."""
        bare, userinfo = without_login(url)
        if userinfo is None:
            return url, None
        user, _, password = userinfo.partition(":")
        self.secrets += [userinfo, password, unquote(password)]
        token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
        return bare, f"Basic {token}"

    def scrubbed(self, text: str) -> str:
        """``text`` without any user information or password of the URLs fetched (error text may quote a host and
        port parsed from them in any shape)."""
        for secret in sorted(filter(None, self.secrets), key=len, reverse=True):
            text = text.replace(secret, "<redacted>")
        return text

    def expire(self) -> None:
        self.expired = True
        for sock in self.sockets:
            with contextlib.suppress(OSError):  # closed already
                sock.shutdown(socket.SHUT_RDWR)


def _embedded_ipv4(ip: IPAddress) -> IPAddress:
    """The IPv4 address that an IPv6 one leads to (IPv4-mapped, NAT64, 6to4), else ``ip`` itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def _internal(ip: IPAddress) -> bool:
    """Not an internet address: private (10/8, 172.16/12, 192.168/16, fc00::/7...), shared, reserved, multicast."""
    return ip.is_private or ip.is_reserved or ip.is_multicast or ip.is_unspecified or any(ip in n for n in INTERNAL)


def _own(ip: IPAddress) -> bool:
    """Whether ``ip`` is an address of this host (the operator's pod, on any interface): only those, and multicast
    groups, can be bound."""
    if ip.is_multicast:
        return False
    try:
        with socket.socket(socket.AF_INET if ip.version == 4 else socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:  # EADDRNOTAVAIL: not ours (or no IPv6 here at all)
        return False
    return True


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Checks where a redirect goes before following it (the connect check covers it too, but not via a proxy), and
    follows none to ftp://, which urllib would fetch with its own connections, outside the connect check. A redirect
    keeps the login only on the same origin; one to a URL with ``user:password@`` logs in with those."""

    def __init__(self, guard: _Guard) -> None:
        self.guard = guard

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        scheme = urlsplit(newurl).scheme
        if scheme not in ("http", "https"):
            raise SourceError(f"{self.guard.url}: redirects to {scheme}://, but the operator fetches only http(s)")
        self.guard.check_url(newurl)
        newurl, authorization = self.guard.login(newurl)
        redirected = super().redirect_request(req, fp, code, msg, headers, newurl)
        if authorization is None and _origin(newurl) == _origin(req.full_url):
            authorization = req.unredirected_hdrs.get(AUTHORIZATION)
        if redirected is not None and authorization is not None:
            redirected.add_unredirected_header(AUTHORIZATION, authorization)
        return redirected


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


class _Connection(http.client.HTTPConnection):
    """Connects through ``guard`` (http.client's own hook), so that the address is checked and the deadline cuts it."""

    def __init__(self, host: str, *, guard: _Guard, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
        self.guard = guard
        self._create_connection = guard.connect


class _TLSConnection(_Connection, http.client.HTTPSConnection):
    """Hands the guard its TLS socket before the handshake: wrapping detaches the socket the guard connected, and
    cutting that one would leave the TLS connection running past the deadline."""

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        server_hostname = self._tunnel_host or self.host  # type: ignore[attr-defined]
        self.sock = self._context.wrap_socket(  # type: ignore[attr-defined]
            self.sock, server_hostname=server_hostname, do_handshake_on_connect=False
        )
        self.guard.track(self.sock)
        self.sock.do_handshake()


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, guard: _Guard) -> None:
        super().__init__()
        self.guard = guard

    def http_open(self, req: Any) -> Any:
        return self.do_open(functools.partial(_Connection, guard=self.guard), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, guard: _Guard) -> None:
        self.context = ssl.create_default_context()
        super().__init__(context=self.context)
        self.guard = guard

    def https_open(self, req: Any) -> Any:
        return self.do_open(functools.partial(_TLSConnection, guard=self.guard), req, context=self.context)


def fetch(
    url: str, limit: int, timeout_s: float, allow_loopback: bool = False, allowed: tuple[IPNetwork, ...] = ()
) -> bytes:
    """The body of ``url``, at most ``limit + 1`` bytes (more means: too large), within ``timeout_s`` in all; from a
    private, shared or reserved address only within the ``allowed`` blocks."""
    guard = _Guard(redacted_url(url), allow_loopback, time.monotonic() + timeout_s, allowed)  # url: as messages say
    opener = urllib.request.build_opener(_HTTPHandler(guard), _HTTPSHandler(guard), _RedirectHandler(guard))
    timer = threading.Timer(timeout_s, guard.expire)
    timer.start()
    try:
        requested, authorization = guard.login(url)  # without user:password@
        guard.check_url(url)  # a host that does not resolve is a source to fix, like one that does not answer
        request = urllib.request.Request(requested)
        if authorization is not None:
            request.add_unredirected_header(AUTHORIZATION, authorization)  # redirects: see _RedirectHandler
        with opener.open(request, timeout=timeout_s) as response:
            _refuse_encoded(response, guard.url)
            data = _read_at_most(response, limit + 1)
    except SourceError:
        raise
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as err:  # ValueError: a bad port
        if guard.expired:
            raise _too_slow(guard.url, timeout_s) from err
        failure = SourceUnavailable if _may_pass(err) else SourceError
        raise failure(f"{guard.url}: cannot fetch ({guard.scrubbed(str(err))})") from err
    finally:
        timer.cancel()
    if guard.expired:  # cut off: what was read may look complete but is not
        raise _too_slow(guard.url, timeout_s)
    return data


def _refuse_encoded(response: Any, url: str) -> None:
    """The operator asks for the body as it is (Accept-Encoding: identity) and decodes none: a compressed one would
    otherwise fail later as "not UTF-8 text", which does not say what to fix."""
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", ""):
        raise SourceError(
            f"{url}: the server sent the body with Content-Encoding: {encoding}, which the operator does not decode; "
            "serve it unencoded"
        )


def status_may_pass(status: int) -> bool:
    """Whether an HTTP answer of ``status`` may turn into a success unchanged: every 5xx, 408 and 429."""
    return status >= 500 or status in RETRIED_STATUSES


def _may_pass(err: Exception) -> bool:
    """Whether a fetch that failed with ``err`` may succeed unchanged later: the server said it is unavailable, the
    connection was refused, cut or timed out, a name lookup failed for now. Not: a 404 or 403, a host that does not
    exist, a certificate that does not verify, a malformed URL."""
    if isinstance(err, urllib.error.HTTPError):
        return status_may_pass(err.code)
    cause = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(cause, socket.gaierror):
        return cause.errno == socket.EAI_AGAIN
    if isinstance(cause, OSError) and cause.errno in UNREACHABLE:
        return True
    return isinstance(cause, ConnectionError | TimeoutError | http.client.IncompleteRead)


def _read_at_most(response: Any, size: int) -> bytes:
    """At most ``size`` bytes of the body; a connection closed before the Content-Length declared is an error (urllib
    returns what came, as if complete), so that a document cut short is not stored."""
    chunks: list[bytes] = []
    read = 0
    while read < size:
        chunk = response.read(min(CHUNK, size - read))
        if not chunk:
            if response.length:  # what is left of the Content-Length
                raise ConnectionError(f"the connection closed after {read} of {read + response.length} bytes")
            break
        chunks.append(chunk)
        read += len(chunk)
    return b"".join(chunks)


def _too_slow(url: str, timeout_s: float) -> SourceUnavailable:
    return SourceUnavailable(
        f"{url}: the download did not finish within timeoutSeconds={timeout_s:g}; raise it (at most 600) or "
        "serve the document faster"
    )
