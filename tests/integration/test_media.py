"""Image and audio input end to end: router and worker processes on the packaged Gemma 3 270M with a tiny
generated projector (both encoders in one file), through the official openai client.

The projector's weights are random, so answers are noise: the tests check what the server promises about
them — the media reach the model (prompt tokens grow by the projector's token count), turn two of a chat
about an image reuses its KV (cached_tokens), embeddings survive a restart on disk, and bad media are a
400 while the worker keeps serving.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.media_bytes import data_url, png_bytes, png_with_corrupt_pixels, wav_bytes
from tests.fixtures.tiny_projector import AUDIO_TOKENS_PER_CHUNK, VISION_TOKENS
from tests.integration.server import REPO, Server, run_server

GEMMA = "gemma-3-270m"
IMAGE_EXTRA = VISION_TOKENS + 2  # <start_of_image> ... <end_of_image>


def media_model(gemma: Path, projector: Path, cache: Path) -> dict[str, Any]:
    model = json.loads((REPO / "configs/gemma-3-270m.json").read_text())["model"]
    model.pop("packaged")
    model.update(
        path=str(gemma),
        n_ctx=4096,
        n_seq_max=2,
        # Small steps: a 75-token audio span is decoded over two steps (causal spans are chunked).
        n_batch=64,
        n_ubatch=64,
        threads=2,
        threads_batch=2,
        swa_full=True,
        mtmd={
            "mmproj_path": str(projector),
            "embedding_cache": {"path": str(cache), "max_bytes": 1 << 24},
            # The http test serves its image on 127.0.0.1 (tests reach loopback only); router/media refuses
            # private addresses unless this is set.
            "allow_private_media_addresses": True,
        },
    )
    return model


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedding-cache")


@pytest.fixture(scope="module")
def fake_ffmpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder put first on the worker's PATH whose `ffprobe` and `ffmpeg` leave a mark if anything runs
    them: mtmd's loader hands bytes it cannot decode as an image to them (its video path)."""
    folder = tmp_path_factory.mktemp("fake-ffmpeg")
    for name in ("ffprobe", "ffmpeg"):
        script = folder / name
        script.write_text(f"#!/bin/sh\ntouch {folder}/ran-{name}\nexit 1\n")
        script.chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def server(
    gemma3_270m_gguf: Path, tiny_projector: Callable[[str], Path], cache_dir: Path, fake_ffmpeg: Path
) -> Iterator[Server]:
    model = media_model(gemma3_270m_gguf, tiny_projector("both"), cache_dir)
    with run_server(model, env={"PATH": f"{fake_ffmpeg}:{os.environ['PATH']}"}) as running:
        yield running


def image_part(seed: int = 0) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url(png_bytes(seed=seed), "image/png")}}


def audio_part() -> dict[str, Any]:
    encoded = base64.b64encode(wav_bytes()).decode()
    return {"type": "input_audio", "input_audio": {"data": encoded, "format": "wav"}}


def ask(server: Server, messages: list[dict[str, Any]], max_tokens: int = 3) -> Any:
    return server.client().chat.completions.create(
        model=GEMMA, messages=messages, max_tokens=max_tokens, temperature=0
    )


def user(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(parts)}


TEXT = {"type": "text", "text": "Describe this."}


@pytest.mark.slow
def test_image_answer_counts_its_tokens(server: Server) -> None:
    plain = ask(server, [user(TEXT)])
    answer = ask(server, [user(image_part(), TEXT)])
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 3
    assert answer.usage.prompt_tokens == plain.usage.prompt_tokens + IMAGE_EXTRA


@pytest.mark.slow
def test_audio_answer_and_two_images_in_one_message(server: Server) -> None:
    plain = ask(server, [user(TEXT)])
    audio = ask(server, [user(audio_part(), TEXT)])
    assert audio.usage.prompt_tokens == plain.usage.prompt_tokens + AUDIO_TOKENS_PER_CHUNK
    long_audio = base64.b64encode(wav_bytes(seconds=35)).decode()
    long_part = {"type": "input_audio", "input_audio": {"data": long_audio, "format": "wav"}}
    long = ask(server, [user(long_part, TEXT)])  # two 30-second chunks
    assert long.usage.prompt_tokens == plain.usage.prompt_tokens + 2 * AUDIO_TOKENS_PER_CHUNK
    both = ask(server, [user(image_part(1), {"type": "text", "text": "and"}, image_part(2), TEXT)])
    assert both.usage.completion_tokens == 3
    and_tokens = ask(server, [user({"type": "text", "text": "and"}, TEXT)]).usage.prompt_tokens
    assert both.usage.prompt_tokens == and_tokens + 2 * IMAGE_EXTRA


