"""`data:` URLs, raw base64 (`input_audio.data`) and `file:` URLs (router/media/inline.py, local_files.py)."""

from __future__ import annotations

import asyncio
import base64
import os
import re
from pathlib import Path
from typing import Any

import pytest

import router.media.inline
from router.media import MediaKind, MediaPolicy, MediaRefused, fetch_media, media_from_base64
from shared.config import MTMDOptions
from tests.support import media_samples as samples

PNG = samples.png()
OUTSIDE = re.escape("outside model.mtmd.allowed_local_media_path")


def fetch(url: str, policy: MediaPolicy, kind: MediaKind = "image") -> Any:
    return asyncio.run(fetch_media(url, kind, policy))


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def test_a_data_url_image_loads() -> None:
    blob = fetch(data_url(PNG), MediaPolicy())
    assert (blob.format, blob.width, blob.height, blob.data) == ("png", 4, 3, PNG)
    assert fetch(data_url(samples.jpeg(), "IMAGE/JPEG"), MediaPolicy()).format == "jpeg"
    assert fetch(data_url(PNG, ""), MediaPolicy()).format == "png"  # no declared type: the bytes decide


def test_an_oversized_data_url_is_refused_from_its_length_before_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_decoding(*_args: Any, **_kwargs: Any) -> bytes:
        raise AssertionError("decoded an oversized payload")

    monkeypatch.setattr(router.media.inline.base64, "b64decode", no_decoding)
    payload = "A" * 4000  # 3000 bytes once decoded
    with pytest.raises(MediaRefused, match="image data is 3000 bytes, over the limit of 2999 bytes"):
        fetch(f"data:image/png;base64,{payload}", MediaPolicy(image_max_bytes=2999))
    with pytest.raises(MediaRefused, match="audio data is 3000 bytes, over the limit of 100 bytes"):
        media_from_base64(payload, "audio", MediaPolicy(audio_max_bytes=100))


def test_a_data_url_at_the_limit_is_accepted() -> None:
    assert fetch(data_url(PNG), MediaPolicy(image_max_bytes=len(PNG))).data == PNG


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png;base64,iVBO R", "not valid base64"),
        ("data:image/png,%89PNG", "must be base64-encoded"),
        ("data:image/png;base64", "malformed data: URL"),
        ("data:text/html;base64,PGI+", "declares text/html, not an image type"),
        ("data:image/png;base64,", "image data is empty"),
        (data_url(b"GIF89a" + b"\x00" * 30, "image/gif"), "gif image is truncated"),
        (data_url(b"\x00" * 64), "not a supported image"),
    ],
)
def test_bad_data_urls_are_refused(url: str, reason: str) -> None:
    with pytest.raises(MediaRefused, match=reason):
        fetch(url, MediaPolicy())


def test_input_audio_base64_is_checked_against_its_declared_format() -> None:
    wav = base64.b64encode(samples.wav()).decode()
    assert media_from_base64(wav, "audio", MediaPolicy(), declared="wav").format == "wav"
    with pytest.raises(MediaRefused, match="audio data is wav, not the declared format mp3"):
        media_from_base64(wav, "audio", MediaPolicy(), declared="mp3")
    with pytest.raises(MediaRefused, match="not a supported audio format"):
        media_from_base64(base64.b64encode(PNG).decode(), "audio", MediaPolicy(), declared="wav")
    assert fetch(data_url(samples.mp3(), "audio/mpeg"), MediaPolicy(), "audio").format == "mp3"


@pytest.fixture
def media_root(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "cat.png").write_bytes(PNG)
    (root / "sub" / "dog.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.png").write_bytes(PNG)
    return root


def local_policy(root: Path, **overrides: Any) -> MediaPolicy:
    return MediaPolicy.from_options(
        MTMDOptions(mmproj_path="p.gguf", allowed_local_media_path=str(root), **overrides)
    )


def test_file_urls_are_refused_unless_a_root_is_configured(media_root: Path) -> None:
    with pytest.raises(MediaRefused, match="file: URLs are disabled"):
        fetch((media_root / "cat.png").as_uri(), MediaPolicy())


def test_a_file_under_the_root_loads(media_root: Path) -> None:
    policy = local_policy(media_root)
    assert fetch((media_root / "cat.png").as_uri(), policy).data == PNG
    assert fetch(f"file://localhost{media_root}/sub/../sub/dog.png", policy).format == "png"


@pytest.mark.parametrize(
    "path",
    ["{root}/../secret.png", "{root}/sub/../../secret.png", "{root}/%2e%2e/secret.png", "/etc/passwd"],
)
def test_traversal_out_of_the_root_is_refused(path: str, media_root: Path) -> None:
    with pytest.raises(MediaRefused, match=OUTSIDE):
        fetch("file://" + path.format(root=media_root), local_policy(media_root))


def test_a_symlink_escaping_the_root_is_refused(media_root: Path) -> None:
    (media_root / "link.png").symlink_to(media_root.parent / "secret.png")
    (media_root / "linkdir").symlink_to(media_root.parent / "outside")
    policy = local_policy(media_root)
    for name in ("link.png", "linkdir/x.png"):
        with pytest.raises(MediaRefused, match=OUTSIDE):
            fetch((media_root / name).as_uri(), policy)


def test_a_root_reached_through_a_symlink_still_works(media_root: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(media_root)
    assert fetch((alias / "cat.png").as_uri(), local_policy(alias)).format == "png"


@pytest.mark.parametrize(
    ("make", "url", "reason"),
    [
        (None, "file://{root}/missing.png", "does not exist"),
        ("fifo", "file://{root}/pipe.png", "does not name a regular file"),
        (None, "file://{root}", "does not name a regular file"),
        (None, "file://evil.example/{root}/cat.png", "names a remote host"),
        (None, "file:cat.png", "must hold an absolute path"),
        (None, "file://{root}/cat.png%00.txt", "must hold an absolute path"),
    ],
)
def test_odd_file_urls_are_refused(make: str | None, url: str, reason: str, media_root: Path) -> None:
    if make == "fifo":
        os.mkfifo(media_root / "pipe.png")
    with pytest.raises(MediaRefused, match=reason):
        fetch(url.format(root=media_root), local_policy(media_root))


def test_a_file_over_the_limit_is_refused(media_root: Path) -> None:
    (media_root / "big.png").write_bytes(PNG + b"\x00" * 5000)
    with pytest.raises(MediaRefused, match="over the limit of 1024 bytes"):
        fetch((media_root / "big.png").as_uri(), local_policy(media_root, image_max_bytes=1024))


def test_broken_bytes_from_a_file_are_refused(media_root: Path) -> None:
    (media_root / "broken.png").write_bytes(PNG[:-20])
    with pytest.raises(MediaRefused, match="png image is truncated"):
        fetch((media_root / "broken.png").as_uri(), local_policy(media_root))
