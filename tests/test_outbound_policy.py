"""The outbound address policy (app/outbound.py) and the bounded JWKS download (app/auth/jwks.py).

Security review findings 4 (SSRF through partner and JWKS URLs) and 10 (unbounded JWKS
download on unauthenticated token requests). The pure parts (allowlist syntax, address
classification) are tables; the rest runs against real listeners on loopback, which record
every connection they accept, so "refused" means "no connection was ever made", not only
"an error was raised".
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import pytest
from pydantic import ValidationError

from app.auth import jwks as jwks_module
from app.auth.jwks import MAX_JWKS_BYTES, JwksCache, JwksUnavailable
from app.outbound import (
    OutboundRefused,
    PolicyTransport,
    allowed_addresses,
    outbound_client,
    parse_allowlist,
    refused_by_default,
)
from app.referrals.partner import DeliveryError, PartnerClient
from app.settings import Settings

OK = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"


def client_with(allowlist: str) -> httpx.AsyncClient:
    return outbound_client(Settings(outbound_allowlist=allowlist))


# --- the allowlist ---------------------------------------------------------------------------------


def test_allowlist_entries() -> None:
    parsed = parse_allowlist(
        " Partner.Example , partner.example.:8443, 127.0.0.1:9000, [::1]:8443,"
        " 10.1.0.0/16, 127.0.0.1/32, ::1/128, 192.0.2.7, ,[fe80::1]"
    )
    assert parsed.hosts == {"partner.example"}
    assert parsed.host_ports == {("partner.example", 8443), ("127.0.0.1", 9000), ("::1", 8443)}
    assert [str(net) for net in parsed.networks] == [
        "10.1.0.0/16",
        "127.0.0.1/32",
        "::1/128",
        "192.0.2.7/32",
        "fe80::1/128",
    ]
    assert parse_allowlist("") == parse_allowlist(" , ")
    assert not parse_allowlist("").hosts and not parse_allowlist("").networks
    # Host entries compare case-insensitively, without a trailing dot, on any port.
    assert parsed.names_host("PARTNER.example.", 1) and parsed.names_host("partner.example", 8443)
    assert not parsed.names_host("other.example", 8443)
    assert parsed.names_host("::0001", 8443) and not parsed.names_host("::1", 8444)


@pytest.mark.parametrize(
    "entry",
    [
        "http://partner.example",
        "partner.example/path",
        "user@partner.example",
        "*.partner.example",
        "10.1.0.1/16",  # host bits set: almost certainly a typo
        "10.0.0.0/33",
        "partner.example:0",
        "partner.example:65536",
        "partner.example:https",
        "::1:8443x",
        "[partner.example]:80",
        "-bad.example",
        "a..b",
        "bad host",
        "exämple.org",
        ":8443",
    ],
)
def test_invalid_allowlist_entries_fail_settings_validation(entry: str) -> None:
    with pytest.raises(ValueError, match="outbound allowlist entry"):
        parse_allowlist(f"partner.example,{entry}")
    with pytest.raises(ValidationError, match="outbound allowlist entry"):
        Settings(outbound_allowlist=f"partner.example,{entry}")


def test_settings_read_the_allowlist_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARECOORD_OUTBOUND_ALLOWLIST", "partner.example:8443,10.0.0.0/8")
    assert Settings().outbound_allowlist == "partner.example:8443,10.0.0.0/8"
    monkeypatch.setenv("CARECOORD_OUTBOUND_ALLOWLIST", "http://partner.example")
    with pytest.raises(ValidationError, match="not a URL"):
        Settings()
    monkeypatch.delenv("CARECOORD_OUTBOUND_ALLOWLIST")
    assert Settings().outbound_allowlist == ""


# --- address classification ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("127.0.0.1", True),  # loopback
        ("127.1.2.3", True),
        ("10.20.30.40", True),  # private
        ("172.16.0.1", True),
        ("172.31.255.254", True),
        ("192.168.1.1", True),
        ("169.254.169.254", True),  # link-local: cloud metadata
        ("100.64.0.1", True),  # shared address space (carrier-grade NAT)
        ("0.0.0.0", True),  # unspecified: Linux connects it to loopback
        ("255.255.255.255", True),
        ("240.0.0.1", True),  # reserved
        ("192.0.2.1", True),  # documentation
        ("198.18.0.1", True),  # benchmarking
        ("224.0.0.1", True),  # multicast
        ("239.255.255.250", True),
        ("::1", True),
        ("::", True),
        ("fe80::1", True),
        ("fc00::1", True),  # unique local
        ("ff02::1", True),  # multicast (is_global, yet never a server)
        ("::ffff:127.0.0.1", True),  # IPv4-mapped loopback
        ("::ffff:10.0.0.1", True),
        ("64:ff9b::7f00:1", True),  # NAT64 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", True),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::1", True),  # 6to4 of 127.0.0.1
        ("::7f00:1", True),  # IPv4-compatible (deprecated, reserved)
        ("2001:db8::1", True),  # documentation
        ("8.8.8.8", False),
        ("93.184.216.34", False),
        ("2001:4860:4860::8888", False),
        ("::ffff:8.8.8.8", False),  # mapped global IPv4: judged as 8.8.8.8
        ("64:ff9b::808:808", False),  # NAT64 of 8.8.8.8
    ],
)
def test_address_classification(address: str, refused: bool) -> None:
    assert refused_by_default(ipaddress.ip_address(address)) is refused


def test_allowed_addresses_by_name_network_or_global() -> None:
    policy = parse_allowlist("partner.internal, 10.1.0.0/16, 127.0.0.1:9000")
    resolved = ["10.9.0.1", "8.8.8.8", "10.1.2.3", "::1"]
    # Named host: every address it resolves to (the operator vouched for the name).
    assert allowed_addresses(policy, "Partner.Internal", 443, resolved) == resolved
    # Other names: global addresses, and those inside an allowlisted network, in order.
    assert allowed_addresses(policy, "evil.example", 443, resolved) == ["8.8.8.8", "10.1.2.3"]
    assert allowed_addresses(policy, "evil.example", 443, ["127.0.0.1", "169.254.169.254"]) == []
    # host:port names that URL host on that port only; it is not an address rule.
    assert allowed_addresses(policy, "127.0.0.1", 9000, ["127.0.0.1"]) == ["127.0.0.1"]
    assert allowed_addresses(policy, "127.0.0.1", 9001, ["127.0.0.1"]) == []
    assert allowed_addresses(policy, "rebind.example", 9000, ["127.0.0.1"]) == []
    # An IPv4 network never matches an IPv6 address, whatever its bits.
    assert allowed_addresses(parse_allowlist("127.0.0.0/8"), "x.example", 80, ["::7f00:1"]) == []


# --- real connections ------------------------------------------------------------------------------


class Listener:
    """A raw TCP server on loopback that records the client port of every connection it
    accepts and answers each with a fixed HTTP response."""

    def __init__(self, response: bytes = OK, host: str = "127.0.0.1") -> None:
        self.response = response
        self.host = host
        self.accepted: list[int] = []
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Listener:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, path: str = "/", host: str | None = None) -> str:
        host = host or (f"[{self.host}]" if ":" in self.host else self.host)
        return f"http://{host}:{self.port}{path}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.append(int(writer.get_extra_info("peername")[1]))
        self._changed.set()
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self.response)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def wait_for(self, client_port: int) -> None:
        while client_port not in self.accepted:
            self._changed.clear()
            await self._changed.wait()

    async def assert_untouched(self) -> None:
        """No connection reached this listener so far. Proof without sleeping: connect a probe
        and wait until it is accepted; the accept queue is first in, first out, so an earlier
        connection would have been accepted (and recorded) before the probe."""
        _, writer = await asyncio.open_connection(self.host, self.port)
        probe = int(writer.get_extra_info("sockname")[1])
        await asyncio.wait_for(self.wait_for(probe), 10)
        writer.close()
        assert self.accepted == [probe], "a refused request reached the listener"


def redirect_to(url: str) -> bytes:
    return (
        f"HTTP/1.1 302 Found\r\nlocation: {url}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    ).encode()


@contextlib.asynccontextmanager
async def listening(*listeners: Listener) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for listener in listeners:
            await stack.enter_async_context(listener)
        yield


async def test_empty_allowlist_refuses_loopback_without_connecting() -> None:
    async with Listener() as listener, client_with("") as client:
        for url in (
            listener.url("/internal/admin"),
            listener.url("/", host="localhost"),
            listener.url("/", host="[::ffff:127.0.0.1]"),
            listener.url("/", host="0.0.0.0"),
        ):
            with pytest.raises(OutboundRefused) as refused:
                await client.post(url, content=b"patient data")
            assert not isinstance(refused.value, httpx.HTTPError | OSError)
            assert str(listener.port) in str(refused.value)
        await listener.assert_untouched()


async def test_host_port_entry_allows_that_port_only() -> None:
    async with listening(allowed := Listener(), other := Listener()):
        async with client_with(f"127.0.0.1:{allowed.port}") as client:
            response = await client.get(allowed.url())
            assert (response.status_code, response.text) == (200, "ok")
            with pytest.raises(OutboundRefused):
                await client.get(other.url())
            # The address entry names the URL host: a name resolving to it is not covered.
            with pytest.raises(OutboundRefused):
                await client.get(allowed.url(host="localhost"))
        assert len(allowed.accepted) == 1
        await other.assert_untouched()


async def test_host_name_entry_allows_that_name_on_any_port() -> None:
    async with listening(first := Listener(), second := Listener()):
        async with client_with("LOCALHOST") as client:
            assert (await client.get(first.url(host="localhost"))).status_code == 200
            # The name, not the address: the same listener by IP literal is refused.
            with pytest.raises(OutboundRefused):
                await client.get(second.url())
        await second.assert_untouched()


async def test_cidr_entry_matches_the_resolved_address() -> None:
    async with Listener() as listener:
        async with client_with("127.0.0.0/8") as client:
            assert (await client.get(listener.url())).status_code == 200
            assert (await client.get(listener.url(host="localhost"))).status_code == 200
        async with client_with("127.0.0.2/32,10.0.0.0/8") as client:
            with pytest.raises(OutboundRefused):
                await client.get(listener.url())
        assert len(listener.accepted) == 2


async def test_redirect_to_a_refused_address_is_refused_at_the_hop() -> None:
    async with listening(target := Listener(), target_by_name := Listener()):
        async with listening(
            bouncer := Listener(redirect_to(target.url("/internal"))),
            bouncer_by_name := Listener(redirect_to(target_by_name.url("/internal", host="localhost"))),
        ):
            allowlist = f"127.0.0.1:{bouncer.port},127.0.0.1:{bouncer_by_name.port}"
            async with client_with(allowlist) as client:
                # Without follow_redirects (the default) the 302 is returned as is.
                assert (await client.get(bouncer.url())).status_code == 302
                for start in (bouncer, bouncer_by_name):
                    with pytest.raises(OutboundRefused):
                        await client.get(start.url(), follow_redirects=True)
            assert len(bouncer.accepted) == 2 and len(bouncer_by_name.accepted) == 1
        await target.assert_untouched()
        await target_by_name.assert_untouched()


async def test_ipv6_loopback_literal() -> None:
    try:
        listener = Listener(host="::1")
        await listener.__aenter__()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        async with client_with("") as client:
            with pytest.raises(OutboundRefused):
                await client.get(listener.url())
        await listener.assert_untouched()
        async with client_with(f"[::1]:{listener.port}") as client:
            assert (await client.get(listener.url())).status_code == 200
    finally:
        await listener.__aexit__()


async def test_only_http_and_https() -> None:
    transport = PolicyTransport(parse_allowlist("127.0.0.0/8"))
    for url in ("ftp://127.0.0.1/x", "file:///etc/passwd"):
        with pytest.raises(OutboundRefused, match="only http and https"):
            await transport.handle_async_request(httpx.Request("GET", url))
    await transport.aclose()


async def test_allowed_name_tries_its_next_address_on_connect_error() -> None:
    """``localhost`` may resolve to ::1 first; with nothing listening there, the next address is
    tried. With a listener on 127.0.0.1 only, a localhost request must still arrive."""
    async with Listener() as listener, client_with("localhost") as client:
        assert (await client.get(listener.url(host="localhost"))).status_code == 200


async def test_partner_exchange_reports_the_policy_as_final() -> None:
    settings = Settings(outbound_allowlist="", delivery_timeout=5)
    async with Listener() as listener, outbound_client(settings) as http:
        # _exchange reads no credentials: the database pool is not used.
        partner = PartnerClient(http, cast(Any, None), settings)
        with pytest.raises(DeliveryError) as failed:
            await partner._exchange(
                "partner", "POST", listener.url("/fhir"), headers={}, content=b"{}"
            )
        assert failed.value.retryable is False
        assert str(failed.value) == "partner address is not allowed by the outbound address policy"
        await listener.assert_untouched()


# --- bounded JWKS downloads ------------------------------------------------------------------------


class JwksStreamServer:
    """A loopback server whose JWKS answer never ends (chunked) or declares 50 MB.

    It counts requests and the body bytes it managed to hand to the kernel before the client
    closed the connection. Its send buffer is pinned small so that the count stays close to
    what the client actually read."""

    SNDBUF = 8192

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests = 0
        self.sent = 0
        self.closed_by_client = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> JwksStreamServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/jwks.json"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.SNDBUF)
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            status = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            if self.mode == "trickle":
                writer.write(status + b"connection: close\r\n\r\n")
                while True:  # one byte every 20 ms: no read ever waits long
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.sleep(0.02)
            chunked = self.mode == "chunked"
            if chunked:
                head = status + b"transfer-encoding: chunked\r\n\r\n"
            else:
                head = status + b"content-length: 52428800\r\n\r\n"
            writer.write(head + (b'a\r\n{"keys": [\r\n' if chunked else b'{"keys": ['))
            block = b" " * 16384
            while self.sent < 50 * 1024 * 1024:
                writer.write(b"4000\r\n" + block + b"\r\n" if chunked else block)
                await writer.drain()
                self.sent += len(block)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed_by_client.set()
            writer.close()


@pytest.mark.parametrize("mode", ["chunked", "declared"])
async def test_jwks_body_is_cut_at_the_limit_and_the_failure_remembered(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with JwksStreamServer(mode) as server, client_with("127.0.0.0/8") as http:
        cache = JwksCache(http)
        started = time.monotonic()
        with pytest.raises(JwksUnavailable, match="too large"):
            await cache.key(server.url(), "kid", "ES384")
        assert time.monotonic() - started < 5  # stopped by the size limit, not the time limit
        await asyncio.wait_for(server.closed_by_client.wait(), 10)
        # What the server could hand over: at most what the client read (MAX_JWKS_BYTES plus one
        # read of 64 KiB) plus the socket buffers in between (the server's pinned at 8 KiB, the
        # client's receive buffer). Measured here: ~1.3 x MAX_JWKS_BYTES; the body is 50 MB.
        assert server.sent <= MAX_JWKS_BYTES + 768 * 1024, server.sent
        if mode == "declared":
            assert server.sent <= 256 * 1024  # refused on content-length, before any read
        # Within REFETCH_INTERVAL, further token requests do not fetch again.
        for _ in range(3):
            with pytest.raises(JwksUnavailable, match="too large"):
                await cache.key(server.url(), "other-kid", "ES384")
        assert server.requests == 1
        # After it, one request does.
        monkeypatch.setattr(jwks_module, "REFETCH_INTERVAL", 0.0)
        with pytest.raises(JwksUnavailable):
            await cache.key(server.url(), "kid", "ES384")
        assert server.requests == 2


async def test_jwks_fetch_has_an_overall_time_limit() -> None:
    async with JwksStreamServer("trickle") as server, client_with("127.0.0.0/8") as http:
        cache = JwksCache(http, fetch_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(JwksUnavailable, match=r"longer than 0\.5s"):
            await cache.key(server.url(), "kid", "ES384")
        # The per-read timeout (10 s) never fires on a trickle; the overall limit did.
        assert time.monotonic() - started < 5
        with pytest.raises(JwksUnavailable, match="longer than"):
            await cache.key(server.url(), "kid", "ES384")
        assert server.requests == 1


async def test_jwks_url_at_a_refused_address_is_never_contacted() -> None:
    async with Listener(OK) as listener, client_with("") as http:
        cache = JwksCache(http)
        for url in (listener.url("/jwks.json"), listener.url("/jwks.json", host="localhost")):
            with pytest.raises(JwksUnavailable, match="outbound address policy"):
                await cache.key(url, "kid", "ES384")
        await listener.assert_untouched()