@pytest.mark.slow
def test_second_turn_reuses_the_image(server: Server) -> None:
    first_turn = [user(image_part(3), TEXT)]
    first = ask(server, first_turn)
    reply = {"role": "assistant", "content": first.choices[0].message.content or "noise"}
    second = ask(server, [*first_turn, reply, user({"type": "text", "text": "And the colours?"})])
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    # The first turn's prompt (image included) is served from the prefix cache: the image is neither
    # encoded nor read from the embedding cache again.
    assert details.cached_tokens >= first.usage.prompt_tokens - 1
    sha = hashlib.sha256(png_bytes(seed=3)).hexdigest()[:12]
    assert server.log().count(f"image {sha}: embeddings") == 1


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = png_bytes(seed=8)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.slow
def test_http_image_url(server: Server) -> None:
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    thread = threading.Thread(target=images.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{images.server_address[1]}/picture.png"
        answer = ask(server, [user({"type": "image_url", "image_url": {"url": url}}, TEXT)])
    finally:
        images.shutdown()
        images.server_close()
    plain = ask(server, [user(TEXT)])
    assert answer.usage.prompt_tokens == plain.usage.prompt_tokens + IMAGE_EXTRA


@pytest.mark.slow
def test_responses_input_image(server: Server) -> None:
    url = data_url(png_bytes(seed=4), "image/png")
    response = server.client().responses.create(
        model=GEMMA,
        input=[
            {
                "role": "user",
                "content": [{"type": "input_image", "image_url": url}, {"type": "input_text", "text": "Hi"}],
            }
        ],
        max_output_tokens=2,
    )
    plain = server.client().responses.create(
        model=GEMMA, input=[{"role": "user", "content": "Hi"}], max_output_tokens=2
    )
    assert response.usage is not None and plain.usage is not None
    assert response.usage.input_tokens == plain.usage.input_tokens + IMAGE_EXTRA
    with server.http() as http:
        bad = {"type": "input_image", "image_url": "data:image/png;base64,bm90IGFuIGltYWdl"}
        reply = http.post(
            "/v1/responses",
            json={"model": GEMMA, "instructions": "Be brief.", "input": [{"role": "user", "content": [bad]}]},
        )
    assert reply.status_code == 400
    assert reply.json()["error"]["message"].startswith("input[0].content[0]: "), reply.text


@pytest.mark.slow
def test_broken_media_are_a_400_and_the_worker_keeps_serving(server: Server, fake_ffmpeg: Path) -> None:
    png = png_bytes(seed=5)
    broken = png[:40] + bytes(len(png) - 40)  # a valid header, then zeros where the pixels were
    cases = [
        # Passes the router's header checks; the worker's decoder refuses it.
        {"type": "image_url", "image_url": {"url": data_url(png_with_corrupt_pixels(), "image/png")}},
        {"type": "image_url", "image_url": {"url": data_url(broken, "image/png")}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}},
        {
            "type": "input_audio",
            "input_audio": {"data": base64.b64encode(b"RIFF0000WAVE").decode(), "format": "wav"},
        },
    ]
    with server.http() as http:
        messages = []
        for part in cases:
            reply = http.post(
                "/v1/chat/completions",
                json={"model": GEMMA, "messages": [user(part, TEXT)], "max_tokens": 2},
            )
            assert reply.status_code == 400, reply.text
            messages.append(reply.json()["error"]["message"])
    assert all(m.startswith("messages[0].content[0]: ") for m in messages), messages
    assert "could not be decoded" in messages[0]  # the worker's mtmd said so, and it keeps serving
    assert not list(fake_ffmpeg.glob("ran-*"))  # undecodable bytes never reached an external program
    assert ask(server, [user(image_part(6), TEXT)]).usage.completion_tokens == 3


@pytest.mark.slow
def test_embedding_cache_survives_a_restart(
    gemma3_270m_gguf: Path, tiny_projector: Callable[[str], Path], tmp_path: Path
) -> None:
    model = media_model(gemma3_270m_gguf, tiny_projector("vision"), tmp_path / "cache")
    messages = [user(image_part(7), TEXT)]
    with run_server(model) as first:
        ask(first, messages)
        assert "embeddings encoded" in first.log()
    entries = list((tmp_path / "cache").glob("*.emb"))
    assert len(entries) == 1
    with run_server(model) as second:
        ask(second, messages)
        assert "embeddings from the cache" in second.log()
        assert "embeddings encoded" not in second.log()
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # torn: removed with a warning, encoded again
    with run_server(model) as third:
        ask(third, messages)
        assert "removing corrupt entry" in third.log()
        assert "embeddings encoded" in third.log()


def test_media_without_a_projector_names_the_part(tiny_server: Server) -> None:
    with tiny_server.http() as http:
        reply = http.post(
            "/v1/chat/completions",
            json={"model": "test-model", "messages": [user(TEXT, image_part())], "max_tokens": 2},
        )
    assert reply.status_code == 400
    assert "messages[0]" in reply.json()["error"]["message"]
