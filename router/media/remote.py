"""`http:` and `https:` media URLs, fetched so that a client cannot aim the router at its own network.

Each hop: the URL is parsed once (by httpx, the same parser that sends it), the host checked against
`allowed_media_domains`, resolved once through the policy's resolver, every address checked
(router/media/addresses.py), and the connection made to the checked address itself: the request goes to
`scheme://<address>:port/...` with the Host header and TLS SNI and certificate check on the name, so a DNS
answer that changes between check and connect (rebinding) cannot move it. Redirects are not followed by
httpx but re-checked here, at most `max_redirects`. The body is streamed under the kind's byte cap, and the
whole fetch, every hop included, gives up after `timeout_seconds`. Environment proxies are ignored
(`trust_env=False`): a proxy would connect to whatever the name means to it.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

import httpx

from router.media.addresses import address_refusal, host_refusal
from router.media.policy import IPAddress, MediaPolicy, normalize_host
from router.media.types import MediaKind, MediaRefused

_USER_AGENT = "llamafleet-media-fetch"


@dataclass(frozen=True)
class _Target:
    url: httpx.URL  # as the client wrote it (redirects are joined to this)
    host: str
    address: IPAddress
    is_name: bool

    @property
    def connect_url(self) -> httpx.URL:
        return self.url.copy_with(host=str(self.address))


async def fetch_remote(url: str, kind: MediaKind, policy: MediaPolicy) -> bytes:
    limit = policy.max_bytes(kind)
    try:
        async with asyncio.timeout(policy.timeout_seconds):
            return await _follow(url, limit, policy)
    except TimeoutError:
        raise MediaRefused(f"fetching the URL timed out after {policy.timeout_seconds:g} s") from None
    except httpx.TimeoutException:
        raise MediaRefused(f"fetching the URL timed out after {policy.timeout_seconds:g} s") from None
    except httpx.HTTPError as exc:
        raise MediaRefused(f"fetching the URL failed ({type(exc).__name__})") from None


async def _follow(url: str, limit: int, policy: MediaPolicy) -> bytes:
    current = url
    for hop in range(policy.max_redirects + 1):
        target = await _check(current, policy)
        body, location = await _get(target, limit, policy)
        if location is None:
            return body
        try:
            current = str(target.url.join(location))
        except httpx.InvalidURL:
            raise MediaRefused("redirect to a malformed URL") from None
        if hop == policy.max_redirects:
            raise MediaRefused(f"more than {policy.max_redirects} redirects")
    raise AssertionError("unreachable")


async def _get(target: _Target, limit: int, policy: MediaPolicy) -> tuple[bytes, str | None]:
    """One hop: the body, or the redirect's Location. A fresh client per hop, so no connection verified
    for one name is reused for another that happens to resolve to the same address."""
    verify = policy.ssl_context if policy.ssl_context is not None else True
    timeout = httpx.Timeout(policy.timeout_seconds)
    headers = {
        "Host": target.url.netloc.decode("ascii"),
        "Accept-Encoding": "identity",
        "User-Agent": _USER_AGENT,
    }
    extensions = {"sni_hostname": target.host} if target.is_name else {}
    async with httpx.AsyncClient(
        trust_env=False, follow_redirects=False, verify=verify, timeout=timeout
    ) as client:
        request = client.build_request("GET", target.connect_url, headers=headers, extensions=extensions)
        response = await client.send(request, stream=True)
        try:
            location = response.headers.get("location")
            if response.is_redirect and location is not None:
                return b"", location
            if response.status_code != 200:
                raise MediaRefused(f"the server answered HTTP {response.status_code}")
            return await _read_capped(response, limit), None
        finally:
            await response.aclose()


async def _check(url: str, policy: MediaPolicy) -> _Target:
    """The URL's host and the one address to connect to; MediaRefused before any connection otherwise."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise MediaRefused("malformed URL") from None
    if parsed.scheme not in ("http", "https"):
        raise MediaRefused(
            f"URL scheme {parsed.scheme or '(none)'!r} is not allowed (use http, https or data)"
        )
    if parsed.userinfo:
        raise MediaRefused("URL must not carry credentials")
    try:
        host = normalize_host(parsed.raw_host.decode("ascii"))
    except UnicodeDecodeError:
        raise MediaRefused("malformed URL host") from None
    if not host:
        raise MediaRefused("URL has no host")
    if policy.allowed_domains is not None and host not in policy.allowed_domains:
        raise MediaRefused(f"host {host} is not in model.mtmd.allowed_media_domains")
    exempt = policy.allow_private_addresses or host in policy.private_address_hosts
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        why = host_refusal(host)
        if why is not None and not exempt:
            raise MediaRefused(f"URL host refused: {why}")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            addresses = list(await policy.resolver(host, port))
        except OSError:
            raise MediaRefused(f"host {host} does not resolve") from None
        if not addresses:
            raise MediaRefused(f"host {host} does not resolve")
    if not exempt:
        for address in addresses:
            why = address_refusal(address)
            if why is not None:
                shown = "URL host" if literal is not None else f"host {host} resolves to"
                raise MediaRefused(f"{shown} {why}, which media URLs may not reach")
    return _Target(parsed, host, addresses[0], literal is None)


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise MediaRefused(f"the server sent a {encoding}-encoded body (only identity is accepted)")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise MediaRefused(f"the body is {int(declared)} bytes, over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > limit:
            raise MediaRefused(f"the body is over the limit of {limit} bytes")
    return bytes(body)
