"""Which addresses a media URL may reach: public unicast only.

Refused: loopback, private, link-local, multicast, reserved, unspecified, shared (CGNAT) and cloud-metadata
addresses, for IPv4 and IPv6, IPv4 addresses wrapped in IPv6 (mapped, 6to4, NAT64) are judged by the IPv4
address inside, and the IPv4-compatible and Teredo forms are refused whole. Host spellings that resolvers
read as numbers (`2130706433`, `0x7f.1`, `127.1`) are refused outright so no resolver gets to interpret them.
"""

from __future__ import annotations

import ipaddress
import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from router.media.policy import IPAddress

# Cloud instance-metadata and host-agent endpoints, some of them on public-looking addresses.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.123",  # AWS time sync
        "168.63.129.16",  # Azure wire server (a public address)
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud (legacy)
        "fd00:ec2::254",  # AWS IPv6
        "fd00:ec2::23",  # AWS IPv6 DNS
    )
)
METADATA_HOSTS = frozenset(
    ("metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal")
)

_V4_CLASSES: tuple[tuple[IPv4Network, str], ...] = tuple(
    (IPv4Network(net), reason)
    for net, reason in (
        ("0.0.0.0/8", "unspecified"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("10.0.0.0/8", "private"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("100.64.0.0/10", "shared (CGNAT)"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
    )
)
_V6_CLASSES: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(net), reason)
    for net, reason in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("fc00::/7", "private (unique local)"),
        ("ff00::/8", "multicast"),
        ("64:ff9b:1::/48", "private (local NAT64)"),
        ("::/96", "deprecated IPv4-compatible"),
        ("2001::/32", "Teredo"),
    )
)
_NAT64 = IPv6Network("64:ff9b::/96")

# What a DNS name may hold once httpx has IDNA-encoded it.
_HOST_CHARACTERS = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
# Every part a number (decimal, octal or hex): inet_aton would read it as an IPv4 address.
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$", re.IGNORECASE)


def address_refusal(address: IPAddress) -> str | None:
    """Why a URL may not reach this address, or None for a public unicast address."""
    if address in METADATA_ADDRESSES:
        return f"cloud metadata address {address}"
    if isinstance(address, IPv4Address):
        return _v4_refusal(address)
    if address.scope_id is not None:
        return f"scoped address {address}"
    inner = _embedded_ipv4(address)
    if inner is not None:
        form, v4 = inner
        why = address_refusal(v4)
        return f"{why} inside {form} address {address}" if why is not None else None
    for network, reason in _V6_CLASSES:
        if address in network:
            return f"{reason} address {address}"
    if not address.is_global:
        return f"reserved address {address}"
    return None


def host_refusal(host: str) -> str | None:
    """Refusals decided by the host's spelling alone (before any resolution)."""
    if not _HOST_CHARACTERS.match(host):
        return f"malformed host {host!r}"
    if host in METADATA_HOSTS:
        return f"cloud metadata host {host}"
    if host == "localhost" or host.endswith(".localhost"):
        return f"loopback host {host}"
    if _NUMERIC_HOST.match(host) and not _is_dotted_quad(host):
        return f"non-canonical numeric host {host}"
    return None


def _v4_refusal(address: IPv4Address) -> str | None:
    for network, reason in _V4_CLASSES:
        if address in network:
            return f"{reason} address {address}"
    if not address.is_global:
        return f"reserved address {address}"
    return None


def _embedded_ipv4(address: IPv6Address) -> tuple[str, IPv4Address] | None:
    if address.ipv4_mapped is not None:
        return "IPv4-mapped", address.ipv4_mapped
    if address.sixtofour is not None:
        return "6to4", address.sixtofour
    if address in _NAT64:
        return "NAT64", IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _is_dotted_quad(host: str) -> bool:
    try:
        IPv4Address(host)
    except ValueError:
        return False
    return True
