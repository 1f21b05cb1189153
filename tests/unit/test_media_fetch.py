"""Safe fetching of http(s) media URLs (router/media/remote.py) against real servers on 127.0.0.1.

Every test runs behind two guards: httpx may only send to loopback literals (a request anywhere else fails
the test before a connection is made), and the system resolver is off (names resolve only through the stub
resolver each policy carries). The fetch reaches a test server under a public-looking name only where the
policy's code-only seam `private_address_hosts` names that host; everything else gets the default checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import httpx
import pytest

from router.media import MediaPolicy, MediaRefused, fetch_media
from router.media.policy import IPAddress
from shared.config import MTMDOptions
from tests.support import media_samples as samples
from tests.support.media_server import MediaServer, Route, drip, media_server, silent_server, unsized

PNG = samples.png()
NAME = "media.example"  # the one host allowed to reach the test server


class StubResolver:
    def __init__(self, table: dict[str, Sequence[str]]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.calls.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown host")
        return [ipaddress.ip_address(a) for a in self.table[host]]


@pytest.fixture(autouse=True)
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """URLs httpx sent; anything but a loopback literal fails the test before connecting."""
    urls: list[str] = []
    real_send = httpx.AsyncClient.send

    async def guarded(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        address = ipaddress.ip_address(request.url.host)  # a name here fails the test too
        assert address.is_loopback, f"the test would have sent traffic to {address}"
        urls.append(str(request.url))
        return await real_send(self, request, **kwargs)

    real_getaddrinfo = socket.getaddrinfo

    def loopback_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        assert host is not None and ipaddress.ip_address(host).is_loopback, (
            f"system resolver asked for {host}"
        )
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "send", guarded)
    monkeypatch.setattr(socket, "getaddrinfo", loopback_getaddrinfo)
    return urls


@pytest.fixture
def resolver() -> StubResolver:
    return StubResolver(
        {NAME: ["127.0.0.1"], "internal.example": ["127.0.0.1"], "also.example": ["127.0.0.1"]}
    )


@pytest.fixture
def policy(resolver: StubResolver) -> MediaPolicy:
    return MediaPolicy(timeout_seconds=5.0, resolver=resolver, private_address_hosts=frozenset({NAME}))


@pytest.fixture
def server() -> Iterator[MediaServer]:
    with media_server() as running:
        running.routes["/img.png"] = Route(body=PNG, headers={"Content-Type": "image/png"})
        yield running


def fetch(url: str, policy: MediaPolicy) -> Any:
    return asyncio.run(fetch_media(url, "image", policy))


def refused(url: str, policy: MediaPolicy, reason: str) -> None:
    with pytest.raises(MediaRefused, match=reason):
        fetch(url, policy)


def test_a_name_is_resolved_once_and_the_checked_address_is_what_gets_the_request(
    server: MediaServer, policy: MediaPolicy, resolver: StubResolver, sent: list[str]
) -> None:
    blob = fetch(f"http://{NAME}:{server.port}/img.png", policy)
    assert (blob.kind, blob.format, blob.width, blob.height) == ("image", "png", 4, 3)
    assert blob.data == PNG and blob.sha256 == hashlib.sha256(PNG).hexdigest()
    assert resolver.calls == [NAME]
    assert sent == [f"http://127.0.0.1:{server.port}/img.png"]
    assert server.seen[0].headers["host"] == f"{NAME}:{server.port}"


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_an_ipv6_answer_is_connected_to_in_brackets(policy: MediaPolicy, sent: list[str]) -> None:
    with media_server("::1") as server:
        server.routes["/img.png"] = Route(body=PNG)
        stub = StubResolver({"six.example": ["::1"]})
        six = replace(policy, resolver=stub, private_address_hosts=frozenset({"six.example"}))
        assert fetch(f"http://six.example:{server.port}/img.png", six).format == "png"
        assert sent == [f"http://[::1]:{server.port}/img.png"]
        assert server.seen[0].headers["host"] == f"six.example:{server.port}"


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.0.0.2",
        "[::ffff:127.0.0.1]",
        "[::1]",
        "0.0.0.0",
        "127.1",
        "2130706433",
        "0x7f000001",
        "localhost",
    ],
)
def test_loopback_urls_are_refused_and_nothing_reaches_the_server(
    host: str, server: MediaServer, policy: MediaPolicy, resolver: StubResolver, sent: list[str]
) -> None:
    refused(f"http://{host}:{server.port}/img.png", policy, "loopback|unspecified|non-canonical numeric host")
    assert sent == [] and resolver.calls == []
    assert server.connections == 0 and server.seen == []


def test_the_private_address_switch_lets_loopback_through(server: MediaServer, policy: MediaPolicy) -> None:
    """The same URL as above, with `allow_private_media_addresses` on: the refusal was the address check."""
    options = MTMDOptions(mmproj_path="p.gguf", allow_private_media_addresses=True, image_timeout_seconds=5)
    open_policy = replace(MediaPolicy.from_options(options), resolver=policy.resolver)
    assert fetch(f"http://127.0.0.1:{server.port}/img.png", open_policy).format == "png"
    assert MediaPolicy.from_options(MTMDOptions(mmproj_path="p.gguf")).allow_private_addresses is False


@pytest.mark.parametrize(
    ("addresses", "reason"),
    [
        (["10.0.0.7"], "private address 10.0.0.7"),
        (["192.168.1.20"], "private address 192.168.1.20"),
        (["172.20.0.1"], "private address 172.20.0.1"),
        (["100.64.3.4"], r"shared \(CGNAT\) address"),
        (["169.254.169.254"], "cloud metadata address 169.254.169.254"),
        (["169.254.10.10"], "link-local address"),
        (["127.0.0.1"], "loopback address 127.0.0.1"),
        (["0.0.0.0"], "unspecified address"),
        (["224.0.0.251"], "multicast address"),
        (["240.0.0.1"], "reserved address"),
        (["::1"], "loopback address ::1"),
        (["fd00::1"], r"private \(unique local\) address fd00::1"),
        (["fe80::1"], "link-local address fe80::1"),
        (["ff02::1"], "multicast address"),
        (["fd00:ec2::254"], "cloud metadata address fd00:ec2::254"),
        (["::ffff:192.168.1.1"], "private address 192.168.1.1 inside IPv4-mapped address"),
        (["::ffff:169.254.169.254"], "cloud metadata address 169.254.169.254 inside IPv4-mapped"),
        (["64:ff9b::a9fe:a9fe"], "cloud metadata address 169.254.169.254 inside NAT64"),
        (["2002:7f00:1::"], "loopback address 127.0.0.1 inside 6to4"),
        (["::7f00:1"], "IPv4-compatible"),
        (["2001::1"], "Teredo"),
        (["93.184.215.14", "10.0.0.1"], "private address 10.0.0.1"),  # every answer is checked
    ],
)
def test_a_public_looking_name_resolving_to_a_forbidden_address_is_refused_without_a_request(
    addresses: list[str], reason: str, policy: MediaPolicy, sent: list[str]
) -> None:
    stub = StubResolver({"cdn.example": addresses})
    refused("https://cdn.example/cat.png", replace(policy, resolver=stub), reason)
    assert stub.calls == ["cdn.example"] and sent == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata address 169.254.169.254"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata address fd00:ec2::254"),
        ("http://[::ffff:169.254.169.254]/", "cloud metadata address 169.254.169.254 inside IPv4-mapped"),
        ("http://[::ffff:a9fe:a9fe]/", "cloud metadata address 169.254.169.254 inside IPv4-mapped"),
        ("http://168.63.129.16/machine", "cloud metadata address 168.63.129.16"),
        ("http://100.100.100.200/latest/meta-data/", "cloud metadata address 100.100.100.200"),
        ("http://metadata.google.internal/computeMetadata/v1/", "cloud metadata host"),
        ("http://[fd12:3456::1]/", r"private \(unique local\)"),
        ("http://10.1.2.3/", "private address 10.1.2.3"),
        ("http://0251.0376.0251.0376/", "malformed URL"),  # httpx rejects octal quads outright
        ("http://0x7f.1/", "non-canonical numeric host"),
        ("http://127.0.0.1./", "loopback address 127.0.0.1"),
        ("HTTP://[0:0:0:0:0:ffff:127.0.0.1]/", "loopback address 127.0.0.1 inside IPv4-mapped"),
        ("http://[fe80::1%25eth0]/", "scoped address"),
        ("http://0/", "non-canonical numeric host 0"),
        ("http://127.0.0.1%2e/", "malformed host"),
        ("http://cdn.example\\@127.0.0.1/", "must not carry credentials"),
        ("http://user:secret@cdn.example/a.png", "must not carry credentials"),
        ("gopher://cdn.example/", "scheme 'gopher' is not allowed"),
        ("ftp://cdn.example/a.png", "scheme 'ftp' is not allowed"),
        ("//cdn.example/a.png", "scheme '\\(none\\)' is not allowed"),
    ],
)
def test_metadata_and_private_literals_are_refused_without_resolving_or_connecting(
    url: str, reason: str, policy: MediaPolicy, resolver: StubResolver, sent: list[str]
) -> None:
    refused(url, policy, reason)
    assert sent == [] and resolver.calls == []


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("http://127.0.0.1:{port}/img.png", "loopback address 127.0.0.1"),
        ("http://internal.example:{port}/img.png", "host internal.example resolves to loopback"),
        ("http://[::ffff:127.0.0.1]:{port}/img.png", "inside IPv4-mapped"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata address"),
        ("http://localhost:{port}/img.png", "loopback host localhost"),
        ("file:///etc/passwd", "scheme 'file' is not allowed"),
    ],
)
def test_a_redirect_is_checked_like_the_first_url(
    location: str, reason: str, server: MediaServer, policy: MediaPolicy, sent: list[str]
) -> None:
    server.routes["/hop"] = Route(302, headers={"Location": location.format(port=server.port)})
    refused(f"http://{NAME}:{server.port}/hop", policy, reason)
    assert [seen.path for seen in server.seen] == ["/hop"]
    assert len(sent) == 1


def test_a_relative_redirect_on_the_same_host_is_followed(server: MediaServer, policy: MediaPolicy) -> None:
    server.routes["/hop"] = Route(301, headers={"Location": "/img.png"})
    assert fetch(f"http://{NAME}:{server.port}/hop", policy).format == "png"
    assert [(seen.path, seen.headers["host"]) for seen in server.seen] == [
        ("/hop", f"{NAME}:{server.port}"),
        ("/img.png", f"{NAME}:{server.port}"),
    ]


def test_at_most_three_redirects(server: MediaServer, policy: MediaPolicy) -> None:
    for step in range(4):
        server.routes[f"/r{step}"] = Route(307, headers={"Location": f"/r{step + 1}"})
    server.routes["/r4"] = Route(body=PNG)
    refused(f"http://{NAME}:{server.port}/r0", policy, "more than 3 redirects")
    assert [seen.path for seen in server.seen] == ["/r0", "/r1", "/r2", "/r3"]
    server.seen.clear()
    assert fetch(f"http://{NAME}:{server.port}/r1", policy).format == "png"


def test_a_declared_oversize_body_is_refused_before_reading(server: MediaServer, policy: MediaPolicy) -> None:
    server.routes["/big.png"] = Route(body=PNG + b"\x00" * 2000)
    refused(
        f"http://{NAME}:{server.port}/big.png",
        replace(policy, image_max_bytes=1000),
        r"over the limit of 1000",
    )


def test_an_unsized_body_is_cut_off_at_the_cap(server: MediaServer, policy: MediaPolicy) -> None:
    server.routes["/endless"] = Route(handler=unsized(50 << 20))
    refused(
        f"http://{NAME}:{server.port}/endless", replace(policy, image_max_bytes=100_000), "over the limit"
    )


@pytest.mark.parametrize(
    ("route", "reason"),
    [
        (Route(404, b"gone"), "the server answered HTTP 404"),
        (Route(body=b"<html>not an image</html>"), "not a supported image"),
        (Route(body=PNG[:30]), "png image is truncated"),
        (Route(body=PNG, headers={"Content-Encoding": "gzip"}), "gzip-encoded body"),
        (Route(302), "the server answered HTTP 302"),  # a redirect without a Location
    ],
)
def test_bad_answers_are_refused(route: Route, reason: str, server: MediaServer, policy: MediaPolicy) -> None:
    server.routes["/x"] = route
    refused(f"http://{NAME}:{server.port}/x", policy, reason)


def test_a_server_that_never_answers_times_out(policy: MediaPolicy) -> None:
    with silent_server() as silent:
        refused(
            f"http://{NAME}:{silent.port}/img.png",
            replace(policy, timeout_seconds=0.3),
            "timed out after 0.3 s",
        )
        assert len(silent.accepted) == 1


def test_the_deadline_covers_the_whole_body_not_each_read(server: MediaServer, policy: MediaPolicy) -> None:
    """A body dripping a byte every 50 ms never trips a per-read timeout; the overall deadline stops it."""
    server.routes["/drip"] = Route(handler=drip(chunks=400, delay=0.05))
    refused(
        f"http://{NAME}:{server.port}/drip", replace(policy, timeout_seconds=0.5), "timed out after 0.5 s"
    )


def test_allowed_media_domains_match_exact_hosts(
    server: MediaServer, policy: MediaPolicy, resolver: StubResolver
) -> None:
    only = replace(policy, allowed_domains=frozenset({NAME}))
    refused(f"http://also.example:{server.port}/img.png", only, "host also.example is not in")
    refused(f"http://sub.{NAME}:{server.port}/img.png", only, f"host sub.{NAME} is not in")
    assert resolver.calls == []
    assert fetch(f"http://MEDIA.Example.:{server.port}/img.png", only).format == "png"
    server.routes["/hop"] = Route(302, headers={"Location": f"http://also.example:{server.port}/img.png"})
    refused(f"http://{NAME}:{server.port}/hop", only, "host also.example is not in")


def test_an_allowed_domain_still_gets_the_address_check(server: MediaServer, policy: MediaPolicy) -> None:
    listed = replace(policy, allowed_domains=frozenset({"internal.example"}))
    refused(f"http://internal.example:{server.port}/img.png", listed, "resolves to loopback address")
    assert server.connections == 0


def test_a_name_that_does_not_resolve_is_refused(policy: MediaPolicy) -> None:
    refused("http://nowhere.example/a.png", policy, "host nowhere.example does not resolve")


@pytest.fixture(scope="module")
def tls_material() -> Any:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    return ca, ca.issue_cert(NAME), ca.issue_cert("other.example")


def _client_context(ca: Any) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def test_https_verifies_the_certificate_and_sends_sni_for_the_name_not_the_address(
    tls_material: Any, policy: MediaPolicy
) -> None:
    ca, good, _other = tls_material
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    good.configure_cert(server_context)
    names: list[str | None] = []

    def record_sni(_sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> None:
        names.append(name)

    server_context.sni_callback = record_sni
    with media_server(tls=server_context) as server:
        server.routes["/img.png"] = Route(body=PNG)
        blob = fetch(
            f"https://{NAME}:{server.port}/img.png", replace(policy, ssl_context=_client_context(ca))
        )
        assert blob.format == "png"
        assert names == [NAME]
        assert server.seen[0].headers["host"] == f"{NAME}:{server.port}"


def test_https_refuses_a_certificate_for_another_name(tls_material: Any, policy: MediaPolicy) -> None:
    ca, _good, other = tls_material
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    other.configure_cert(server_context)
    with media_server(tls=server_context) as server:
        server.routes["/img.png"] = Route(body=PNG)
        refused(
            f"https://{NAME}:{server.port}/img.png",
            replace(policy, ssl_context=_client_context(ca)),
            r"fetching the URL failed \(ConnectError\)",
        )
        assert server.seen == []
