"""What the router may fetch for image and audio content parts, built once from `model.mtmd`.

The policy is plain data plus two seams that only code can set (never a request, never the config file):
`resolver` (tests stub DNS so they never send traffic beyond loopback) and `private_address_hosts` /
`ssl_context` (tests reach a server on 127.0.0.1 under a public-looking name). The one config switch that
weakens the address check, `allow_private_media_addresses`, is off by default and documented as a risk.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from router.media.types import MediaKind
from shared.config import MTMDOptions

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host name (IDNA, no trailing dot), port -> every address the name resolves to.
Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]

DEFAULT_IMAGE_MAX_PIXELS = 32 * 1024 * 1024
MAX_REDIRECTS = 3


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """The operating system's resolver (getaddrinfo), asked once per hop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    return found


@dataclass(frozen=True)
class MediaPolicy:
    image_max_bytes: int = 20 * 1024 * 1024
    audio_max_bytes: int = 100 * 1024 * 1024
    # Whole fetch, every redirect hop and the body included.
    timeout_seconds: float = 10.0
    # Exact host names (lower case, no trailing dot); None: any host whose addresses pass the check.
    allowed_domains: frozenset[str] | None = None
    # `file:` URLs are refused unless this is set, and then only for files under it.
    allowed_local_path: Path | None = None
    # RISK: lets URLs reach loopback, private, link-local and metadata addresses. For tests and closed
    # networks only; config `model.mtmd.allow_private_media_addresses`, default false.
    allow_private_addresses: bool = False
    image_max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS
    max_redirects: int = MAX_REDIRECTS
    resolver: Resolver = field(default=system_resolver, compare=False)
    # Code-only seams for tests: host names whose resolved addresses skip the address check, and the TLS
    # context used to verify servers (None: the system's default trust store).
    private_address_hosts: frozenset[str] = frozenset()
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)

    def max_bytes(self, kind: MediaKind) -> int:
        return self.image_max_bytes if kind == "image" else self.audio_max_bytes

    @classmethod
    def from_options(cls, options: MTMDOptions) -> MediaPolicy:
        domains = options.allowed_media_domains
        local = options.allowed_local_media_path
        return cls(
            image_max_bytes=options.image_max_bytes,
            audio_max_bytes=options.audio_max_bytes,
            timeout_seconds=options.image_timeout_seconds,
            allowed_domains=None if domains is None else frozenset(normalize_host(d) for d in domains),
            allowed_local_path=None if local is None else Path(local).resolve(),
            allow_private_addresses=options.allow_private_media_addresses,
            image_max_pixels=options.image_max_pixels,
        )


def normalize_host(host: str) -> str:
    """Lower case without one trailing dot, so `Example.COM.` and `example.com` compare equal."""
    host = host.strip().lower()
    return host[:-1] if host.endswith(".") else host
