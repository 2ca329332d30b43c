"""The outbound address policy, and the one factory of carecoord's outgoing HTTP clients.

Why (security review finding 4, server-side request forgery): carecoord sends requests to
addresses that other people choose: a partner Endpoint's ``address`` (referral delivery POSTs
patient data there), a partner's token URL, a client's ``jwks_url`` (fetched on an
*unauthenticated* token request), a trusted issuer's JWKS. Without a policy, any of those can
point at ``http://127.0.0.1:PORT/internal/...``, a cloud metadata service (169.254.169.254)
or the private network, and the errors carecoord reports become a port scanner.

The policy (``CARECOORD_OUTBOUND_ALLOWLIST``, :func:`parse_allowlist`): only ``http`` and
``https``; a connection goes only to *global* unicast addresses (``ipaddress``:
``is_global`` and not multicast or reserved; IPv4 embedded in IPv6 as IPv4-mapped
``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96`` or 6to4 ``2002::/16`` is judged by the IPv4
address), unless the allowlist names the URL's host (any port), the host and port, or a CIDR
network holding the address.

Where it is enforced: in the network backend under httpcore's connection pool
(:class:`PolicyNetworkBackend`), i.e. on the address actually connected to, resolved at
connection time. Checking the URL before sending would leave a DNS-rebinding window (the
name resolves to a global address for the check and to 127.0.0.1 for the connection) and
would miss redirect hops; at the socket, every connection of every hop is checked, whatever
resolved it. TLS still verifies the URL's host name: httpcore passes the URL host (not the
address we connected to) as ``server_hostname`` to ``start_tls``
(httpcore/_async/connection.py ``_connect``).

A refusal is :class:`OutboundRefused`, deliberately not an httpx/httpcore error: callers
must tell "not allowed, never retry" from a transport fault that may heal.

No proxy support: through a proxy, the policy would judge the proxy's address, not the
target's, so :func:`outbound_client` ignores ``HTTP(S)_PROXY`` (``trust_env=False``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import logging
import re
import socket
import ssl
import time
import typing
from collections.abc import Iterable
from dataclasses import dataclass

import httpcore
import httpx

if typing.TYPE_CHECKING:
    from app.settings import Settings

logger = logging.getLogger("carecoord.outbound")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_SCHEMES = ("http", "https")
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
"""RFC 6052 well-known prefix: a NAT64 gateway forwards 64:ff9b::a.b.c.d to a.b.c.d."""

# Explicit limits, as for every client carecoord owns: a slow or hostile peer must not hold
# connections or requests forever (callers may pass a tighter per-request timeout).
TIMEOUT = httpx.Timeout(10.0, connect=5.0)
LIMITS = httpx.Limits(max_connections=50, max_keepalive_connections=10)

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_BRACKETED = re.compile(r"\[([^\]]+)\](?::(\d+))?")


class OutboundRefused(Exception):
    """The outbound address policy refused a request: no allowed address, or not http(s).

    Not an httpx/httpcore error on purpose: retrying cannot help, and callers must not
    mistake it for a network fault. ``str(exc)`` names the host and port only.
    """

    def __init__(self, host: str, port: int | None, reason: str = "") -> None:
        self.host = host
        self.port = port
        where = host if port is None else f"{host}:{port}"
        super().__init__(
            f"outbound connection to {where} is not allowed by the outbound address policy"
            + (f" ({reason})" if reason else "")
        )


@dataclass(frozen=True)
class Allowlist:
    """Parsed ``CARECOORD_OUTBOUND_ALLOWLIST``: what may be reached besides global addresses."""

    hosts: frozenset[str] = frozenset()
    """URL hosts allowed on any port (lower case, no trailing dot; IP literals canonical)."""
    host_ports: frozenset[tuple[str, int]] = frozenset()
    """(URL host, port) pairs allowed."""
    networks: tuple[IPNetwork, ...] = ()
    """Networks whose addresses are allowed, whatever name resolved to them."""

    def names_host(self, host: str, port: int) -> bool:
        """Whether an entry names this URL host (so all of its addresses are allowed)."""
        key = _host_key(host)
        return key in self.hosts or (key, port) in self.host_ports

    def in_networks(self, address: IPAddress) -> bool:
        # Compare versions explicitly: an IPv6 address is never "in" an IPv4 network.
        return any(address.version == net.version and address in net for net in self.networks)


def _host_key(host: str) -> str:
    """A URL host as the allowlist compares it: case-insensitive, no trailing dot, and an IP
    literal in canonical form (so ``[::0001]`` and ``::1`` are one host)."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def parse_allowlist(value: str) -> Allowlist:
    """Parse a comma list of entries; raise ValueError naming the first invalid one.

    Entries: ``partner.example`` (that URL host, any port), ``partner.example:8443`` or
    ``127.0.0.1:8443`` or ``[::1]:8443`` (that URL host and port), ``10.1.0.0/16`` or
    ``::1/128`` (every address in the network, whichever name resolved to it); a bare IP
    address is its one-address network.
    """
    hosts: set[str] = set()
    host_ports: set[tuple[str, int]] = set()
    networks: list[IPNetwork] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        try:
            kind, parsed = _parse_entry(entry)
        except ValueError as exc:
            raise ValueError(f"outbound allowlist entry {entry!r}: {exc}") from None
        if kind == "network":
            assert isinstance(parsed, ipaddress.IPv4Network | ipaddress.IPv6Network)
            networks.append(parsed)
        elif kind == "host":
            assert isinstance(parsed, str)
            hosts.add(parsed)
        else:
            assert isinstance(parsed, tuple)
            host_ports.add(parsed)
    return Allowlist(frozenset(hosts), frozenset(host_ports), tuple(networks))


