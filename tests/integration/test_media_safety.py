"""Media input safety end to end: a real router and worker (packaged Gemma 3 270M with a tiny generated
vision projector) under the default media policy, answering 400s that name the part and the reason.

The unsafe URLs here all point at loopback (127.0.0.0/8) and a server this test starts, so even a broken
check would send traffic nowhere else; that server must see no connection at all. Cases that need a stub
resolver (public-looking names, redirects, metadata addresses) are unit tests: tests/unit/test_media_fetch.py.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.server import REPO, Server, run_server
from tests.support import media_samples as samples
from tests.support.media_server import MediaServer, Route, media_server

GEMMA = "gemma-3-270m"
IMAGE_MAX_BYTES = 4096
TEXT = {"type": "text", "text": "Describe this."}


@pytest.fixture(scope="module")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("media-files")
    (base / "media").mkdir()
    (base / "media" / "cat.png").write_bytes(samples.png())
    (base / "secret.png").write_bytes(samples.png())
    (base / "media" / "escape.png").symlink_to(base / "secret.png")
    return base / "media"


@pytest.fixture(scope="module")
def server(
    gemma3_270m_gguf: Path, tiny_projector: Callable[[str], Path], media_root: Path
) -> Iterator[Server]:
    model = json.loads((REPO / "configs/gemma-3-270m.json").read_text())["model"]
    model.pop("packaged")
    model.update(
        path=str(gemma3_270m_gguf),
        n_ctx=2048,
        n_seq_max=2,
        threads=2,
        threads_batch=2,
        mtmd={
            "mmproj_path": str(tiny_projector("vision")),
            "image_max_bytes": IMAGE_MAX_BYTES,
            "image_timeout_seconds": 5,
            "allowed_local_media_path": str(media_root),
        },
    )
    with run_server(model) as running:
        yield running


@pytest.fixture
def images() -> Iterator[MediaServer]:
    with media_server() as running:
        running.routes["/cat.png"] = Route(body=samples.png())
        yield running


def post(server: Server, part: dict[str, Any]) -> Any:
    """Greedy and past the end of generation: served answers have exactly max_tokens tokens."""
    body = {"model": GEMMA, "messages": [{"role": "user", "content": [TEXT, part]}], "max_tokens": 2}
    with server.http() as http:
        return http.post("/v1/chat/completions", json={**body, "temperature": 0, "ignore_eos": True})


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def assert_refused(reply: Any, reason: str) -> None:
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("messages[0].content[1]: "), error
    assert reason in error["message"], error


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.1", "loopback address 127.0.0.1"),
        ("[::ffff:127.0.0.1]", "loopback address 127.0.0.1 inside IPv4-mapped"),
        ("127.1", "non-canonical numeric host"),
        ("2130706433", "non-canonical numeric host"),
        ("localhost", "loopback host localhost"),
    ],
)
def test_loopback_urls_are_a_400_and_no_connection_is_made(
    host: str, reason: str, server: Server, images: MediaServer
) -> None:
    assert_refused(post(server, image(f"http://{host}:{images.port}/cat.png")), reason)
    assert images.connections == 0


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../secret.png", "outside model.mtmd.allowed_local_media_path"),
        ("escape.png", "outside model.mtmd.allowed_local_media_path"),
        ("missing.png", "does not exist"),
    ],
)
def test_file_urls_outside_the_root_are_a_400(
    name: str, reason: str, server: Server, media_root: Path
) -> None:
    assert_refused(post(server, image(f"file://{media_root}/{name}")), reason)


def test_oversized_and_broken_inline_media_are_a_400(server: Server) -> None:
    big = base64.b64encode(b"\x00" * (IMAGE_MAX_BYTES + 1)).decode()
    assert_refused(post(server, image(f"data:image/png;base64,{big}")), "over the limit of 4096 bytes")
    webp = base64.b64encode(samples.webp_lossless()).decode()
    assert_refused(post(server, image(f"data:image/webp;base64,{webp}")), "webp images are not supported")
    huge = base64.b64encode(samples.png_claiming(60000, 60000)).decode()
    assert_refused(
        post(server, image(f"data:image/png;base64,{huge}")), "60000x60000 pixels, over the limit of 33554432"
    )


def test_allowed_media_still_load(server: Server, media_root: Path) -> None:
    """The same server takes a file under the root and a data: URL (so the 400s above were the policy)."""
    for part in (image(f"file://{media_root}/cat.png"), image(samples_data_url())):
        reply = post(server, part)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 2


def samples_data_url() -> str:
    return f"data:image/png;base64,{base64.b64encode(samples.png(8, 8)).decode()}"


def test_responses_input_image_is_checked_the_same_way(server: Server, images: MediaServer) -> None:
    url = f"http://127.0.0.1:{images.port}/cat.png"
    content = [{"type": "input_text", "text": "Hi"}, {"type": "input_image", "image_url": url}]
    with server.http() as http:
        reply = http.post(
            "/v1/responses",
            json={"model": GEMMA, "input": [{"role": "user", "content": content}], "max_output_tokens": 2},
        )
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]["message"]
    assert "content[1]: URL host loopback address 127.0.0.1" in message, message
    assert images.connections == 0


def test_too_many_media_parts_are_a_400_before_any_fetch(server: Server, images: MediaServer) -> None:
    """One request cannot start thousands of fetches: over model.mtmd.max_media_parts (16) is refused
    before anything is loaded, so even a permitted URL is never fetched."""
    parts = [image(f"http://127.0.0.1:{images.port}/cat.png") for _ in range(17)]
    with server.http() as http:
        reply = http.post(
            "/v1/chat/completions",
            json={"model": GEMMA, "messages": [{"role": "user", "content": [TEXT, *parts]}], "max_tokens": 2},
        )
    assert reply.status_code == 400, reply.text
    assert "17 image/audio parts in one request" in reply.json()["error"]["message"]
    assert "max_media_parts" in reply.json()["error"]["message"]
    assert images.connections == 0
