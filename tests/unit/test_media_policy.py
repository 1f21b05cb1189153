"""MediaPolicy from `model.mtmd`, and the default resolver (asked only for loopback names here)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from router.media import MediaPolicy, system_resolver
from shared.config import MTMDOptions


def test_every_mtmd_field_reaches_the_policy(tmp_path: Path) -> None:
    (tmp_path / "media").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "media")
    options = MTMDOptions(
        mmproj_path="p.gguf",
        image_max_bytes=123,
        audio_max_bytes=456,
        image_timeout_seconds=2.5,
        allowed_media_domains=["Example.COM.", "static.example.com"],
        allowed_local_media_path=str(tmp_path / "alias"),
        image_max_pixels=789,
    )
    policy = MediaPolicy.from_options(options)
    assert (policy.image_max_bytes, policy.audio_max_bytes, policy.timeout_seconds) == (123, 456, 2.5)
    assert (policy.max_bytes("image"), policy.max_bytes("audio"), policy.image_max_pixels) == (123, 456, 789)
    assert policy.allowed_domains == frozenset({"example.com", "static.example.com"})
    assert policy.allowed_local_path == (tmp_path / "media").resolve()
    assert policy.allow_private_addresses is False and policy.private_address_hosts == frozenset()
    assert policy.max_redirects == 3


def test_defaults_refuse_file_urls_and_allow_any_public_host() -> None:
    policy = MediaPolicy.from_options(MTMDOptions(mmproj_path="p.gguf"))
    assert policy.allowed_local_path is None and policy.allowed_domains is None
    assert (policy.image_max_bytes, policy.audio_max_bytes, policy.timeout_seconds) == (
        20 << 20,
        100 << 20,
        10.0,
    )


def test_the_system_resolver_returns_every_address_once() -> None:
    found = asyncio.run(system_resolver("localhost", 80))
    assert found and all(address.is_loopback for address in found)
    assert len(found) == len(set(found))
    assert [str(a) for a in asyncio.run(system_resolver("127.0.0.1", 80))] == ["127.0.0.1"]