def _parse_entry(entry: str) -> tuple[str, IPNetwork | str | tuple[str, int]]:
    if "://" in entry or "@" in entry or any(ch in entry for ch in "?#*") or " " in entry:
        raise ValueError("expected a host name, host:port or CIDR network (not a URL or pattern)")
    if "/" in entry:
        try:
            return "network", ipaddress.ip_network(entry, strict=True)
        except ValueError as exc:
            raise ValueError(f"not a CIDR network ({exc})") from None
    bracketed = _BRACKETED.fullmatch(entry)
    if bracketed is not None:
        try:
            address = ipaddress.IPv6Address(bracketed.group(1))
        except ValueError:
            raise ValueError("brackets must hold an IPv6 address") from None
        if bracketed.group(2) is None:
            return "network", ipaddress.ip_network(address)
        return "host_port", (str(address), _port(bracketed.group(2)))
    try:
        return "network", ipaddress.ip_network(ipaddress.ip_address(entry))
    except ValueError:
        pass
    host, sep, port_text = entry.rpartition(":")
    if not sep:
        host, port_text = entry, ""
    if ":" in host:
        raise ValueError("write an IPv6 address with a port as [address]:port")
    if not host.isascii():
        raise ValueError("write an international host name in its IDNA (xn--) form")
    key = _host_key(host)
    if not _HOST_NAME.fullmatch(key) and not _is_ip(key):
        raise ValueError("not a valid host name")
    if sep:
        return "host_port", (key, _port(port_text))
    return "host", key


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError("the port must be a number from 1 to 65535")
    return int(text)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def refused_by_default(address: IPAddress) -> bool:
    """Whether ``address`` is off limits without an allowlist entry: anything but a global
    unicast address (loopback, private, shared 100.64/10, link-local, multicast, unspecified,
    reserved, documentation ...). IPv4 embedded in IPv6 is judged as that IPv4 address, so
    ``::ffff:127.0.0.1`` or ``64:ff9b::7f00:1`` cannot smuggle loopback past the check."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return refused_by_default(address.ipv4_mapped)
        if address in NAT64_PREFIX:
            return refused_by_default(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        # 6to4 relays forward 2002:AABB:CCDD:: towards the IPv4 address AA.BB.CC.DD.
        if address.sixtofour is not None and refused_by_default(address.sixtofour):
            return True
    return not address.is_global or address.is_multicast or address.is_reserved


def allowed_addresses(allowlist: Allowlist, host: str, port: int, addresses: Iterable[str]) -> list[str]:
    """The resolved ``addresses`` of ``host:port`` that the policy lets carecoord connect to,
    in order. An entry naming the host allows all of them (the operator vouched for the name);
    otherwise each must be global, or inside an allowlisted network."""
    named = allowlist.names_host(host, port)
    allowed: list[str] = []
    for text in addresses:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue  # not an IP address: nothing we could judge, so nothing we connect to
        permitted = named or allowlist.in_networks(address) or not refused_by_default(address)
        if permitted and text not in allowed:
            allowed.append(text)
    return allowed


_RESOLVER = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="check-url")
"""Threads of its own for :func:`check_url` lookups: a client naming hosts whose DNS answers
slowly must not tie up the default executor that everything else uses."""


def parse_url(url: str) -> httpx.URL | None:
    """``url`` parsed, when carecoord could connect to it at all: parsable, with a host name IDNA
    can encode (what resolving it needs); None otherwise."""
    try:
        parsed = httpx.URL(url)
        parsed.host.encode("idna")
    except (httpx.InvalidURL, UnicodeError, ValueError):
        return None
    return parsed if parsed.host else None


async def check_url(allowlist: Allowlist, url: str, *, resolve_timeout: float = 2.0) -> None:
    """Judge ``url`` as a connection to it would be judged now (scheme, resolved addresses);
    raise OutboundRefused when the policy would refuse it, the URL is malformed or the name does
    not resolve in time. For refusing a configured address early (a Subscription endpoint: 422
    at creation); every connection is checked again when it is made, so a name that later
    resolves elsewhere gains nothing."""
    parsed = parse_url(url)
    if parsed is None:
        raise OutboundRefused(url[:100], None, "not a valid URL")
    host = parsed.host
    if parsed.scheme not in ALLOWED_SCHEMES:
        raise OutboundRefused(host or url[:100], parsed.port, "only http and https")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    try:
        lookup = loop.run_in_executor(
            _RESOLVER,
            functools.partial(
                socket.getaddrinfo, host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            ),
        )
        infos = await asyncio.wait_for(lookup, resolve_timeout)
    except (TimeoutError, OSError, UnicodeError) as exc:
        raise OutboundRefused(host, port, "the name does not resolve") from exc
    if not allowed_addresses(allowlist, host, port, [str(info[4][0]) for info in infos]):
        raise OutboundRefused(host, port)


class PolicyNetworkBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the policy applied to the resolved addresses.

    httpcore calls ``connect_tcp(URL host, port)`` for every new connection (first request,
    redirect hop, reconnect); this resolves the host itself, keeps the allowed addresses and
    hands the inner backend an IP address, so there is no second resolution for DNS
    rebinding to exploit.
    """

    def __init__(self, allowlist: Allowlist, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._allowlist = allowlist
        # AnyIOBackend is what httpcore's own default picks under asyncio (carecoord's loop).
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109  (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        # One budget for resolving and for every address tried: httpcore's connect timeout.
        deadline = None if timeout is None else time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        except OSError as exc:  # socket.gaierror: the name does not resolve
            raise httpcore.ConnectError(f"cannot resolve {host}") from exc
        resolved = [str(info[4][0]) for info in infos]
        allowed = allowed_addresses(self._allowlist, host, port, resolved)
        if not allowed:
            # Host and port only: the URL may carry credentials or identifiers.
            logger.warning("outbound connection to %r port %s refused by the address policy", host, port)
            raise OutboundRefused(host, port)
        last_error: Exception | None = None
        for address in allowed:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise httpcore.ConnectTimeout(f"connecting to {host} timed out")
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=remaining,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as exc:
                last_error = exc  # refused or unreachable: the next address may answer
        assert last_error is not None
        raise last_error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109  (httpcore's interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        # A unix socket is a local service by definition; carecoord never configures one.
        raise OutboundRefused(path, None, "unix sockets are never allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class PolicyTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport (request/response mapping, exception mapping, pooling) whose
    connection pool connects through :class:`PolicyNetworkBackend`."""

    def __init__(
        self,
        allowlist: Allowlist,
        *,
        limits: httpx.Limits = LIMITS,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(limits=limits, trust_env=False)
        # httpx 0.28 offers no public way to give AsyncHTTPTransport a network backend, so
        # its pool is replaced by an identical one that has ours. If httpx ever renames the
        # attribute, fail here (at startup, in every test) rather than run without the policy.
        if not isinstance(getattr(self, "_pool", None), httpcore.AsyncConnectionPool):
            raise RuntimeError("httpx internals changed: the outbound address policy cannot be installed")
        self._pool = httpcore.AsyncConnectionPool(
            # certifi's CAs, or SSL_CERT_FILE / SSL_CERT_DIR for a partner behind a private CA.
            ssl_context=ssl_context or httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=PolicyNetworkBackend(allowlist),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme not in ALLOWED_SCHEMES:
            raise OutboundRefused(request.url.host, request.url.port, "only http and https")
        return await super().handle_async_request(request)


def outbound_client(settings: Settings) -> httpx.AsyncClient:
    """The HTTP client for every request carecoord makes (JWKS, partner tokens and FHIR calls).

    Explicit timeouts and limits; redirects are not followed (a caller that opts in per
    request still gets every hop checked by the transport); no proxies from the environment.
    """
    allowlist = parse_allowlist(settings.outbound_allowlist)
    # httpx logs every request's full URL at INFO; a partner's URL may carry identifiers.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
    return httpx.AsyncClient(
        transport=PolicyTransport(allowlist, limits=LIMITS),
        timeout=TIMEOUT,
        follow_redirects=False,
        trust_env=False,
    )
